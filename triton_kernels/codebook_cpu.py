"""Two optional CPU paths for the ``codebook`` kind, selected by name (``LLMCOMP_KERNEL``); the
default on the CPU stays the reference kernel (the weight decoded once and cached dense in the
activation dtype), which measured fastest (docs/GG.md).

``cpu_codebook_int8x2``: an 8-bit table with one scale per output channel (rf8, fp8-*) is split
into two int8 tables, ``T = a1 * Q1 + a2 * Q2`` (``Q1 = round(T / a1)``, ``a1 = max|T| / 127``,
``Q2`` the rounded residual at ``a2 = a1 / 254``: the split is exact to ``max|T| / 64516``), so
``y = int8mm(x, Q1[code], s * a1) + int8mm(x, Q2[code], s * a2)``: two calls of torch's weight-only
int8 GEMM (``_weight_int8pack_mm``), 2 bytes per weight read like bf16, at that op's speed. Up to
``INT8X2_MAX_M`` rows; larger batches decode ``a1 * Q1 + a2 * Q2`` on the fly for one float32 GEMM.
Measured on a loaded AVX-512 host: the two raw ops 1.27x faster than a bf16 GEMV at M = 1, the
kernel 0.95x the cached reference at M = 1 and 90x slower at M = 32 (the decode per call).

``cpu_codebook_blocked``: the reference kernel dequantizes the whole matrix once and keeps it
dense in the activation dtype (2-4 bytes per weight resident). This kernel keeps the codes (4-bit
codes unpacked to one byte each) plus the table, and on every call decodes ``BLOCK_ROWS`` output
rows at a time by table lookup into one reusable buffer, then runs that block's GEMM: about 1 byte
per weight resident, at the price of a lookup per call (measured 45-140x slower than the cached
weight, docs/GG.md). Selected by name only (``LLMCOMP_KERNEL=cpu_codebook_blocked``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmcomp.kernels.cpu import FAST_ACT_DTYPES, INT8PACK_K_MULTIPLE, aligned_input, fresh_copy
from llmcomp.kernels.dispatch import CodebookLayout, CodebookTensors, check_codebook, register_kernel, unpack_codes

BLOCK_ROWS = 256  # output rows decoded per step: the buffer is BLOCK_ROWS x K activation-dtype values
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT8_MAX = 127
INT8X2_MAX_M = 2  # rows up to which the two int8 GEMMs run (raw ops: 1.27x a bf16 GEMV at M=1, slower at M=8)


@dataclass
class _Int8x2State:
    q1: torch.Tensor  # int8 [N, K + pad], fresh aligned storage
    q2: torch.Tensor
    s1: torch.Tensor  # [N] activation dtype: s * a1
    s2: torch.Tensor  # [N]: s * a2
    s1_f32: torch.Tensor
    s2_f32: torch.Tensor
    pad: int


def split_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(Q1, Q2, a1, a2)`` int8 tables with ``a1 * Q1 + a2 * Q2 ~ table`` (see the module doc)."""
    t = table.double()
    a1 = float(t.abs().max()) / INT8_MAX or 1.0
    q1 = torch.round(t / a1).clamp(-INT8_MAX, INT8_MAX)
    a2 = a1 / (2 * INT8_MAX)
    q2 = torch.round((t - a1 * q1) / a2).clamp(-INT8_MAX, INT8_MAX)
    return q1.to(torch.int8), q2.to(torch.int8), a1, a2


class Int8x2CodebookCpuKernel:
    name = "cpu_codebook_int8x2"
    kinds = frozenset({"codebook"})

    def can_implement(self, layout: CodebookLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, f"device {device.type} is not cpu"
        if dtype not in FAST_ACT_DTYPES:
            return False, f"activation dtype {dtype} not in {FAST_ACT_DTYPES} (torch's int8 CPU op is slow otherwise)"
        if layout.bits != 8 or layout.per_row_table or layout.num_groups != 1:
            return False, "needs 8-bit codes, one table and one scale per output channel"
        if not hasattr(torch, "_weight_int8pack_mm"):
            return False, "torch._weight_int8pack_mm is missing from this torch build"
        return True, ""

    def prepare(self, layout: CodebookLayout, tensors: CodebookTensors, dtype: torch.dtype) -> _Int8x2State:
        check_codebook(layout, tensors)
        t1, t2, a1, a2 = split_table(tensors.lut.float())
        codes = unpack_codes(tensors.codes, 8, layout.in_features)
        k = layout.in_features
        pad = -k % INT8PACK_K_MULTIPLE
        q1 = torch.zeros(layout.out_features, k + pad, dtype=torch.int8)  # fresh, aligned, zero padding
        q2 = torch.zeros(layout.out_features, k + pad, dtype=torch.int8)
        q1[:, :k], q2[:, :k] = t1[codes], t2[codes]
        scale = (torch.ones(layout.out_features) if tensors.scale is None else tensors.scale.float().reshape(-1))
        s1, s2 = scale.double() * a1, scale.double() * a2
        return _Int8x2State(q1, q2, fresh_copy(s1.to(dtype)), fresh_copy(s2.to(dtype)), s1.float(), s2.float(), pad)

    def apply(self, x: torch.Tensor, layout: CodebookLayout, state: _Int8x2State, bias: torch.Tensor | None):
        x2 = x.reshape(-1, x.shape[-1])
        k = layout.in_features
        if x2.shape[0] <= INT8X2_MAX_M:
            xa = F.pad(x2, (0, state.pad)) if state.pad else aligned_input(x2)  # F.pad allocates afresh
            out = torch._weight_int8pack_mm(xa, state.q1, state.s1) + torch._weight_int8pack_mm(xa, state.q2, state.s2)
        else:
            w = state.q1[:, :k].float() * state.s1_f32.unsqueeze(1)
            w += state.q2[:, :k].float() * state.s2_f32.unsqueeze(1)
            out = F.linear(x2.float(), w).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], layout.out_features)


@dataclass
class _BlockedState:
    codes: torch.Tensor  # uint8 [N, K] (codes < 256), or int64 offsets into a per-row table
    table: torch.Tensor  # [E] or flattened [N * E], activation dtype
    scale: torch.Tensor | None  # [N, groups] activation dtype
    column_group: torch.Tensor  # [K] int64: group of every column
    per_channel: bool  # one scale per row: applied to the block's output instead of its weights
    per_row_table: bool
    entries: int


class BlockedCodebookCpuKernel:
    name = "cpu_codebook_blocked"
    kinds = frozenset({"codebook"})

    def can_implement(self, layout: CodebookLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, f"device {device.type} is not cpu"
        if dtype not in ACT_DTYPES:
            return False, f"activation dtype {dtype} not in {ACT_DTYPES}"
        return True, ""

    def prepare(self, layout: CodebookLayout, tensors: CodebookTensors, dtype: torch.dtype) -> _BlockedState:
        check_codebook(layout, tensors)
        codes = unpack_codes(tensors.codes, layout.bits, layout.in_features).to(torch.uint8).contiguous()
        entries = 2**layout.bits
        table = tensors.lut.to(dtype).reshape(-1).contiguous()
        scale = None if tensors.scale is None else tensors.scale.to(dtype).contiguous()
        group = torch.arange(layout.in_features) // layout.group_size
        return _BlockedState(codes, table, scale, group, layout.num_groups == 1, layout.per_row_table, entries)

    def _block(self, state: _BlockedState, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of the weight, decoded by table lookup into ``buf``."""
        idx = state.codes[start:stop].to(torch.int64)
        if state.per_row_table:
            idx += (torch.arange(start, stop) * state.entries).unsqueeze(1)
        w = buf[: (stop - start) * idx.shape[1]]
        torch.index_select(state.table, 0, idx.reshape(-1), out=w)
        w = w.view(stop - start, -1)
        if state.scale is not None and not state.per_channel:
            w.mul_(state.scale[start:stop][:, state.column_group])
        return w

    def apply(self, x: torch.Tensor, layout: CodebookLayout, state: _BlockedState, bias: torch.Tensor | None):
        x2 = x.reshape(-1, x.shape[-1])
        n, k = layout.out_features, layout.in_features
        y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
        buf = torch.empty(min(n, BLOCK_ROWS) * k, dtype=state.table.dtype)
        for start in range(0, n, BLOCK_ROWS):
            stop = min(n, start + BLOCK_ROWS)
            yb = F.linear(x2, self._block(state, start, stop, buf).to(x.dtype))
            if state.scale is not None and state.per_channel:
                yb = yb * state.scale[start:stop, 0].to(x.dtype)
            y[:, start:stop] = yb
        if bias is not None:
            y += bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], n)


def register() -> None:
    """Called by :func:`llmcomp.kernels.dispatch._load_builtin_kernels`: both by name only (neither
    beat the cached reference in our measurements)."""
    register_kernel(Int8x2CodebookCpuKernel(), devices=())
    register_kernel(BlockedCodebookCpuKernel(), devices=())
