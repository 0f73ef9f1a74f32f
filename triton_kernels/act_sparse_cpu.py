"""A lean batch-1 CPU path for activation sparsity (kind ``activation_sparse``): ``cpu_sparse_bag``.

Why another kernel next to ``cpu_sparse_gather``: at batch 1 a decode step makes ~200 of these
calls on a small model, so the fixed cost per call decides whether skipping half the weight
columns pays. This one does the least: score (float32), ``topk``, gather the kept inputs, one
``embedding_bag`` over the kept rows of a transposed ``[K, N]`` copy of W (so it reads only
those rows), no sort and no split of N when torch runs one thread. Same selection and semantics
as the reference kernel (:class:`~llmcomp.kernels.dispatch.ActivationSparseLayout`); several rows
(prefill) fall back to gathering the kept rows once and one GEMM.

An int_affine base is dequantized once into the transposed copy (the activation dtype): at
density d it reads ``2 d`` bytes per weight in bf16, so it beats an int4 dense kernel only at
high sparsity; a packed-int4 gather would need a native kernel (docs/ACTIVATION_SPARSITY.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmcomp.kernels.cpu import _cpu_and_dtype, fresh_copy
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    column_norms,
    register_kernel,
    sparse_base_weight,
)

BAG_SPLITS = (8, 4, 2, 1)  # with several threads, N is cut so the bags run in parallel


@dataclass
class _BagState:
    weight_t: torch.Tensor  # [K, N] in the activation dtype (row k = column k of W)
    col_norms: torch.Tensor | None  # float32 [K] (wina) or None (teal)
    parts: int  # N cut into this many bags (chosen at prepare from the thread count: no call in the graph)
    part_offsets: torch.Tensor  # int64 [parts, 1]


class SparseBagCpuKernel:
    """activation_sparse on CPU, tuned for one row per call (decode)."""

    name = "cpu_sparse_bag"
    kinds = frozenset({"activation_sparse"})

    def can_implement(self, layout: ActivationSparseLayout, device: torch.device, dtype: torch.dtype):
        ok, reason = _cpu_and_dtype(device, dtype)
        if not ok:
            return ok, reason
        return True, ""

    def prepare(self, layout: ActivationSparseLayout, tensors: ActivationSparseTensors, dtype: torch.dtype):
        weight_t = fresh_copy(sparse_base_weight(layout, tensors, dtype).t())
        n = layout.out_features
        parts = 1 if torch.get_num_threads() == 1 else next(p for p in BAG_SPLITS if n % p == 0)
        return _BagState(weight_t, column_norms(layout, tensors), parts, torch.arange(parts)[:, None])

    def apply(self, x: torch.Tensor, layout: ActivationSparseLayout, state: _BagState, bias: torch.Tensor | None):
        lead, k, n = x.shape[:-1], layout.in_features, layout.out_features
        x2 = x.reshape(-1, k)
        score = x2.float().abs().amax(dim=0) if x2.shape[0] > 1 else x2[0].float().abs()
        if state.col_norms is not None:
            score = score * state.col_norms
        idx = torch.topk(score, layout.keep, sorted=False).indices
        if x2.shape[0] == 1:
            parts = state.parts
            xs = x2[0].index_select(0, idx)
            if parts == 1:
                out = F.embedding_bag(idx[None], state.weight_t, mode="sum", per_sample_weights=xs[None])
            else:
                rows = (idx * parts)[None] + state.part_offsets  # slice p of each kept row
                out = F.embedding_bag(rows, state.weight_t.view(-1, n // parts), mode="sum",
                                      per_sample_weights=xs[None].expand(parts, -1)).reshape(1, n)
        else:
            out = x2.index_select(1, idx) @ state.weight_t.index_select(0, idx)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*lead, n)


def register() -> None:
    """Called by the dispatcher: on the CPU list after ``cpu_sparse_gather`` (the generic default);
    :class:`~llmcomp.modules.activation_sparse.ActivationSparseLinear` asks for it by name at batch 1."""
    register_kernel(SparseBagCpuKernel(), devices=("cpu",), first=False)
    from llmcomp.kernels import act_sparse_packed  # packed int4/int8 gather (C, built on first use)

    act_sparse_packed.register()
