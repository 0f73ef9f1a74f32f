"""Wanda pruning (Sun et al., 2023): drop the weights with the smallest ``|W_ij| * ||X_j||_2``.

Unstructured (a fixed fraction per output row) or N:M (N zeros in every M consecutive inputs).
No weight update; needs only the per-channel input norms from calibration data. The pruned
matrix stays a dense ``nn.Linear`` with zeros, and the keep-mask goes into the module's state, so a
later quantization pass keeps the pruned weights at exactly 0 (the report records the sparsity).
"""

from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.passes.base import (
    CompressionPass,
    ModuleReport,
    ModuleState,
    Needs,
    PassConfig,
    register_pass,
    weight_error,
)

NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class WandaConfig(PassConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights removed per row (unstructured)")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N pruned in every M inputs)")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if value != "unstructured":
            match = NM_PATTERN.match(value)
            if not match or not 0 < int(match.group(1)) < int(match.group(2)):
                raise ValueError("pattern must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
        return value


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return weight.float().abs() * sq_norm.float().sqrt().unsqueeze(0)


def wanda_mask(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Boolean keep-mask: lowest scores pruned per row, or per M-block for N:M."""
    n_rows, n_cols = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pattern == "unstructured":
        prune = int(n_cols * sparsity)
        if prune:
            idx = torch.topk(scores, prune, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
        return keep
    n, m = (int(v) for v in pattern.split(":"))
    if n_cols % m:
        raise ValueError(f"N:M pattern {pattern} needs in_features divisible by {m}, got {n_cols}")
    blocks = scores.reshape(n_rows, n_cols // m, m)
    idx = torch.topk(blocks, n, dim=2, largest=False).indices
    keep = keep.reshape(n_rows, n_cols // m, m).scatter_(2, idx, False)
    return keep.reshape(n_rows, n_cols)


@register_pass
class WandaPass(CompressionPass):
    name = "wanda"
    Config = WandaConfig
    base_needs = Needs(moments=True)

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[None, ModuleReport]:
        if stats is None:
            raise RuntimeError("wanda needs calibration statistics")
        cfg: WandaConfig = self.config_for(name)  # type: ignore[assignment]
        w = linear.weight.data
        original = w.clone()
        keep = wanda_mask(wanda_scores(w, stats.sq_norm), cfg.sparsity, cfg.pattern)
        if state.mask is not None:  # pruned twice: what an earlier pass removed stays removed
            keep &= state.mask
        w.mul_(keep.to(w.dtype))
        state.mask = keep
        return None, {
            "sparsity": float(1.0 - keep.float().mean()),
            "pattern": cfg.pattern,
            "rel_error": weight_error(original, w),
        }
