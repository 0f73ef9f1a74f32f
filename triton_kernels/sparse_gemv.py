"""Sparse GEMV for activation sparsity (TEAL, WINA): read only the weight columns that matter.

At decode time most of ``x``'s entries can be dropped (TEAL: small ``|x_k|``; WINA: small
``|x_k| * ||W[:, k]||``). ``y = x[:, idx] @ W[:, idx].T`` then needs only the selected columns of
W, so the weights are stored transposed (row k of ``[K, N]`` = column k of W) and a selected
column is one contiguous read; int4 and other packed widths are packed along N here for the same
reason. The selection ``idx`` is shared by all M rows (use the union for M > 1).

Through dispatch: :class:`~llmcomp.kernels.dispatch.ActivationSparseLayout` (kind
``"activation_sparse"``) runs on :class:`TritonSparseGemvKernel` (``"triton_sparse_gemv"``, CUDA
priority list). It is meant for decode (small M): one selection per call, shared by its rows
(:func:`select_columns` scores a column by its max over the rows), exactly as the reference
kernel of that kind defines it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton

from llmcomp import intquant
from llmcomp.kernels import triton_configs as tc
from llmcomp.kernels.dispatch import (
    DENSE_BITS,
    ActivationSparseLayout,
    ActivationSparseTensors,
    QuantLayout,
    QuantTensors,
    column_norms,
    register_kernel,
    select_columns,
)
from llmcomp.kernels.triton_gemm import (
    ACT_DTYPES,
    INT_BITS,
    dot_types,
    interpreting,
    jit_kernels,
    move_state,
    runs_here,
)


@dataclass
class SparseWeights:
    """Weights laid out for :func:`sparse_matmul`.

    ``weight``: float ``[K, N]`` (dense), int8 ``[K, N]`` or int32 ``[K, ceil(N / (32 // bits))]``
    (packed along N, lowest bits first, stored as ``q + 2**(bits-1)``). ``scale``/``zero``: fp32
    ``[groups, N]`` (``zero`` includes the storage offset), ``None`` for dense weights.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    out_features: int
    in_features: int
    bits: int
    group_size: int

    def to(self, device: torch.device | str) -> SparseWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, weight=move(self.weight), scale=move(self.scale), zero=move(self.zero))


def prepare_sparse_dense(weight: torch.Tensor) -> SparseWeights:
    """A dense ``[N, K]`` fp16/bf16/fp32 weight -> transposed ``[K, N]``."""
    n, k = weight.shape
    return SparseWeights(weight.t().contiguous(), None, None, n, k, DENSE_BITS, k)


def prepare_sparse_quant(layout: QuantLayout, tensors: QuantTensors) -> SparseWeights:
    """Checkpoint tensors (layout of :mod:`llmcomp.intquant`) -> k-major, packed along N."""
    n, k, bits = layout.out_features, layout.in_features, layout.bits
    device = tensors.packed.device
    q = intquant.unpack(tensors.packed.cpu(), bits, k)  # int8 [N, K]; intquant's packers run on the CPU
    weight = q.t().contiguous() if bits == 8 else intquant.pack(q.t().contiguous(), bits)
    zero = None
    if tensors.zero is not None:
        offset = 0 if bits == 8 else 2 ** (bits - 1)
        zero = (tensors.zero.float() + offset).t().contiguous()
    group = intquant.effective_group_size(layout.group_size, k)
    scale = tensors.scale.float().t().contiguous()
    return SparseWeights(weight.to(device), scale, zero, n, k, bits, group)


def _as_indices(columns: torch.Tensor, k: int) -> torch.Tensor:
    if columns.dtype == torch.bool:
        if columns.shape != (k,):
            raise ValueError(f"a column mask must have shape [{k}], got {tuple(columns.shape)}")
        return columns.nonzero().flatten().to(torch.int32)
    if columns.dim() != 1 or columns.is_floating_point():
        raise ValueError("columns must be a 1-D integer index tensor or a boolean mask")
    return columns.to(torch.int32).contiguous()


def sparse_matmul(
    x: torch.Tensor, w: SparseWeights, columns: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x[..., idx] @ W[:, idx].T + bias``: only the selected columns (indices or bool mask [K])."""
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"activations must be fp16/bf16/fp32, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {w.in_features}")
    if x.device != w.weight.device:
        raise ValueError(f"x is on {x.device} but the weights are on {w.weight.device}")
    idx = _as_indices(columns, w.in_features).to(x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, nnz = x2.shape[0], w.out_features, idx.numel()
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32).contiguous()
    if m == 0 or nnz == 0:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device) + (0 if b is None else b)
        return y.to(x.dtype).reshape(*lead, n)

    on_cuda = x.device.type == "cuda" and not interpreting()
    block_m = 16 if m <= tc.DECODE_MAX_M else 32
    block_n, block_k = (64, 64) if on_cuda else (32, 32)
    tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
    k_blocks = math.ceil(nnz / block_k)
    if on_cuda:
        want = tc.WAVES * tc.num_sms(x.device) // tiles
        split = max(1, min(want, k_blocks // tc.MIN_K_BLOCKS_PER_SPLIT, tc.MAX_SPLIT_K))
    else:
        split = min(2, k_blocks)
    per_split = triton.cdiv(k_blocks, split) * block_k
    out_dtype = torch.float32 if split > 1 else x.dtype
    out = torch.empty((split, m, n), dtype=out_dtype, device=x.device)
    compute, precision = dot_types(x.dtype)
    dummy = w.scale if w.scale is not None else idx
    vpw = 32 // w.bits if w.bits < 8 else 1
    word_tile = w.bits < 8 and vpw & (vpw - 1) == 0 and block_n % vpw == 0
    jit_kernels().sparse_gemv_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)](
        x2, idx, w.weight, dummy, w.zero if w.zero is not None else dummy,
        b if b is not None else dummy, out,
        m, n, nnz, w.group_size, per_split,
        x2.stride(0), w.weight.stride(0), dummy.stride(0), out.stride(1), out.stride(0),
        BITS=w.bits, HAS_ZERO=w.zero is not None, HAS_BIAS=b is not None, WORD_TILE=word_tile,
        COMPUTE=compute, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    y = out.sum(dim=0).to(x.dtype) if split > 1 else out[0]
    return y.reshape(*lead, n)


@dataclass
class SparseState:
    """What :class:`TritonSparseGemvKernel` prepares: the weights and, for wina, the column norms."""

    weights: SparseWeights
    col_norms: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.weights.weight.device

    def to(self, device: torch.device | str) -> SparseState:
        norms = None if self.col_norms is None else self.col_norms.to(device)
        return SparseState(self.weights.to(device), norms)


class TritonSparseGemvKernel:
    """Dispatch entry for the sparse GEMV: select ``layout.keep`` columns per call, read only those.

    Meant for decode (M small): for M > 1 the rows of one call share one selection (see
    :class:`~llmcomp.kernels.dispatch.ActivationSparseLayout`), so the work grows with the union.
    """

    name = "triton_sparse_gemv"
    kinds = frozenset({"activation_sparse"})

    def can_implement(self, layout: ActivationSparseLayout, device: torch.device, dtype: torch.dtype):
        return runs_here(device, dtype, layout.bits, (*INT_BITS, DENSE_BITS))

    def prepare(self, layout: ActivationSparseLayout, tensors: ActivationSparseTensors, dtype: torch.dtype):
        if layout.dense:
            weights = prepare_sparse_dense(tensors.base.to(dtype))  # same rounding of W as the reference
        else:
            weights = prepare_sparse_quant(layout.base, tensors.base)
        return SparseState(weights, column_norms(layout, tensors))

    def apply(self, x: torch.Tensor, layout: ActivationSparseLayout, state: Any, bias: torch.Tensor | None):
        move_state(state, x.device)
        idx = select_columns(x, layout.keep, state.col_norms)
        return sparse_matmul(x, state.weights, idx, bias)


def register() -> None:
    """Called by :func:`llmcomp.kernels.dispatch._load_builtin_kernels` (CUDA priority list)."""
    register_kernel(TritonSparseGemvKernel(), devices=("cuda",))
