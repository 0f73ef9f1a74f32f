"""Stored-sparse linear layers: the checkpoint shrinks with sparsity, decoding is exact.

Three kinds (layouts in docs/FORMAT.md and docs/SPARSITY.md):

* ``sparse_bitmask``: one bit per weight (``weight_bitmask``, row-major, bit ``j % 8`` of byte
  ``j // 8``) plus the kept values packed in row-major order (``weight_values``, ``nnz`` of them,
  recorded in the spec so the buffer shapes are known before loading); 1 + 16 (1 - s) bits per
  bf16 weight, below dense from 6% sparsity on.
* ``sparse_2of4``: exactly 2 kept of every 4 inputs; ``weight_values [out, in/2]`` and 2-bit
  positions inside each block (``weight_meta``, two blocks per byte), the metadata layout of 2:4
  sparse tensor cores and the one a gather kernel reads directly.
* ``sparse_int_affine``: the bitmask plus the kept weights' integer codes (2/4/8 bits, packed
  flat) and the group scales / zero points of the dense layout: sparsity stacked with int4, the
  pruned weights decoding to exactly 0 by construction.

Execution is dense by default: the weight is materialized once per (device, dtype) and cached;
:mod:`llmcomp.kernels.sparse_cpu` holds the measured CPU sparse path (docs/SPARSITY.md).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from llmcomp import intquant
from llmcomp.modules.registry import register_module
from llmcomp.scheme import ModuleSpec, register_spec

BITS_PER_BYTE = 8
CODE_BITS = (2, 4, 8)  # code widths that pack evenly into bytes
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(BITS_PER_BYTE)], dtype=torch.uint8)


# -- packing --------------------------------------------------------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[rows, cols]`` -> uint8 ``[rows, ceil(cols/8)]`` (bit ``j % 8`` of byte ``j // 8``)."""
    rows, cols = mask.shape
    padded = F.pad(mask.to(torch.uint8), (0, (-cols) % BITS_PER_BYTE)).reshape(rows, -1, BITS_PER_BYTE)
    return (padded * _BIT_WEIGHTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2**bits), flat -> uint8 bytes, ``8 // bits`` codes per byte, low bits first."""
    per = BITS_PER_BYTE // bits
    c = F.pad(codes.to(torch.uint8).reshape(-1), (0, (-codes.numel()) % per)).reshape(-1, per)
    shifts = torch.tensor([bits * i for i in range(per)], dtype=torch.uint8, device=c.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = BITS_PER_BYTE // bits
    shifts = torch.tensor([bits * i for i in range(per)], dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


# -- specs ----------------------------------------------------------------------------------------
class _NnzSpec(ModuleSpec):
    nnz: int = Field(ge=0, description="number of kept (stored) weights")

    @model_validator(mode="after")
    def _nnz_fits(self) -> _NnzSpec:
        if self.nnz > self.in_features * self.out_features:
            raise ValueError(f"nnz {self.nnz} exceeds out_features * in_features")
        return self


@register_spec
class SparseBitmaskSpec(_NnzSpec):
    """Unstructured sparsity: bitmask + packed kept values."""

    kind: Literal["sparse_bitmask"] = "sparse_bitmask"


@register_spec
class Sparse2of4Spec(ModuleSpec):
    """2:4 sparsity: half the values plus 2-bit positions."""

    kind: Literal["sparse_2of4"] = "sparse_2of4"

    @model_validator(mode="after")
    def _blocks(self) -> Sparse2of4Spec:
        if self.in_features % 4:
            raise ValueError(f"in_features {self.in_features} is not a multiple of 4")
        return self


@register_spec
class SparseIntAffineSpec(_NnzSpec):
    """Sparse + integer codes: bitmask, kept codes, and the dense layout's group scales."""

    kind: Literal["sparse_int_affine"] = "sparse_int_affine"
    bits: Literal[2, 4, 8]
    group_size: int = Field(gt=0)
    symmetric: bool

    @model_validator(mode="after")
    def _group_fits(self) -> SparseIntAffineSpec:
        if self.group_size > self.in_features:
            raise ValueError(f"group_size {self.group_size} exceeds in_features {self.in_features}")
        return self


# -- modules --------------------------------------------------------------------------------------
class _CachedDense(nn.Module):
    """Forward through the dense weight, materialized once per (device, dtype, buffer contents)."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def _init_common(self, spec: ModuleSpec, dtype: torch.dtype) -> None:
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.register_buffer("weight_shape", torch.tensor([spec.out_features, spec.in_features], dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=dtype), requires_grad=False) if spec.bias \
            else None
        self._dense: tuple[Any, torch.Tensor] | None = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _key(self, x: torch.Tensor) -> tuple:
        return (x.device, x.dtype, *((b.data_ptr(), b._version) for b in self.buffers()))

    def dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        if self._dense is None or self._dense[0] != key:
            with torch.no_grad():
                self._dense = (key, self.dequantized_weight(x.dtype).to(x.device))
        return self._dense[1]

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        self._dense = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llmcomp.kernels import sparse_cpu

        if sparse_cpu.wants(self, x):
            return sparse_cpu.apply(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x), bias)

    @property
    def nnz(self) -> int:
        """Stored (kept) weights."""
        return int(getattr(self, "_nnz", self.out_features * self.in_features // 2))

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, " \
               f"bias={self.bias is not None}"


def _copy_bias(module: _CachedDense, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    if bias is not None:
        module.bias.data.copy_(bias.detach().to(dtype))


@register_module("sparse_bitmask")
class SparseLinear(_CachedDense):
    """Unstructured sparse weights: bitmask + row-major kept values."""

    kind = "sparse_bitmask"

    def __init__(self, spec: SparseBitmaskSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._init_common(spec, dtype)
        self._nnz = spec.nnz
        cols = -(-spec.in_features // BITS_PER_BYTE)
        self.register_buffer("weight_bitmask", torch.zeros(spec.out_features, cols, dtype=torch.uint8))
        self.register_buffer("weight_values", torch.zeros(spec.nnz, dtype=dtype))

    @classmethod
    def from_spec(cls, spec: SparseBitmaskSpec, dtype: torch.dtype) -> SparseLinear:
        return cls(spec, dtype)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> SparseLinear:
        dtype = dtype or weight.dtype
        keep = keep.to(torch.bool)
        spec = SparseBitmaskSpec(in_features=weight.shape[1], out_features=weight.shape[0], bias=bias is not None,
                                 nnz=int(keep.sum()))
        mod = cls(spec, dtype)
        mod.weight_bitmask.copy_(pack_bits(keep))
        mod.weight_values.copy_(weight.detach()[keep].to(dtype))
        _copy_bias(mod, bias, dtype)
        return mod

    def spec(self) -> SparseBitmaskSpec:
        return SparseBitmaskSpec(in_features=self.in_features, out_features=self.out_features,
                                 bias=self.bias is not None, nnz=self._nnz)

    def keep_mask(self) -> torch.Tensor:
        return unpack_bits(self.weight_bitmask, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.weight_values.device)
        w[self.keep_mask()] = self.weight_values.to(dtype)
        return w


@register_module("sparse_2of4")
class Sparse2of4Linear(_CachedDense):
    """2:4 sparse weights: ``weight_values [out, in/2]`` + 2-bit in-block positions."""

    kind = "sparse_2of4"
    BLOCK = 4

    def __init__(self, spec: Sparse2of4Spec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._init_common(spec, dtype)
        blocks = spec.in_features // self.BLOCK
        self.register_buffer("weight_values", torch.zeros(spec.out_features, blocks * 2, dtype=dtype))
        self.register_buffer("weight_meta", torch.zeros(spec.out_features, -(-blocks // 2), dtype=torch.uint8))

    @classmethod
    def from_spec(cls, spec: Sparse2of4Spec, dtype: torch.dtype) -> Sparse2of4Linear:
        return cls(spec, dtype)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> Sparse2of4Linear:
        dtype = dtype or weight.dtype
        out, k = weight.shape
        keep4 = keep.to(torch.bool).reshape(out, k // cls.BLOCK, cls.BLOCK)
        if not bool((keep4.sum(-1) == 2).all()):
            raise ValueError("mask is not exactly 2:4 (2 kept in every block of 4 inputs)")
        slots = torch.arange(cls.BLOCK, device=keep.device).expand_as(keep4)
        idx = torch.where(keep4, slots, cls.BLOCK).sort(-1).values[..., :2]  # the two kept slots, ascending
        mod = cls(Sparse2of4Spec(in_features=k, out_features=out, bias=bias is not None), dtype)
        vals = torch.gather(weight.detach().reshape(out, k // cls.BLOCK, cls.BLOCK), -1, idx)
        mod.weight_values.copy_(vals.reshape(out, -1).to(dtype))
        mod.weight_meta.copy_(pack_codes(idx.reshape(-1), 2).reshape(out, -1))
        _copy_bias(mod, bias, dtype)
        return mod

    def spec(self) -> Sparse2of4Spec:
        return Sparse2of4Spec(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None)

    def positions(self) -> torch.Tensor:
        """Column index of every stored value, ``[out, in/2]`` int64."""
        blocks = self.in_features // self.BLOCK
        slots = unpack_codes(self.weight_meta, 2, self.weight_meta.numel() * 4)
        slots = slots.reshape(self.out_features, -1)[:, : blocks * 2].long()
        base = torch.arange(blocks, device=slots.device).repeat_interleave(2) * self.BLOCK
        return slots + base.unsqueeze(0)

    def keep_mask(self) -> torch.Tensor:
        keep = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.weight_meta.device)
        return keep.scatter_(1, self.positions(), True)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.weight_values.device)
        return w.scatter_(1, self.positions(), self.weight_values.to(dtype))


@register_module("sparse_int_affine")
class SparseQuantLinear(_CachedDense):
    """Sparse + integer codes: bitmask, packed kept codes, group scales (and zero points)."""

    kind = "sparse_int_affine"

    def __init__(self, spec: SparseIntAffineSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._init_common(spec, dtype)
        self._nnz, self.bits, self.group_size, self.symmetric = spec.nnz, spec.bits, spec.group_size, spec.symmetric
        groups = intquant.num_groups(spec.in_features, spec.group_size)
        cols = -(-spec.in_features // BITS_PER_BYTE)
        self.register_buffer("weight_bitmask", torch.zeros(spec.out_features, cols, dtype=torch.uint8))
        per = BITS_PER_BYTE // spec.bits
        self.register_buffer("weight_packed", torch.zeros(-(-spec.nnz // per), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(spec.out_features, groups, dtype=dtype))
        if spec.symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(spec.out_features, groups, dtype=torch.int8))

    @classmethod
    def from_spec(cls, spec: SparseIntAffineSpec, dtype: torch.dtype) -> SparseQuantLinear:
        return cls(spec, dtype)

    @classmethod
    def from_quant_linear(cls, qlinear: nn.Module, keep: torch.Tensor) -> SparseQuantLinear:
        """From a :class:`~llmcomp.modules.quant_linear.QuantLinear` whose pruned weights are 0."""
        if qlinear.bits not in CODE_BITS:
            raise ValueError(f"sparse_int_affine stores {CODE_BITS}-bit codes, not {qlinear.bits}")
        keep = keep.to(torch.bool)
        dtype = qlinear.weight_scale.dtype
        spec = SparseIntAffineSpec(in_features=qlinear.in_features, out_features=qlinear.out_features,
                                   bias=qlinear.bias is not None, nnz=int(keep.sum()), bits=qlinear.bits,
                                   group_size=qlinear.group_size, symmetric=qlinear.symmetric)
        mod = cls(spec, dtype)
        q = intquant.unpack(qlinear.weight_packed, qlinear.bits, qlinear.in_features)
        qmin, _ = intquant.qrange(qlinear.bits)
        mod.weight_bitmask.copy_(pack_bits(keep))
        mod.weight_packed.copy_(pack_codes((q[keep].to(torch.int16) - qmin).to(torch.uint8), qlinear.bits))
        mod.weight_scale.copy_(qlinear.weight_scale)
        if not qlinear.symmetric:
            mod.weight_zero_point.copy_(qlinear.weight_zero_point)
        _copy_bias(mod, qlinear.bias, qlinear.bias.dtype if qlinear.bias is not None else dtype)
        return mod

    def spec(self) -> SparseIntAffineSpec:
        return SparseIntAffineSpec(in_features=self.in_features, out_features=self.out_features,
                                   bias=self.bias is not None, nnz=self._nnz, bits=self.bits,
                                   group_size=self.group_size, symmetric=self.symmetric)

    def keep_mask(self) -> torch.Tensor:
        return unpack_bits(self.weight_bitmask, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - z) * s`` at the kept positions in float32, exactly as ``QuantLinear`` decodes; 0 elsewhere."""
        rows, cols = self.keep_mask().nonzero(as_tuple=True)
        qmin, _ = intquant.qrange(self.bits)
        q = unpack_codes(self.weight_packed, self.bits, self._nnz).float() + qmin
        group = cols // self.group_size
        if self.weight_zero_point is not None:
            q = q - self.weight_zero_point[rows, group].float()
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.weight_packed.device)
        w[rows, cols] = (q * self.weight_scale[rows, group].float()).to(dtype)
        return w

    def bits_per_weight(self) -> float:
        groups = self.weight_scale.shape[1]
        scale_bits = torch.finfo(self.weight_scale.dtype).bits * groups
        zero_bits = 0 if self.symmetric else BITS_PER_BYTE * groups
        mask_bits = self.in_features  # one bit per weight of the row
        return (self.out_features * (mask_bits + scale_bits + zero_bits) + self._nnz * self.bits) / (
            self.out_features * self.in_features)
