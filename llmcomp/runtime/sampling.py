"""The one sampler: temperature, top-k, nucleus (top-p), seeded generators, top-k logprobs.

Pure tensor functions so they can be tested against closed forms. The runtime samples a whole
decode batch with :func:`sample_rows` (greedy rows in one argmax, the others with their own
seeded generator), which the server, ``llmcomp bench`` and ``generate`` all go through.
Logprobs are reported from the model's raw distribution (before temperature, top-k and top-p),
which is what OpenAI and vLLM report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # most top alternatives a request may ask for (OpenAI allows 20 for chat)
GREEDY_TEMPERATURE = 1e-5  # temperatures at or below this are treated as greedy (argmax)


@dataclass
class SamplingParams:
    """What one sequence asks for; validated by the HTTP layer before it reaches the engine."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + k alternatives
    ignore_eos: bool = False  # benchmarking: always generate max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from ``seed`` (or from torch's global RNG when absent)."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen.manual_seed(seed)
    return gen


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out everything outside the smallest set of tokens whose mass reaches ``top_p``.

    The most likely token is always kept; the result is renormalized to sum to one.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Keep a token when the mass *before* it is still below top_p.
    keep_sorted = (cumulative - sorted_probs) < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from a ``[vocab]`` logits row."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = top_p_filter(torch.softmax(scores, dim=-1), params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Next token for every row of ``logits [B, V]``: greedy rows share one argmax (one sync)."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        greedy[i] if p.greedy else sample_token(logits[i], p, generators[i]) for i, p in enumerate(params)
    ]


def token_logprob(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """Log-probability of ``token_id`` under ``softmax(logits)`` plus the ``k`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, indices = torch.topk(logp, k)
        top = [(int(i), float(v)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(token_id, float(logp[token_id].item()), top)
