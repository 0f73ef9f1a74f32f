"""Wanda pruning (Sun et al., 2023): drop the weights with the smallest ``|W_ij| * ||X_j||_2``.

Unstructured (a fixed fraction per output row) or N:M (N zeros in every M consecutive inputs).
No weight update; needs only the per-channel input norms from calibration data. The pruned
matrix stays a dense ``nn.Linear`` with zeros, and the keep-mask goes into the module's state, so a
later quantization pass keeps the pruned weights at exactly 0 (the report records the sparsity);
``sparse_store`` then stores it compressed.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.passes.base import CompressionPass, ModuleReport, ModuleState, Needs, register_pass
from llmcomp.passes.sparsity_masks import (
    NM_PATTERN,
    SparsityConfig,
    apply_mask,
    honour_earlier,
    prune_mask,
)

__all__ = ["NM_PATTERN", "WandaConfig", "WandaPass", "wanda_mask", "wanda_scores"]


class WandaConfig(SparsityConfig):
    pass


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return weight.float().abs() * sq_norm.float().sqrt().unsqueeze(0)


def wanda_mask(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Boolean keep-mask: lowest scores pruned per row, or per M-block for N:M."""
    return prune_mask(scores, sparsity, pattern)


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
        keep = prune_mask(honour_earlier(wanda_scores(w, stats.sq_norm), state), cfg.sparsity, cfg.pattern)
        if state.mask is not None:  # pruned twice: what an earlier pass removed stays removed
            keep &= state.mask
        return None, apply_mask(linear, keep, state, cfg.pattern, original)
