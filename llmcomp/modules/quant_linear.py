"""``QuantLinear``: a drop-in ``nn.Linear`` that runs integer-quantized weights.

Its buffers are exactly the checkpoint tensors (``weight_packed``, ``weight_scale``,
``weight_zero_point``, ``weight_shape``), so ``state_dict()`` is what gets saved and loading is a
plain ``load_state_dict``. The matmul goes through :func:`llmcomp.kernels.select_kernel`.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcomp import intquant
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors
from llmcomp.modules.kernel_module import KernelLinear
from llmcomp.modules.registry import register_module
from llmcomp.scheme import IntAffineSpec


@register_module("int_affine")
class QuantLinear(KernelLinear):
    """Weight-only quantized linear layer (int2/3/4/8, group-wise scales, optional zero points)."""

    kind = "int_affine"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool = True,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = intquant.effective_group_size(group_size, in_features)
        self.symmetric = symmetric
        groups = intquant.num_groups(in_features, self.group_size)
        packed_dtype = torch.int8 if bits == 8 else torch.int32
        self.register_buffer(
            "weight_packed", torch.zeros(intquant.packed_shape(out_features, in_features, bits), dtype=packed_dtype)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype or dtype))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8))
        else:
            self.weight_zero_point = None
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        qw: intquant.QuantizedWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> QuantLinear:
        """Build from an unpacked :class:`~llmcomp.intquant.QuantizedWeight` (what passes produce)."""
        n, k = qw.shape
        mod = cls(k, n, qw.bits, qw.group_size, symmetric=qw.zero is None, bias=bias is not None, dtype=dtype)
        mod.weight_packed.copy_(intquant.pack(qw.q, qw.bits))
        mod.weight_scale.copy_(qw.scale.to(mod.weight_scale.dtype))
        if qw.zero is not None:
            mod.weight_zero_point.copy_(qw.zero)
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(dtype))
        return mod

    @classmethod
    def from_spec(cls, spec: IntAffineSpec, dtype: torch.dtype) -> QuantLinear:
        return cls(spec.in_features, spec.out_features, spec.bits, spec.group_size, symmetric=spec.symmetric,
                   bias=spec.bias, dtype=dtype)

    def spec(self) -> IntAffineSpec:
        """The per-module entry of ``quantization_config.modules`` in config.json."""
        return IntAffineSpec(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                             bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    # -- execution ----------------------------------------------------------------------------
    @property
    def layout(self) -> QuantLayout:
        return QuantLayout(self.out_features, self.in_features, self.bits, self.group_size, self.symmetric)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = intquant.unpack(self.weight_packed, self.bits, self.in_features)
        return intquant.dequantize(q, self.weight_scale, self.weight_zero_point, self.group_size, dtype)

    def kernel_tensors(self) -> QuantTensors:
        return QuantTensors(self.weight_packed, self.weight_scale, self.weight_zero_point)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )
