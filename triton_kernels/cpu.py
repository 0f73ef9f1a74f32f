"""CPU fast paths for quantized linears, behind the :mod:`llmcomp.kernels.dispatch` contract.

* ``cpu_int4pack``: ``torch._weight_int4pack_mm_for_cpu`` (4-bit, any group size that is a
  multiple of 32/64/128/256 dividing K, per-channel included: scales are replicated onto the
  kernel's group grid). Its convention, checked against the float64 reference in the tests:
  ``w = (u - 8) * scale + zero`` with ``u`` the unsigned nibble, so our ``(q - z) * s`` maps to
  ``u = q + 8``, ``scale = s``, ``zero = -z * s``.
* ``cpu_int8pack``: ``torch._weight_int8pack_mm`` (8-bit, one scale per output channel; an
  asymmetric zero point becomes a rank-1 correction ``- sum(x) * z * s``). It is only fast for
  small M, so larger batches dequantize on the fly.

Alignment. On AVX-512 hosts the bf16 path of ``_weight_int8pack_mm`` uses aligned vector loads:
it segfaults when the int8 weight does not start on a 16-byte boundary or the activations on a
32-byte one, and when a row does not (K not a multiple of 16). Tensors read from safetensors sit
at arbitrary file offsets, so every ``prepare`` copies what it hands to a native op into fresh
storage (torch's CPU allocator aligns to 64 bytes), int8 weights are zero-padded to a multiple of
16 columns, and activations that are not 64-byte aligned are copied before the call.
* ``cpu_dense``: dequantize once, cache the dense weight in the activation dtype, ``F.linear``.
  Correct for everything (int2/3, group-wise int8, odd K, any N).

Activation sparsity (kind ``activation_sparse``):

* ``cpu_sparse_gather``: a transposed ``[K, N]`` dense copy of the weight (dequantized once for an
  int_affine base), of which only the selected rows are read: ``y = x[:, idx] @ Wt[idx]``. Up to
  ``SPARSE_BAG_MAX_M`` rows this is one ``F.embedding_bag`` (weighted sums of slices of the
  selected rows, no copy of them), so at batch 1 and density d it reads about d of the weight bytes; larger batches
  gather the selected rows once and run one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmcomp import intquant
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    QuantLayout,
    QuantTensors,
    column_norms,
    quant_weight,
    register_kernel,
    select_columns,
    sparse_base_weight,
)

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Activation dtypes for which torch's weight-only CPU ops take their vectorised path. On AVX2 hosts
# float32/float16 inputs hit a scalar fallback 10-50x slower than a dense GEMM (measured; see
# docs/FINEQUANT.md), so only bfloat16 is routed to them; LLMCOMP_KERNEL forces a kernel anyway.
FAST_ACT_DTYPES = (torch.bfloat16,)
INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes the torch int4 CPU kernel accepts
INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
INT4PACK_INNER_K_TILES = 1  # ignored by the CPU packer; part of the op's signature
INT8PACK_K_MULTIPLE = 16  # int8pack rows must start 16-byte aligned: K is zero-padded to this
NATIVE_ALIGN_BYTES = 64  # what torch's CPU allocator guarantees; native ops get nothing less
# Rows (tokens) up to which the weight-only int8 op is used; above it the weight is dequantized on
# the fly to float32 for one dense GEMM (PLATFORM-NOTES: on AVX-512 hosts int8pack is 2-3x faster
# than bf16 at M=1 but slower at M=64; float32 GEMM is the fast dense path on AVX2 hosts).
INT8PACK_MAX_M = 32
# Rows up to which the sparse gather runs as embedding_bag (reads only the selected rows, once per row);
# above it the selected rows are copied out once and one GEMM runs on them.
SPARSE_BAG_MAX_M = 4
SPARSE_BAG_SPLITS = (8, 4, 2, 1)  # N is cut into the largest of these that divides it (parallel bags)
INT_KINDS = frozenset({"int_affine"})


def _cpu_and_dtype(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"device {device.type} is not cpu"
    if dtype not in ACT_DTYPES:
        return False, f"activation dtype {dtype} not in {ACT_DTYPES}"
    return True, ""


def _fast_dtype(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    ok, reason = _cpu_and_dtype(device, dtype)
    if ok and dtype not in FAST_ACT_DTYPES:
        return False, f"torch's weight-only CPU op has no fast path for {dtype} activations"
    return ok, reason


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % NATIVE_ALIGN_BYTES == 0


def fresh_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` in newly allocated contiguous storage (64-byte aligned), never a view of a file buffer."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    if out.numel() and not is_aligned(out):  # the allocator's guarantee; fail loudly, never crash
        raise RuntimeError(f"torch allocated a tensor at {out.data_ptr():#x}, not {NATIVE_ALIGN_BYTES}-byte aligned")
    return out


def aligned_input(x: torch.Tensor) -> torch.Tensor:
    """Activations ready for a native op: contiguous and aligned (a copy only when they are not).

    While ``torch.compile`` traces, data pointers are unknown: copy unconditionally (inductor
    allocates aligned buffers and fuses the copy into the producer where it can).
    """
    if torch.compiler.is_compiling():
        return x.clone(memory_format=torch.contiguous_format)
    if x.is_contiguous() and is_aligned(x):
        return x
    return fresh_copy(x)


def int4pack_group(layout: QuantLayout) -> int | None:
    """The kernel group size our groups can be replicated onto, or None.

    A group of ``G`` columns (short last group included) maps onto kernel groups of ``g`` when
    ``g`` divides both ``G`` and ``K``: every group boundary is then a kernel-group boundary.
    """
    for g in INT4PACK_GROUPS:
        if layout.group_size % g == 0 and layout.in_features % g == 0:
            return g
    return None


# -- dense fallback -------------------------------------------------------------------------------
class DenseCpuKernel:
    """Dequantize once, keep the dense weight in the activation dtype: always correct."""

    name = "cpu_dense"
    kinds = INT_KINDS

    def supports_layout(self, layout: QuantLayout) -> tuple[bool, str]:
        return True, ""

    def can_implement(self, layout: QuantLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return _cpu_and_dtype(device, dtype)

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
        return quant_weight(layout, tensors, dtype)

    def apply(self, x: torch.Tensor, layout: QuantLayout, state: torch.Tensor, bias: torch.Tensor | None):
        return F.linear(x, state, None if bias is None else bias.to(x.dtype))


# -- int8 -----------------------------------------------------------------------------------------
@dataclass
class _Int8State:
    weight: torch.Tensor  # int8 [N, K + pad], fresh aligned storage, zero padding columns
    scale: torch.Tensor  # [N], activation dtype (the op requires it)
    zero_scale: torch.Tensor | None  # [N] float32, z * s (asymmetric only)
    scale_f32: torch.Tensor  # [N] for the dequantize path
    pad: int  # zero columns appended to K so every row starts 16-byte aligned


class Int8PackCpuKernel:
    """``torch._weight_int8pack_mm`` for per-channel int8; dequantize-and-GEMM for large M."""

    name = "cpu_int8pack"
    kinds = INT_KINDS

    def can_implement(self, layout: QuantLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        ok, reason = _fast_dtype(device, dtype)
        return (ok, reason) if not ok else self.supports_layout(layout)

    def supports_layout(self, layout: QuantLayout) -> tuple[bool, str]:
        if layout.bits != 8:
            return False, f"needs 8 bits, got {layout.bits}"
        if layout.group_size != layout.in_features:
            return False, f"needs one scale per output channel, got group size {layout.group_size}"
        if not hasattr(torch, "_weight_int8pack_mm"):
            return False, "torch._weight_int8pack_mm is missing from this torch build"
        return True, ""

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> _Int8State:
        scale = tensors.scale.float().reshape(-1)
        zs = None if tensors.zero is None else tensors.zero.float().reshape(-1) * scale
        k = layout.in_features
        pad = -k % INT8PACK_K_MULTIPLE
        weight = torch.zeros(layout.out_features, k + pad, dtype=torch.int8)  # fresh, aligned
        weight[:, :k] = tensors.packed.to(torch.int8)
        return _Int8State(weight, fresh_copy(scale.to(dtype)), zs, scale, pad)

    def apply(self, x: torch.Tensor, layout: QuantLayout, state: _Int8State, bias: torch.Tensor | None):
        x2, lead = _flatten(x)
        if x2.shape[0] <= INT8PACK_MAX_M:
            xa = F.pad(x2, (0, state.pad)) if state.pad else aligned_input(x2)  # F.pad allocates afresh
            out = torch._weight_int8pack_mm(xa, state.weight, state.scale)
        else:
            w = state.weight[:, : layout.in_features].float() * state.scale_f32.unsqueeze(1)
            out = F.linear(x2.float(), w).to(x.dtype)
        if state.zero_scale is not None:
            out = (out.float() - x2.float().sum(-1, keepdim=True) * state.zero_scale).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*lead, layout.out_features)


# -- int4 -----------------------------------------------------------------------------------------
@dataclass
class _Int4State:
    packed: torch.Tensor  # uint8, torch's CPU int4 layout
    group: int  # kernel group size
    scales_and_zeros: torch.Tensor  # [K / group, N, 2], activation dtype


class Int4PackCpuKernel:
    """``torch._weight_int4pack_mm_for_cpu`` for 4-bit weights (symmetric or asymmetric)."""

    name = "cpu_int4pack"
    kinds = INT_KINDS

    def can_implement(self, layout: QuantLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        ok, reason = _fast_dtype(device, dtype)
        return (ok, reason) if not ok else self.supports_layout(layout)

    def supports_layout(self, layout: QuantLayout) -> tuple[bool, str]:
        if layout.bits != 4:
            return False, f"needs 4 bits, got {layout.bits}"
        if layout.out_features % INT4PACK_N_MULTIPLE:
            return False, f"out_features {layout.out_features} is not a multiple of {INT4PACK_N_MULTIPLE}"
        if int4pack_group(layout) is None:
            return False, (
                f"group size {layout.group_size} and in_features {layout.in_features} share no kernel "
                f"group size in {INT4PACK_GROUPS}"
            )
        if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return False, "torch._weight_int4pack_mm_for_cpu is missing from this torch build"
        return True, ""

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> _Int4State:
        g = int4pack_group(layout)
        assert g is not None
        q = intquant.unpack(tensors.packed, 4, layout.in_features)
        u = (q.to(torch.int32) + 8).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(u, INT4PACK_INNER_K_TILES)
        # Replicate each of our groups onto the kernel's finer grid of K / g groups.
        kernel_groups = layout.in_features // g
        index = torch.arange(kernel_groups) * g // layout.group_size
        scale = tensors.scale.float()[:, index]  # [N, K/g]
        zero = torch.zeros_like(scale) if tensors.zero is None else -tensors.zero.float()[:, index] * scale
        sz = fresh_copy(torch.stack([scale.t(), zero.t()], dim=-1).to(dtype))
        return _Int4State(fresh_copy(packed), g, sz)

    def apply(self, x: torch.Tensor, layout: QuantLayout, state: _Int4State, bias: torch.Tensor | None):
        x2, lead = _flatten(x)
        out = torch._weight_int4pack_mm_for_cpu(aligned_input(x2), state.packed, state.group, state.scales_and_zeros)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*lead, layout.out_features)


# -- activation sparsity ----------------------------------------------------------------------------
@dataclass
class _SparseState:
    weight_t: torch.Tensor  # [K, N] dense copy in the activation dtype (row k = column k of W)
    col_norms: torch.Tensor | None  # float32 [K] for wina, None for teal


class SparseGatherCpuKernel:
    """activation_sparse on CPU: read only the selected rows of a transposed dense copy of W.

    Same selection as the reference (:class:`~llmcomp.kernels.dispatch.ActivationSparseLayout`):
    one ``select_columns`` per call, shared by its rows.
    """

    name = "cpu_sparse_gather"
    kinds = frozenset({"activation_sparse"})

    def can_implement(self, layout: ActivationSparseLayout, device: torch.device, dtype: torch.dtype):
        return _cpu_and_dtype(device, dtype)

    def prepare(self, layout: ActivationSparseLayout, tensors: ActivationSparseTensors, dtype: torch.dtype):
        weight_t = fresh_copy(sparse_base_weight(layout, tensors, dtype).t())
        return _SparseState(weight_t, column_norms(layout, tensors))

    def apply(self, x: torch.Tensor, layout: ActivationSparseLayout, state: _SparseState, bias: torch.Tensor | None):
        x2, lead = _flatten(x)
        m, keep = x2.shape[0], layout.keep
        idx = select_columns(x2, keep, state.col_norms).to(torch.int64)
        xs = x2.index_select(1, idx)  # [M, keep]
        if 0 < m <= SPARSE_BAG_MAX_M:
            # View Wt [K, N] as [K * P, N / P]: bag (row, p) sums the p-th slices of the selected rows,
            # so the M * P bags run in parallel (embedding_bag parallelises over bags only).
            n = layout.out_features
            parts = next(p for p in SPARSE_BAG_SPLITS if n % p == 0)
            rows = (idx * parts).unsqueeze(0) + torch.arange(parts).unsqueeze(1)  # [P, keep]
            weights = xs.unsqueeze(1).expand(m, parts, keep).reshape(m * parts, keep)
            out = F.embedding_bag(rows.repeat(m, 1), state.weight_t.view(-1, n // parts), mode="sum",
                                  per_sample_weights=weights).reshape(m, n)
        else:
            out = xs @ state.weight_t.index_select(0, idx)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*lead, layout.out_features)


def register() -> None:
    """Called by the dispatcher: CPU priority int4pack, int8pack, then the dense fallback (int_affine);
    the sparse gather (activation_sparse)."""
    register_kernel(SparseGatherCpuKernel(), devices=("cpu",), first=True)
    register_kernel(DenseCpuKernel(), devices=("cpu",), first=True)
    register_kernel(Int8PackCpuKernel(), devices=("cpu",), first=True)
    register_kernel(Int4PackCpuKernel(), devices=("cpu",), first=True)
