"""Magnitude pruning: drop the weights with the smallest ``|W_ij|`` per output row.

The calibration-free baseline every sparsity paper compares against (and DSnoT's weakest initial
mask). Unstructured or N:M; no weight update; the mask goes into the module state like Wanda's.
"""

from __future__ import annotations

from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.passes.base import CompressionPass, ModuleReport, ModuleState, register_pass
from llmcomp.passes.sparsity_masks import SparsityConfig, apply_mask, honour_earlier, prune_mask


class MagnitudeConfig(SparsityConfig):
    pass


@register_pass
class MagnitudePass(CompressionPass):
    name = "magnitude"
    Config = MagnitudeConfig
    calibration_optional = True  # needs none at all

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[None, ModuleReport]:
        cfg: MagnitudeConfig = self.config_for(name)  # type: ignore[assignment]
        w = linear.weight.data
        original = w.clone()
        keep = prune_mask(honour_earlier(w.float().abs(), state), cfg.sparsity, cfg.pattern)
        if state.mask is not None:
            keep &= state.mask
        return None, apply_mask(linear, keep, state, cfg.pattern, original)
