"""A lean decode loop for CPU: static KV cache, fixed shapes, optional ``torch.compile``.

Why not ``model.generate``: its per-step Python work (logits processors, stopping criteria, cache
bookkeeping) costs as much as a small model's matmuls at batch 1, which hides the speedup of
quantized kernels. Here every decode step is one forward call with tensors of the same shapes
(a ``[B, 1]`` token, a ``[B, max_len]`` attention mask updated in place, a static cache), so the
step can be compiled and the loop costs little beyond the model itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_TOP_K = 0  # 0 = no top-k filtering
DEFAULT_TOP_P = 1.0  # 1 = no nucleus filtering
DEFAULT_COMPILE_BACKEND = "inductor"


@dataclass
class GenerationResult:
    """Texts and token ids of the completions (prompt excluded), with timings."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    batch_size: int
    compiled: bool = False
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by the decode steps (all sequences) per second of decoding."""
        return self.decode_steps * self.batch_size / self.decode_seconds if self.decode_seconds > 0 else 0.0


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row of ``logits [B, V]``: argmax at temperature 0, else filtered sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the union of the generation config's, the model config's and the
    tokenizer's (instruct models often list several, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if isinstance(v, int))
    return ids


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class _Stepper:
    """One decode step with fixed shapes; optionally compiled."""

    def __init__(self, model, cache, mask: torch.Tensor, compile_step: bool, backend: str) -> None:
        self.model, self.cache, self.mask = model, cache, mask
        fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = self._step
        if compile_step:
            fn = torch.compile(fn, dynamic=False, fullgraph=False, backend=backend)
        self.fn = fn

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            cache_position=cache_position,
            use_cache=True,
        )
        return out.logits[:, -1, :]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = None,
    compile: bool = False,
    stop_at_eos: bool = True,
    compile_backend: str = DEFAULT_COMPILE_BACKEND,
) -> GenerationResult:
    """Generate continuations of ``prompts`` (one batch, left-padded) with a static KV cache.

    Greedy at ``temperature == 0``; otherwise temperature / top-k / top-p sampling, reproducible
    with ``seed``. ``compile=True`` compiles the decode step (``torch.compile``, static shapes);
    its compile time is reported separately and excluded from ``decode_seconds``. With
    ``stop_at_eos=False`` every sequence gets exactly ``max_new_tokens`` tokens (benchmarks).
    ``compile_backend="eager"`` captures graphs without code generation (quick checks).
    """
    from transformers import StaticCache

    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = enc["input_ids"].to(device)
    batch, prompt_len = ids.shape
    max_len = prompt_len + max_new_tokens
    mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
    mask[:, :prompt_len] = enc["attention_mask"].to(device)
    # Left padding: positions count real tokens only, so padded prompts see the same rotary phases.
    positions = (mask[:, :prompt_len].cumsum(-1) - 1).clamp_min(0)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = eos_token_ids(model, tokenizer) if stop_at_eos else set()
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)

    t0 = time.perf_counter()
    logits = model(
        input_ids=ids,
        attention_mask=mask[:, :prompt_len],
        position_ids=positions,
        past_key_values=cache,
        cache_position=torch.arange(prompt_len, device=device),
        use_cache=True,
    ).logits[:, -1, :]
    token = sample_next(logits, temperature, top_k, top_p, generator)
    prefill_s = time.perf_counter() - t0

    stepper = _Stepper(model, cache, mask, compile, compile_backend)
    pos = positions[:, -1:] + 1
    generated = [token]
    done = torch.isin(token, eos_t) if eos else torch.zeros(batch, dtype=torch.bool, device=device)
    compile_s, steps = 0.0, 0
    t1 = time.perf_counter()
    for i in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        cur = prompt_len + i
        mask[:, cur] = 1
        ts = time.perf_counter()
        logits = stepper.fn(token.unsqueeze(-1), pos, torch.tensor([cur], device=device))
        if compile and i == 0:
            compile_s = time.perf_counter() - ts  # first call compiles; keep it out of the rate
            t1 = time.perf_counter()
        else:
            steps += 1
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos:
            token = torch.where(done, eos_t[0], token)
            done = done | torch.isin(token, eos_t)
        generated.append(token)
        pos = pos + 1
    decode_s = time.perf_counter() - t1

    out_ids = torch.stack(generated, dim=1).tolist()
    token_ids = []
    for row in out_ids:
        if eos:
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            row = row[:cut]
        token_ids.append(row)
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return GenerationResult(
        texts=texts,
        token_ids=token_ids,
        prompt_tokens=int(enc["attention_mask"].sum()),
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        decode_steps=steps,
        batch_size=batch,
        compiled=compile,
        compile_seconds=compile_s,
        extra={"dtype": str(_model_dtype(model)).removeprefix("torch."), "threads": torch.get_num_threads()},
    )
