"""Codebook (LUT) GEMM: weights are small unsigned codes looked up in a float table, times a scale.

``w[n, k] = lut[n or 0, code[n, k]] * scale[n, k // group_size]``. The table is per tensor
(``[2**bits]``) or per output row (``[N, 2**bits]``): per-row tables fit non-uniform quantizers
(k-means / SqueezeLLM-style) fitted row by row, per-tensor ones fit NF4-like fixed codebooks.
The per-group scale lets one shared codebook follow the local magnitude of each group.

Storage of the codes (before :func:`prepare_lut`): 8 bits as uint8 ``[N, K]``; fewer bits as
int32 ``[N, ceil(K / (32 // bits))]`` packed along K, lowest bits first, codes stored as is
(the integer layout of :mod:`llmcomp.intquant` without its signed offset). The GEMM itself is the
kernel of :mod:`llmcomp.kernels.triton_gemm` with its LUT switch on.

Through dispatch: :class:`~llmcomp.kernels.dispatch.CodebookLayout` (kind ``"codebook"``) runs on
:class:`TritonLutKernel` (``"triton_lut"``, CUDA priority list).
"""

from __future__ import annotations

from typing import Any

import torch

from llmcomp import intquant
from llmcomp.kernels import triton_configs as tc
from llmcomp.kernels.dispatch import CodebookLayout, CodebookTensors, check_codebook, register_kernel
from llmcomp.kernels.triton_gemm import PackedWeights, move_state, quant_matmul, runs_here

LUT_BITS = (2, 3, 4, 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` in ``[0, 2**bits)`` -> storage (uint8, or int32 packed along K)."""
    if bits not in LUT_BITS:
        raise ValueError(f"LUT codes must have one of {LUT_BITS} bits, got {bits}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits})")
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    return intquant.pack(c - 2 ** (bits - 1), bits)  # pack() stores q + 2**(bits-1), i.e. the code


def prepare_lut(
    codes: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor | None,
    bits: int,
    in_features: int,
    group_size: int = -1,
) -> PackedWeights:
    """Repack stored codes (see module doc), table and ``[N, groups]`` scales for :func:`lut_matmul`.

    ``scale=None`` means no scaling (a table that already holds the weight values).
    """
    if bits not in LUT_BITS:
        raise ValueError(f"LUT codes must have one of {LUT_BITS} bits, got {bits}")
    n = codes.shape[0]
    expected = intquant.packed_shape(n, in_features, bits)
    if tuple(codes.shape) != expected:
        raise ValueError(f"codes have shape {tuple(codes.shape)}, expected {expected}")
    entries = 2**bits
    if tuple(lut.shape) not in ((entries,), (n, entries)):
        raise ValueError(f"lut must be [{entries}] or [{n}, {entries}], got {tuple(lut.shape)}")
    table = lut.float().reshape(-1, entries)
    group = intquant.effective_group_size(group_size, in_features)
    groups = intquant.num_groups(in_features, group)
    if scale is None:
        scale = torch.ones(n, groups, device=codes.device)
    if tuple(scale.shape) != (n, groups):
        raise ValueError(f"scale must be [{n}, {groups}], got {tuple(scale.shape)}")
    weight = codes.to(torch.uint8 if bits == 8 else torch.int32).t().contiguous()
    return PackedWeights(
        weight=weight,
        scale=scale.float().t().contiguous(),
        zero=None,
        lut=table.contiguous(),
        out_features=n,
        in_features=in_features,
        bits=bits,
        group_size=group,
    )


def lut_matmul(
    x: torch.Tensor, w: PackedWeights, bias: torch.Tensor | None = None, config: tc.GemmConfig | None = None
) -> torch.Tensor:
    """``x @ (lut[code] * scale).T + bias`` for ``x`` of shape ``[..., K]``."""
    if w.lut is None:
        raise ValueError("weights were not prepared with prepare_lut")
    return quant_matmul(x, w, bias, config)


class TritonLutKernel:
    """Dispatch entry for the codebook GEMM (same device rules as the integer ``"triton"`` kernel)."""

    name = "triton_lut"
    kinds = frozenset({"codebook"})

    def can_implement(self, layout: CodebookLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return runs_here(device, dtype, layout.bits, LUT_BITS)

    def prepare(self, layout: CodebookLayout, tensors: CodebookTensors, dtype: torch.dtype) -> PackedWeights:
        check_codebook(layout, tensors)
        return prepare_lut(tensors.codes, tensors.lut, tensors.scale, layout.bits, layout.in_features,
                           layout.group_size)

    def apply(self, x: torch.Tensor, layout: CodebookLayout, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        move_state(state, x.device)
        return lut_matmul(x, state, bias)


def register() -> None:
    """Called by :func:`llmcomp.kernels.dispatch._load_builtin_kernels` (CUDA priority list)."""
    register_kernel(TritonLutKernel(), devices=("cuda",))
