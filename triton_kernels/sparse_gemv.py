"""Sparse GEMV for activation sparsity (TEAL, WINA): read only the weight columns that matter.

At decode time most of ``x``'s entries can be dropped (TEAL: small ``|x_k|``; WINA: small
``|x_k| * ||W[:, k]||``). ``y = x[:, idx] @ W[:, idx].T`` then needs only the selected columns of
W, so the weights are stored transposed (row k of ``[K, N]`` = column k of W) and a selected
column is one contiguous read; int4 and other packed widths are packed along N here for the same
reason. The selection ``idx`` is shared by all M rows (use the union for M > 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from llmcomp import intquant
from llmcomp.kernels import triton_configs as tc
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors
from llmcomp.kernels.triton_gemm import ACT_DTYPES, dot_types, interpreting, jit_kernels

DENSE_BITS = 16  # marks unquantized weights (any float dtype)


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


def select_columns(x: torch.Tensor, keep: int, col_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int32, ascending) of the ``keep`` input columns with the largest score.

    Score = ``max over rows |x|`` (TEAL), times ``col_norms[k] = ||W[:, k]||`` when given (WINA).
    """
    score = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    if col_norms is not None:
        score = score * col_norms.to(score.device).float()
    keep = max(0, min(keep, score.numel()))
    return torch.topk(score, keep).indices.sort().values.to(torch.int32)


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
