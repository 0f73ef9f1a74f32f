"""Activation sparsity on packed int4 / int8 weights, CPU: ``cpu_sparse_packed``.

Why a native kernel. At batch 1 an int4 layer costs one call of torch's fused int4 GEMV
(``cpu_int4pack``, half a byte per weight). Any pure-torch gather (index the kept rows, unpack the
nibbles, apply the group scales, matmul) materialises the selected weights in float and costs
10-30x that (measured: docs/ACTIVATION_SPARSITY.md), and Inductor vectorises the fused form along
the gathered axis (per-lane gathers), which is as slow. So the row is handled by ~100 lines of
plain C (no torch headers): score, top-k by quickselect, and the gather GEMV, in one call. It is
compiled once with the system C compiler (about a second; cached under ``~/.cache/llmcomp/native``
by a hash of source and flags), called through ctypes, and registered as the op
``llmcomp::act_sparse_packed_gemv``, which ``torch.compile`` treats as one opaque node (no graph
break). One thread (the decode benchmarks run one); several threads are future work.

Layout, chosen at ``prepare``: the codes input-channel-major, so each kept channel is one
contiguous row of ``W^T``: int4 ``uint8 [K, N/2]`` with byte ``m`` of row ``k`` holding column
``m`` (low nibble) and column ``m + N/2`` (high nibble), unsigned ``u = q + 8``; int8 ``int8 [K, N]``.
Group scales transposed to ``[G, N]`` float32 with an offset ``o`` so that ``w = c * s - o``
(``o = (z + 8) s`` for int4, ``z s`` for int8). The kept channels are visited in ascending order,
so the channels of one group are adjacent: their code rows are summed with the activations as
weights (one FMA per kept weight, four rows per pass) and the group's scale and offset are applied
once per group, ``y += s_g * acc_g - o_g * sum(x_g)``: the scales are read no more often than by a
dense GEMV. Ties in the score go to the lower channel index.

Selection and semantics are those of :class:`~llmcomp.kernels.dispatch.ActivationSparseLayout`.
Several rows (prefill) gather and dequantize the kept rows once and run one GEMM (torch ops).
Without a C compiler the kernel reports it cannot run and dispatch falls back to ``cpu_sparse_bag``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcomp import intquant
from llmcomp.kernels.cpu import _cpu_and_dtype
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    QuantTensors,
    column_norms,
    register_kernel,
)

PACKED_BITS = (4, 8)
INT4_OFFSET = 8  # stored signed q in [-8, 7]; the nibble holds u = q + 8
NO_NATIVE_ENV = "LLMCOMP_NO_NATIVE_KERNELS"  # set to 1 to never build the C++ extension
COMPILE_TIMEOUT_S = 120

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* rows (ascending) of the `keep` largest scores; among equal scores the lower index wins.
   Quickselect on a copy finds the keep-th largest value t, one pass collects. */
static int64_t select_rows(const float* score, int64_t k, int64_t keep, float* tmp, int64_t* rows) {
  memcpy(tmp, score, (size_t)k * sizeof(float));
  int64_t lo = 0, hi = k - 1, target = keep - 1;
  while (lo < hi) {
    const float pivot = tmp[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (tmp[i] > pivot) ++i;
      while (tmp[j] < pivot) --j;
      if (i <= j) { const float t = tmp[i]; tmp[i] = tmp[j]; tmp[j] = t; ++i; --j; }
    }
    if (target <= j) hi = j; else if (target >= i) lo = i; else break;
  }
  const float t = tmp[target];
  int64_t above = 0, m = 0;
  for (int64_t i = 0; i < k; ++i) above += score[i] > t;
  int64_t ties = keep - above;
  for (int64_t i = 0; i < k && m < keep; ++i) {
    if (score[i] > t) rows[m++] = i;
    else if (score[i] == t && ties > 0) { rows[m++] = i; --ties; }
  }
  return m;
}

/* One row: score |x| (times norms when given), keep the best `keep` inputs, then
   y[n] = sum_j x[r_j] * (c[r_j, n] * s[g_j, n] - o[g_j, n]),  g_j = r_j / group.
   The kept rows are ascending, so a group's rows are adjacent: they are accumulated
   unscaled, and the group's scale and offset are applied once.
   int4: codes uint8 [K, width]: low nibble = column m, high nibble = column m + width (N = 2 width).
   int8: codes int8 [K, width] (N = width). x and y are float32 or bfloat16 (flags). 0 = ok. */
#define SPARSE_GEMV(NAME, CODE, INT4)                                                                   \
int NAME(const void* xin, int x_bf16, const float* norms, int64_t k, int64_t keep, const CODE* codes,     \
         int64_t width, const float* scale, const float* offset, int64_t group, void* yout, int y_bf16) {  \
  const int64_t n = INT4 ? 2 * width : width;                                                            \
  float* buf = (float*)malloc((size_t)(3 * k + 2 * n) * sizeof(float));                                  \
  int64_t* rows = (int64_t*)malloc((size_t)k * sizeof(int64_t));                                          \
  if (buf == NULL || rows == NULL) { free(buf); free(rows); return 1; }                                   \
  float *x = buf, *score = buf + k, *tmp = buf + 2 * k, *acc = buf + 3 * k, *y = buf + 3 * k + n;         \
  for (int64_t i = 0; i < k; ++i) {                                                                       \
    x[i] = x_bf16 ? bf16_to_f32(((const uint16_t*)xin)[i]) : ((const float*)xin)[i];                     \
    const float a = x[i] < 0 ? -x[i] : x[i];                                                              \
    score[i] = norms ? a * norms[i] : a;                                                                  \
  }                                                                                                       \
  const int64_t m = select_rows(score, k, keep, tmp, rows);                                               \
  memset(y, 0, (size_t)n * sizeof(float));                                                                \
  int64_t j = 0;                                                                                          \
  while (j < m) {                                                                                         \
    const int64_t g = rows[j] / group;                                                                    \
    float* restrict lo = acc;                                                                             \
    float* restrict hi = acc + width;                                                                     \
    memset(acc, 0, (size_t)n * sizeof(float));                                                            \
    float xsum = 0.f;                                                                                     \
    int64_t end = j;                                                                                      \
    while (end < m && rows[end] / group == g) ++end;                                                      \
    for (; j + 4 <= end; j += 4) { /* four rows per pass: a quarter of the accumulator traffic */        \
      const float x0 = x[rows[j]], x1 = x[rows[j + 1]], x2 = x[rows[j + 2]], x3 = x[rows[j + 3]];         \
      const CODE* restrict r0 = codes + rows[j] * width;                                                  \
      const CODE* restrict r1 = codes + rows[j + 1] * width;                                              \
      const CODE* restrict r2 = codes + rows[j + 2] * width;                                              \
      const CODE* restrict r3 = codes + rows[j + 3] * width;                                              \
      xsum += (x0 + x1) + (x2 + x3);                                                                      \
      if (INT4) {                                                                                         \
        for (int64_t i = 0; i < width; ++i) {                                                             \
          lo[i] += x0 * (float)(r0[i] & 15) + x1 * (float)(r1[i] & 15)                                    \
                 + x2 * (float)(r2[i] & 15) + x3 * (float)(r3[i] & 15);                                   \
          hi[i] += x0 * (float)(r0[i] >> 4) + x1 * (float)(r1[i] >> 4)                                    \
                 + x2 * (float)(r2[i] >> 4) + x3 * (float)(r3[i] >> 4);                                   \
        }                                                                                                 \
      } else {                                                                                            \
        for (int64_t i = 0; i < width; ++i)                                                               \
          lo[i] += x0 * (float)r0[i] + x1 * (float)r1[i] + x2 * (float)r2[i] + x3 * (float)r3[i];         \
      }                                                                                                   \
    }                                                                                                     \
    for (; j < end; ++j) {                                                                                \
      const float xv = x[rows[j]];                                                                        \
      const CODE* restrict row = codes + rows[j] * width;                                                 \
      xsum += xv;                                                                                         \
      if (INT4) {                                                                                         \
        for (int64_t i = 0; i < width; ++i) {                                                             \
          lo[i] += xv * (float)(row[i] & 15);                                                             \
          hi[i] += xv * (float)(row[i] >> 4);                                                             \
        }                                                                                                 \
      } else {                                                                                            \
        for (int64_t i = 0; i < width; ++i) lo[i] += xv * (float)row[i];                                  \
      }                                                                                                   \
    }                                                                                                     \
    const float* restrict s = scale + g * n;                                                              \
    const float* restrict o = offset + g * n;                                                             \
    for (int64_t i = 0; i < n; ++i) y[i] += s[i] * acc[i] - o[i] * xsum;                                  \
  }                                                                                                       \
  if (y_bf16) { for (int64_t i = 0; i < n; ++i) ((uint16_t*)yout)[i] = f32_to_bf16(y[i]); }               \
  else memcpy(yout, y, (size_t)n * sizeof(float));                                                        \
  free(buf); free(rows);                                                                                  \
  return 0;                                                                                               \
}

SPARSE_GEMV(sparse_gemv_int4, uint8_t, 1)
SPARSE_GEMV(sparse_gemv_int8, int8_t, 0)
"""


def _simd_flags() -> list[str]:
    """Vector ISA flags for the host torch itself runs on (part of the library's cache name)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma"]
    if cap.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llmcomp" / "native"


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """Compile (once, cached by source and flags hash) and load the C kernel; (lib, "") or (None, reason).

    Plain C with no torch headers: it builds in about a second (a torch C++ extension takes
    minutes), and is called through ctypes on the tensors' data pointers."""
    if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
        return None, f"{NO_NATIVE_ENV} is set"
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    flags = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=fast", *_simd_flags()]
    digest = hashlib.sha1((_C_SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    path = _cache_dir() / f"act_sparse_packed_{digest}.so"
    try:
        if not path.exists():
            if cc is None:
                return None, "no C compiler (cc/gcc) on PATH"
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(_C_SOURCE)
                subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True, capture_output=True,
                               timeout=COMPILE_TIMEOUT_S)
                os.replace(out, path)  # atomic: a concurrent process sees the whole library or none
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot build the C kernel: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn in (lib.sparse_gemv_int4, lib.sparse_gemv_int8):
        fn.argtypes = [ptr, i32, ptr, i64, i64, ptr, i64, ptr, ptr, i64, ptr, i32]
        fn.restype = i32
    return lib, ""


def native_available() -> tuple[bool, str]:
    lib, reason = _library()
    return lib is not None, reason


NATIVE_IO_DTYPES = (torch.float32, torch.bfloat16)  # what the C code reads and writes itself
OP_NAME = "act_sparse_packed_gemv"


def _run(x: torch.Tensor, norms: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor,
         offset: torch.Tensor, keep: int, group: int, bits: int) -> torch.Tensor:
    """The C call: ``x`` one contiguous row ``[K]`` (float32 or bfloat16), result ``[N_pad]`` in its dtype.

    Nothing is checked here (the hot path): :func:`pack_transposed` made the layout."""
    lib, reason = _library()
    if lib is None:
        raise RuntimeError(reason)
    width = codes.shape[1]
    y = torch.empty(2 * width if bits == 4 else width, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    fn = lib.sparse_gemv_int4 if bits == 4 else lib.sparse_gemv_int8
    status = fn(x.data_ptr(), bf16, None if norms is None else norms.data_ptr(), x.shape[0], keep, codes.data_ptr(),
                width, scale.data_ptr(), offset.data_ptr(), group, y.data_ptr(), bf16)
    if status:
        raise MemoryError("cpu_sparse_packed: out of memory for its scratch buffers")
    return y


def check_inputs(x: torch.Tensor, norms: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor, keep: int, group: int, bits: int) -> None:
    """Shapes and dtypes the C code relies on (attribute reads only); ValueError otherwise."""
    k, width = codes.shape
    n = 2 * width if bits == 4 else width
    if x.dim() != 1 or x.shape[0] != k or x.dtype not in NATIVE_IO_DTYPES or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous float32/bfloat16 row of {k}, got {x.dtype} {list(x.shape)}")
    if not (codes.is_contiguous() and scale.is_contiguous() and offset.is_contiguous()):
        raise ValueError("codes, scale and offset must be contiguous")
    if tuple(scale.shape[1:]) != (n,) or scale.dtype != torch.float32 or offset.shape != scale.shape:
        raise ValueError(f"scale/offset must be float32 [groups, {n}]")
    if codes.dtype != (torch.uint8 if bits == 4 else torch.int8):
        raise ValueError(f"{bits}-bit codes have the wrong dtype {codes.dtype}")
    if norms is not None and (norms.shape != (k,) or norms.dtype != torch.float32 or not norms.is_contiguous()):
        raise ValueError(f"norms must be contiguous float32 [{k}]")
    if not 1 <= keep <= k or scale.shape[0] * group < k:
        raise ValueError(f"keep {keep} not in [1, {k}] or groups {scale.shape[0]} x {group} do not cover {k}")


def packed_gemv(x: torch.Tensor, norms: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor, keep: int, group: int, bits: int) -> torch.Tensor:
    """``[N_pad]`` in ``x``'s dtype: one row ``x`` ``[K]`` through the packed sparse GEMV, checked."""
    check_inputs(x, norms, codes, scale, offset, keep, group, bits)
    return _run(x, norms, codes, scale, offset, keep, group, bits)


# The op torch.compile sees (one opaque node). Defined with the low-level Library API: a
# ``torch.library.custom_op`` adds an autograd wrapper that costs more than the kernel per call.
_OPS = torch.library.Library("llmcomp", "FRAGMENT")
_OPS.define(f"{OP_NAME}(Tensor x, Tensor? norms, Tensor codes, Tensor scale, Tensor offset, int keep, "
            "int group, int bits) -> Tensor")
_OPS.impl(OP_NAME, _run, "CPU")


@torch.library.register_fake(f"llmcomp::{OP_NAME}")
def _packed_gemv_fake(x, norms, codes, scale, offset, keep, group, bits):  # noqa: ANN001, ANN202
    check_inputs(x, norms, codes, scale, offset, keep, group, bits)
    return x.new_empty(codes.shape[1] * (2 if bits == 4 else 1))


@dataclass
class _PackedState:
    codes: torch.Tensor  # int4: uint8 [K, N_pad / 2]; int8: int8 [K, N]
    scale: torch.Tensor  # float32 [G, N_pad]
    offset: torch.Tensor  # float32 [G, N_pad]: w = code * scale - offset
    group: int  # effective group length along K
    bits: int
    col_norms: torch.Tensor | None


def pack_transposed(layout: ActivationSparseLayout, tensors: QuantTensors) -> _PackedState:
    """The input-channel-major layout of the module docstring, from int_affine checkpoint tensors."""
    base = layout.base
    k, n, bits = base.in_features, base.out_features, base.bits
    group = intquant.effective_group_size(base.group_size, k)
    q = intquant.unpack(tensors.packed.cpu(), bits, k).to(torch.int16)  # signed [N, K]
    scale = tensors.scale.float().cpu()  # [N, G]
    zero = torch.zeros_like(scale) if tensors.zero is None else tensors.zero.float().cpu()
    if bits == 4:
        n_pad = n + n % 2  # one zero column (scale 0) makes N even
        u = (q + INT4_OFFSET).to(torch.uint8)
        offset = (zero + INT4_OFFSET) * scale
        if n_pad != n:
            u = torch.cat([u, torch.zeros(1, k, dtype=torch.uint8)])
            scale = torch.cat([scale, torch.zeros(1, scale.shape[1])])
            offset = torch.cat([offset, torch.zeros(1, offset.shape[1])])
        ut = u.t()
        half = n_pad // 2
        codes = (ut[:, :half] | (ut[:, half:] << 4)).contiguous()
    else:
        codes = q.to(torch.int8).t().contiguous()
        offset = zero * scale
    return _PackedState(codes, scale.t().contiguous(), offset.t().contiguous(), group, bits, None)


class SparsePackedCpuKernel:
    """activation_sparse over an int4 / int8 base on CPU, reading only the kept rows of packed ``W^T``."""

    name = "cpu_sparse_packed"
    kinds = frozenset({"activation_sparse"})

    def can_implement(self, layout: ActivationSparseLayout, device: torch.device, dtype: torch.dtype):
        ok, reason = _cpu_and_dtype(device, dtype)
        if not ok:
            return ok, reason
        if layout.dense or layout.base.bits not in PACKED_BITS:
            return False, f"needs an int_affine base of {PACKED_BITS} bits"
        return native_available()

    def prepare(self, layout: ActivationSparseLayout, tensors: ActivationSparseTensors, dtype: torch.dtype):
        if not isinstance(tensors.base, QuantTensors):
            raise TypeError("cpu_sparse_packed needs QuantTensors as the base")
        state = pack_transposed(layout, tensors.base)
        state.col_norms = column_norms(layout, tensors)
        return state

    def apply(self, x: torch.Tensor, layout: ActivationSparseLayout, state: _PackedState,
              bias: torch.Tensor | None) -> torch.Tensor:
        lead, k, n = x.shape[:-1], layout.in_features, layout.out_features
        x2 = x.reshape(-1, k)
        if x2.shape[0] == 1:  # decode: selection and GEMV in one C call
            row = x2[0] if x.dtype in NATIVE_IO_DTYPES else x2[0].float()
            row = row.contiguous()
            # Eager: the C call directly; under torch.compile the registered op (one opaque node).
            gemv = torch.ops.llmcomp.act_sparse_packed_gemv.default if torch.compiler.is_compiling() else _run
            out = gemv(row, state.col_norms, state.codes, state.scale, state.offset, layout.keep, state.group,
                       state.bits)
            out = (out if out.shape[0] == n else out[:n]).to(x.dtype)[None]
        else:
            score = x2.float().abs().amax(dim=0)
            if state.col_norms is not None:
                score = score * state.col_norms
            idx = torch.topk(score, layout.keep, sorted=False).indices
            out = (x2.index_select(1, idx).float() @ dequantize_rows(state, idx)[:, :n]).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*lead, n)


def dequantize_rows(state: _PackedState, idx: torch.Tensor) -> torch.Tensor:
    """float32 ``[len(idx), N_pad]``: rows ``idx`` of ``W^T`` from the packed layout (torch ops)."""
    c = state.codes.index_select(0, idx)
    if state.bits == 4:
        c = torch.cat([c & 15, c >> 4], dim=1)
    g = idx // state.group
    return c.float() * state.scale.index_select(0, g) - state.offset.index_select(0, g)


def register() -> None:
    """Called from :func:`llmcomp.kernels.act_sparse_cpu.register` (after the generic kernels);
    :class:`~llmcomp.modules.activation_sparse.ActivationSparseLinear` asks for it by name."""
    register_kernel(SparsePackedCpuKernel(), devices=("cpu",), first=False)
