"""Keep-masks shared by the sparsity passes (magnitude, Wanda, SparseGPT, DSnoT).

A mask is boolean ``[out, in]``, ``True`` = kept. Sparsity is always per output row: unstructured
removes the same count from every row, N:M removes exactly N of every M consecutive inputs, so
the pattern survives any later pass that honours the mask (quantization, storage).
"""

from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator
from torch import nn

from llmcomp.passes.base import ModuleReport, ModuleState, PassConfig, weight_error

NM_PATTERN = re.compile(r"^(\d+):(\d+)$")
UNSTRUCTURED = "unstructured"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` for an ``N:M`` pattern (N pruned of every M), None for unstructured."""
    if pattern == UNSTRUCTURED:
        return None
    match = NM_PATTERN.match(pattern)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError("pattern must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
    return int(match.group(1)), int(match.group(2))


class SparsityConfig(PassConfig):
    """The fields every mask-producing pass shares."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights removed per row (unstructured)")
    pattern: str = Field(UNSTRUCTURED, description="'unstructured' or 'N:M' (N pruned in every M inputs)")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value


def pruned_per_row(n_cols: int, sparsity: float) -> int:
    """How many weights an unstructured mask removes from each row."""
    return int(n_cols * sparsity)


def check_nm(n_cols: int, pattern: str) -> tuple[int, int]:
    nm = parse_pattern(pattern)
    assert nm is not None
    if n_cols % nm[1]:
        raise ValueError(f"N:M pattern {pattern} needs in_features divisible by {nm[1]}, got {n_cols}")
    return nm


def prune_mask(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Boolean keep-mask: the lowest scores pruned per row, or per M-block for N:M."""
    n_rows, n_cols = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pattern == UNSTRUCTURED:
        prune = pruned_per_row(n_cols, sparsity)
        if prune:
            idx = torch.topk(scores, prune, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
        return keep
    n, m = check_nm(n_cols, pattern)
    blocks = scores.reshape(n_rows, n_cols // m, m)
    idx = torch.topk(blocks, n, dim=2, largest=False).indices
    keep = keep.reshape(n_rows, n_cols // m, m).scatter_(2, idx, False)
    return keep.reshape(n_rows, n_cols)


def honour_earlier(scores: torch.Tensor, state: ModuleState) -> torch.Tensor:
    """Scores with what an earlier pass pruned forced to the bottom, so it stays pruned."""
    if state.mask is None:
        return scores
    return scores.masked_fill(~state.mask.to(scores.device), float("-inf"))


def holds_pattern(keep: torch.Tensor, pattern: str) -> bool:
    """Whether ``keep`` has exactly the N:M pattern (every M-block keeps exactly M - N)."""
    nm = parse_pattern(pattern)
    if nm is None:
        return True
    n, m = nm
    if keep.shape[1] % m:
        return False
    kept = keep.reshape(keep.shape[0], -1, m).sum(-1)
    return bool((kept == m - n).all())


def apply_mask(linear: nn.Linear, keep: torch.Tensor, state: ModuleState, pattern: str,
               original: torch.Tensor, new_weight: torch.Tensor | None = None) -> ModuleReport:
    """Write the pruned weight into ``linear`` (in place), record the mask, return the report."""
    w = linear.weight.data
    if new_weight is not None:
        w.copy_(new_weight.to(w.dtype))
    w.mul_(keep.to(w.dtype))
    state.mask = keep
    return {
        "sparsity": float(1.0 - keep.float().mean()),
        "pattern": pattern,
        "rel_error": weight_error(original, w),
    }
