"""Pass ``codebook``: quantize linears to a codebook format (rf8, fp8-e4m3, fp8-e5m2, gg4, nf4).

Calibration-free. Per module: fit the GG shape (reported, and what the rf8 / gg4 tables are built
from), absmax scales per group, nearest-level codes, a :class:`CodebookLinear`. A sparsity mask
from an earlier pass is applied before encoding: tables with an exact zero (fp8, nf4) keep pruned
weights at zero; the others give them the level nearest to 0 (counted in the report's error).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from llmcomp import codebook, gg
from llmcomp.calibration import InputStats
from llmcomp.modules.codebook_linear import CodebookLinear
from llmcomp.passes.base import (
    CompressionPass,
    ModuleReport,
    ModuleState,
    PassConfig,
    register_pass,
    scale_bits,
    weight_error,
)

DEFAULT_GROUP = {8: -1, 4: 64}  # per channel for the 8-bit formats, groups of 64 for 4-bit


class CodebookConfig(PassConfig):
    format: Literal["rf8", "fp8-e4m3", "fp8-e5m2", "gg4", "nf4"] = Field(
        "rf8",
        description="rf8 / gg4: tables fitted to the weight's GG shape; fp8-*: torch float8; nf4: normal quantiles")
    group_size: int | None = Field(
        None, description="columns per scale group; -1 = per output channel; default: -1 for 8-bit, 64 for 4-bit")
    fit: Literal["gg", "data"] = Field(
        "gg", description="rf8/gg4 table: from the fitted GG shape (gg) or Lloyd-Max on this weight's values (data)")


@register_pass
class CodebookPass(CompressionPass):
    """Round each weight to the nearest level of a per-tensor table times a per-group absmax scale."""

    name = "codebook"
    Config = CodebookConfig

    def compress_module(self, name: str, linear: nn.Module, state: ModuleState,
                        stats: InputStats | None) -> tuple[nn.Module, ModuleReport]:
        cfg: CodebookConfig = self.config_for(name)  # type: ignore[assignment]
        w = linear.weight.detach()
        if state.mask is not None:
            w = w * state.mask.to(w.dtype)
        bits = codebook.FORMAT_BITS[cfg.format]
        group = cfg.group_size if cfg.group_size is not None else DEFAULT_GROUP[bits]
        codes, scale, table = codebook.quantize(w, cfg.format, group, cfg.fit, scale_dtype=w.dtype)
        module = CodebookLinear.from_codes(codes, scale, table, bits, group, linear.bias, w.dtype, fmt=cfg.format)
        n, k = w.shape
        report = {
            "format": cfg.format,
            "bits": bits,
            "group_size": module.group_size,
            "gg_shape": round(gg.fit(w).shape, 4),
            "bits_per_weight": codebook.bits_per_weight(k, module.group_size, bits, scale_bits(w.dtype),
                                                        table.numel(), n),
            "rel_error": weight_error(w, module.dequantized_weight()),
            "numel": w.numel(),
        }
        return module, report
