"""Token-level perplexity of a causal LM on one long text.

Default protocol is the one GPTQ/SparseGPT papers report (so numbers compare with theirs): the
corpus is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens; a trailing
partial window is dropped; every window is scored independently and

    perplexity = exp(sum of token NLLs / number of scored tokens).

With equal windows this equals exp(mean of per-window mean losses), i.e. GPTQ's formula.

With ``stride`` set, windows of up to ``seq_len`` tokens start every ``stride`` tokens and each one
scores only the tokens not scored before (Hugging Face's "perplexity of fixed-length models"
recipe): every token but the first is scored exactly once, with at least ``seq_len - stride``
tokens of context after the first window.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmcomp.errors import LlmcompError

IGNORE_INDEX = -100
DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`compute_perplexity` measured; ``tokens`` counts scored (predicted) tokens."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """Token span ``[begin, end)`` fed to the model; its last ``target_len`` tokens are targets."""

    begin: int
    end: int
    target_len: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def plan_windows(num_tokens: int, seq_len: int, stride: int | None) -> list[Window]:
    """The windows of either protocol (see module docstring); pure, so tests can check it."""
    if seq_len < 2:
        raise LlmcompError(f"seq_len must be at least 2, got {seq_len}")
    if num_tokens < seq_len:
        raise LlmcompError(
            f"the evaluation text has only {num_tokens} tokens, fewer than seq_len={seq_len}: "
            "lower --seq-len or give a longer text"
        )
    if stride is None:
        return [Window(i * seq_len, (i + 1) * seq_len, seq_len) for i in range(num_tokens // seq_len)]
    if not 1 <= stride <= seq_len:
        raise LlmcompError(f"stride must be between 1 and seq_len={seq_len}, got {stride}")
    windows, prev_end, begin = [], 0, 0
    while prev_end < num_tokens:
        end = min(begin + seq_len, num_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end, begin = end, begin + stride
    return windows


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter or buffer (compressed modules may hold only buffers)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def max_context(model: torch.nn.Module) -> int | None:
    """The model's position limit, when its config says it."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole corpus once (1-D int64), with the tokenizer's default special tokens."""
    if not text:
        raise LlmcompError("the evaluation text is empty")
    # verbose=False: the corpus is meant to be longer than model_max_length; we window it ourselves.
    return torch.as_tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long).reshape(-1)


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows in groups of at most ``batch_size`` that share one length."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or batch[-1].length != window.length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@torch.inference_mode()
def _score_batch(model, ids: torch.Tensor, batch: list[Window], device: torch.device) -> tuple[float, int]:
    """Summed NLL (float64) and scored-token count of equal-length windows run as one batch."""
    inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
    labels = inputs.clone()
    for row, window in enumerate(batch):
        labels[row, : window.length - window.target_len] = IGNORE_INDEX
    logits = model(input_ids=inputs, use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    count = int((shift_labels != IGNORE_INDEX).sum())
    return float(nll.double().sum()), count


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("perplexity"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


def compute_perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the exact protocol).

    ``seq_len`` is capped at the model's ``max_position_embeddings``; ``max_tokens`` keeps only the
    first tokens of the corpus (e.g. C4's customary 256 windows). Works on any module whose forward
    takes ``input_ids`` and returns ``.logits`` (compressed QuantLinear models included).
    """
    if batch_size < 1:
        raise LlmcompError(f"batch_size must be at least 1, got {batch_size}")
    limit = max_context(model)
    if limit is not None:
        seq_len = min(seq_len, limit)
    ids = tokenize_text(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = plan_windows(ids.numel(), seq_len, stride)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with _progress(len(windows), progress) as bar:
            task = bar.add_task("perplexity", total=len(windows))
            for batch in _batches(windows, batch_size):
                nll, count = _score_batch(model, ids, batch, device)
                total_nll += nll
                total_tokens += count
                bar.advance(task, len(batch))
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        tokens=total_tokens,
        windows=len(windows),
        seq_len=seq_len,
        stride=stride,
    )
