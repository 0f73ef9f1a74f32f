"""Integer group quantization primitives shared by passes, modules, kernels and exporters.

Conventions (the single contract every consumer relies on; docs/FORMAT.md restates it):

* A weight ``W`` of shape ``[N, K]`` (out_features, in_features) is split along K into groups of
  ``group_size`` consecutive columns. ``group_size == -1`` (or ``>= K``) means one group per row
  (per-channel). When ``group_size`` does not divide K the last group is shorter: there are
  ``ceil(K / group_size)`` groups and column ``k`` uses group ``k // group_size``.
* Quantized values ``q`` are **signed** integers in ``[-2**(b-1), 2**(b-1) - 1]``.
  Dequantization is ``w = (q - z) * s`` with a per-(row, group) scale ``s`` and, for asymmetric
  schemes, a signed integer zero point ``z`` in the same range (``z = 0`` when symmetric).
* Storage: ``bits == 8`` keeps ``q`` as an ``int8 [N, K]`` tensor. ``bits < 8`` packs
  ``32 // bits`` values per ``int32`` word along K, lowest bits first, each value stored as the
  unsigned ``q + 2**(b-1)``; the packed tensor is ``int32 [N, ceil(K / (32 // bits))]`` and padding
  values are zero (unsigned), i.e. they unpack to ``-2**(b-1)`` and are cut by ``weight_shape``.
  For 4 bits this is exactly compressed-tensors' ``pack-quantized`` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def values_per_word(bits: int) -> int:
    """How many ``bits``-wide values one int32 word holds (8-bit values are not packed)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; allowed: {SUPPORTED_BITS}")
    return 1 if bits == 8 else 32 // bits


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range ``(qmin, qmax)`` of a ``bits``-wide value."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def effective_group_size(group_size: int, in_features: int) -> int:
    """Resolve ``-1`` (per-channel) and oversized groups to the real group length."""
    if group_size == -1 or group_size >= in_features:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / effective_group_size(group_size, in_features))


@dataclass
class QuantizedWeight:
    """A quantized matrix in unpacked form: ``q`` int8 ``[N, K]``, scales/zeros ``[N, groups]``."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int  # effective group length (never -1)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def _expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeat a ``[N, groups]`` tensor along K so it lines up with a ``[N, K]`` matrix."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def _grouped_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, groups, group_size]``, padding the short last group by repetition."""
    n, k = w.shape
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    if pad:
        # Repeat the last column: padding must not widen the last group's range.
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, groups, group_size)


def minmax_scales(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales (and zero points) from each group's min/max, in float32."""
    k = w.shape[1]
    g = effective_group_size(group_size, k)
    wg = _grouped_view(w.float(), g)
    qmin, qmax = qrange(bits)
    if symmetric:
        absmax = wg.abs().amax(dim=-1)
        scale = absmax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, None
    wmin = wg.amin(dim=-1).clamp(max=0.0)
    wmax = wg.amax(dim=-1).clamp(min=0.0)
    scale = (wmax - wmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(qmin - wmin / scale).clamp(qmin, qmax)
    return scale, zero


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> QuantizedWeight:
    """Quantize ``w`` with given per-group scales/zeros: ``q = clamp(round(w / s) + z)``."""
    k = w.shape[1]
    g = effective_group_size(group_size, k)
    qmin, qmax = qrange(bits)
    s = _expand_groups(scale.float(), g, k)
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + _expand_groups(zero.float(), g, k)
    q = q.clamp(qmin, qmax).to(torch.int8)
    zero_i8 = None if zero is None else zero.round().clamp(qmin, qmax).to(torch.int8)
    return QuantizedWeight(q=q, scale=scale.float(), zero=zero_i8, bits=bits, group_size=g)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, scale_dtype: torch.dtype | None = None,
    mask: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Plain round-to-nearest group quantization with min/max scales.

    ``scale_dtype``: the dtype scales will be stored in; codes are chosen against the rounded
    scales so storage does not add error on top of quantization. ``mask`` (True = kept): pruned
    weights (zeros in ``w``) keep decoding to exactly 0. The min/max range includes 0 anyway, so
    pruned zeros do not change it.
    """
    scale, zero = minmax_scales(w, bits, group_size, symmetric)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    qw = quantize_with(w, scale, zero, bits, group_size)
    return qw if mask is None else apply_mask(qw, mask)


def apply_mask(qw: QuantizedWeight, mask: torch.Tensor) -> QuantizedWeight:
    """Set the codes of pruned weights (``mask`` False) to their group's zero point, so they
    dequantize to exactly 0 whatever the scale: a sparsity mask survives quantization."""
    k = qw.q.shape[1]
    zero = torch.zeros_like(qw.q) if qw.zero is None else _expand_groups(qw.zero, qw.group_size, k).to(qw.q.dtype)
    q = torch.where(mask.to(torch.bool), qw.q, zero)
    return QuantizedWeight(q=q, scale=qw.scale, zero=qw.zero, bits=qw.bits, group_size=qw.group_size)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - z) * s`` back to a dense ``[N, K]`` matrix (computed in float32)."""
    k = q.shape[1]
    g = effective_group_size(group_size, k)
    w = q.float()
    if zero is not None:
        w = w - _expand_groups(zero.float(), g, k)
    return (w * _expand_groups(scale.float(), g, k)).to(dtype)


def dequantize_qw(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize(qw.q, qw.scale, qw.zero, qw.group_size, dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``q`` (int8 ``[N, K]``) into the storage layout described in the module doc."""
    values_per_word(bits)  # validates bits
    if bits == 8:
        return q.to(torch.int8).contiguous()
    return pack_words(q, bits)


def pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``32 // bits`` signed values per int32 word along K (unsigned ``q + 2**(bits-1)``,
    lowest bits first, zero padding). Also used with ``bits == 8`` by exporters whose format
    packs 8-bit values too."""
    vpw = 32 // bits
    n, k = q.shape
    words = math.ceil(k / vpw)
    u = (q.to(torch.int64) + 2 ** (bits - 1)).clamp(0, 2**bits - 1)
    pad = words * vpw - k
    if pad:
        u = torch.cat([u, torch.zeros(n, pad, dtype=torch.int64)], dim=1)
    u = u.reshape(n, words, vpw)
    shifts = torch.arange(vpw, dtype=torch.int64) * bits
    packed = (u << shifts).sum(dim=-1)
    # Reinterpret the low 32 bits as a signed int32 word.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32).contiguous()


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: signed int8 ``[N, in_features]``."""
    vpw = values_per_word(bits)
    if bits == 8:
        return packed.to(torch.int8)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(vpw, dtype=torch.int64) * bits
    u = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    u = u.reshape(packed.shape[0], -1)[:, :in_features]
    return (u - 2 ** (bits - 1)).to(torch.int8)


def packed_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    vpw = values_per_word(bits)
    return out_features, math.ceil(in_features / vpw)


def storage_bits_per_weight(
    in_features: int, group_size: int, bits: int, asymmetric: bool, scale_bits: int = 16
) -> float:
    """Average stored bits per weight, counting packing waste, scales and zero points."""
    vpw = values_per_word(bits)
    words_bits = math.ceil(in_features / vpw) * (8 if bits == 8 else 32)
    groups = num_groups(in_features, group_size)
    meta = groups * (scale_bits + (8 if asymmetric else 0))
    return (words_bits + meta) / in_features
