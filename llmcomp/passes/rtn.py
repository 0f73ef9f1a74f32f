"""Plain round-to-nearest weight quantization with a fixed group size: the baseline to beat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from llmcomp import intquant
from llmcomp.calibration import InputStats
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.passes.base import (
    CompressionPass,
    ModuleReport,
    ModuleState,
    PassConfig,
    register_pass,
    scale_bits,
    weight_error,
)


class RTNConfig(PassConfig):
    bits: Literal[2, 3, 4, 8] = 8
    group_size: int = Field(128, description="columns per scale group; -1 = one scale per output channel")
    symmetric: bool = True


@register_pass
class RTNPass(CompressionPass):
    """Min/max scales per group, round to nearest. Calibration-free."""

    name = "rtn"
    Config = RTNConfig

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[nn.Module, ModuleReport]:
        cfg: RTNConfig = self.config_for(name)  # type: ignore[assignment]
        w = linear.weight.detach()
        qw = intquant.quantize_rtn(w, cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype=w.dtype, mask=state.mask)
        module = QuantLinear.from_quantized(qw, linear.bias, dtype=w.dtype)
        report = {
            "bits": cfg.bits,
            "group_size": qw.group_size,
            "symmetric": cfg.symmetric,
            "bits_per_weight": intquant.storage_bits_per_weight(
                w.shape[1], qw.group_size, cfg.bits, not cfg.symmetric,
                scale_bits=scale_bits(w.dtype),
            ),
            "rel_error": weight_error(w, intquant.dequantize_qw(qw)),
            "numel": w.numel(),
        }
        return module, report
