"""``CodebookLinear``: the ``codebook`` module kind (RF8, FP8 E4M3 / E5M2, gg4, NF4-style).

``w[n, k] = weight_lut[code[n, k]] * weight_scale[n, k // group_size]``. Buffers (= the checkpoint
tensors, docs/FORMAT.md): ``weight_packed`` (uint8 ``[N, K]`` for 8-bit codes, int32
``[N, ceil(K / (32 // bits))]`` packed along K for fewer bits), ``weight_scale`` ``[N, groups]``
(model float dtype), ``weight_lut`` float32 ``[2**bits]`` (or ``[N, 2**bits]`` with
``per_row_table``), ``weight_shape``. The matmul goes through kernel dispatch
(:class:`~llmcomp.kernels.dispatch.CodebookLayout`): the Triton LUT GEMM on CUDA, the CPU
codebook kernel on the CPU, the reference kernel anywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from llmcomp import codebook, intquant
from llmcomp.kernels.dispatch import CodebookLayout, CodebookTensors, codebook_weight
from llmcomp.modules.kernel_module import KernelLinear
from llmcomp.modules.registry import register_module
from llmcomp.scheme import ModuleSpec, register_spec, spec_kinds

FORMAT_LABELS = (*codebook.FORMATS, "custom")


class CodebookSpec(ModuleSpec):
    """Codes into a float table times a per-group scale. ``format`` only names where the table
    came from (rf8, fp8-e4m3, fp8-e5m2, gg4, nf4, custom): readers use the stored table."""

    kind: Literal["codebook"] = "codebook"
    bits: Literal[2, 3, 4, 8]
    group_size: int = Field(gt=0, description="effective group length along K (in_features = per channel)")
    per_row_table: bool = False
    format: Literal["rf8", "fp8-e4m3", "fp8-e5m2", "gg4", "nf4", "custom"] = "custom"

    @model_validator(mode="after")
    def _group_fits(self) -> CodebookSpec:
        if self.group_size > self.in_features:
            raise ValueError(f"group_size {self.group_size} exceeds in_features {self.in_features}")
        return self


if "codebook" not in spec_kinds():
    register_spec(CodebookSpec)


@register_module("codebook")
class CodebookLinear(KernelLinear):
    """Weight-only codebook linear layer (8-bit or packed 2/3/4-bit codes, one table, group scales)."""

    kind = "codebook"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, per_row_table: bool = False, fmt: str = "custom",
                 scale_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = intquant.effective_group_size(group_size, in_features)
        self.per_row_table, self.format = per_row_table, fmt
        groups = intquant.num_groups(in_features, self.group_size)
        codes_dtype = torch.uint8 if bits == 8 else torch.int32
        self.register_buffer("weight_packed",
                             torch.zeros(intquant.packed_shape(out_features, in_features, bits), dtype=codes_dtype))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype or dtype))
        lut_shape = (out_features, 2**bits) if per_row_table else (2**bits,)
        self.register_buffer("weight_lut", torch.zeros(lut_shape, dtype=torch.float32))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, bits: int, group_size: int,
                   bias: torch.Tensor | None, dtype: torch.dtype, fmt: str = "custom") -> CodebookLinear:
        """Build from unsigned codes ``[N, K]``, scales ``[N, groups]`` and a table (what passes produce)."""
        n, k = codes.shape
        per_row = table.dim() == 2
        mod = cls(k, n, bits, group_size, bias=bias is not None, dtype=dtype, per_row_table=per_row, fmt=fmt,
                  scale_dtype=scale.dtype if scale.dtype.is_floating_point else dtype)
        mod.weight_packed.copy_(codebook.pack_codes(codes, bits))
        mod.weight_scale.copy_(scale.to(mod.weight_scale.dtype))
        mod.weight_lut.copy_(table.float())
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(dtype))
        return mod

    @classmethod
    def from_spec(cls, spec: CodebookSpec, dtype: torch.dtype) -> CodebookLinear:
        return cls(spec.in_features, spec.out_features, spec.bits, spec.group_size, bias=spec.bias, dtype=dtype,
                   per_row_table=spec.per_row_table, fmt=spec.format)

    def spec(self) -> CodebookSpec:
        return CodebookSpec(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                            bits=self.bits, group_size=self.group_size, per_row_table=self.per_row_table,
                            format=self.format)

    # -- execution ----------------------------------------------------------------------------
    @property
    def layout(self) -> CodebookLayout:
        return CodebookLayout(self.out_features, self.in_features, self.bits, self.group_size, self.per_row_table)

    def kernel_tensors(self) -> CodebookTensors:
        return CodebookTensors(self.weight_packed, self.weight_lut, self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return codebook_weight(self.layout, self.kernel_tensors(), dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
