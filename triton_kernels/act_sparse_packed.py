"""Activation sparsity on packed int4 / int8 weights, CPU: ``cpu_sparse_packed``.

Why a native kernel. At batch 1 an int4 layer costs one call of torch's fused int4 GEMV
(``cpu_int4pack``, half a byte per weight). Any pure-torch gather (index the kept rows, unpack the
nibbles, apply the group scales, matmul) materialises the selected weights in float and costs
10-30x that (measured: docs/ACTIVATION_SPARSITY.md), and Inductor vectorises the fused form along
the gathered axis (per-lane gathers), which is as slow. So the row is handled by about 150 lines of
plain C (``act_sparse_packed.c``, no torch headers): score, top-k, and the gather GEMV, in one call.

What made it faster than the dense int4 GEMV (issue 13; each measured, docs/BENCHMARKS.md):

* **Top-k by radix select** on the score bits (scores are >= 0, so their bits sort as integers):
  no data-dependent branches. The quickselect it replaced mispredicted on every new token's scores
  and cost as much as the GEMV itself at 50% on SmolLM2's shapes.
* **Software prefetch** of the kept rows 16 ahead (non-temporal: each is read once per token): the
  rows are scattered (a dense GEMV streams), and decode reads them from DRAM (the model does not
  fit the caches); and of each group's scales and offsets when the group starts (read at its end).
* **AVX-512 intrinsics** for the inner loop (16 codes widened to int32, converted, one FMA per kept
  weight); the plain C loops stay for other hosts (the compiler vectorises them for AVX2).
* **A C++ torch operator** (``act_sparse_packed_op.cpp``, ``llmcomp_sparse::gemv``) over weights
  registered once and named by int handles (:func:`register_native`): about 4 us per call where a
  Python custom op over ctypes costs about 10, and no weight tensor for torch.compile to guard.
* **One call for siblings** (q/k/v, gate/up: :func:`packed_siblings`, used by
  :class:`~llmcomp.modules.activation_sparse.FusedSparseSiblings`): 120 calls per SmolLM2 token
  instead of 210, as many as the dense int4 path makes.

Builds, cached under ``~/.cache/llmcomp/native`` by a hash of sources, flags (and torch version):
the C file alone as a shared library for ctypes (about a second, any C compiler; one per ISA of
:data:`ISA_FLAGS`, the tests run each), and the operator (the C file compiled with the ISA flags,
linked into the C++ wrapper built against torch's headers; about 20 s once). When the operator
cannot be built the kernel runs through ctypes, registered as the Python op
``llmcomp::act_sparse_packed_gemv`` for ``torch.compile`` (one opaque node either way, no graph
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
Without a C compiler (or with ``LLMCOMP_NO_NATIVE_KERNELS=1``) the kernel reports it cannot run and
dispatch falls back to ``cpu_sparse_bag``.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
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
NO_NATIVE_ENV = "LLMCOMP_NO_NATIVE_KERNELS"  # set to 1 to never build (or load) the native code
COMPILE_TIMEOUT_S = 120

C_SOURCE = Path(__file__).with_name("act_sparse_packed.c")
OP_SOURCE = Path(__file__).with_name("act_sparse_packed_op.cpp")


ISA_FLAGS = {  # one library per instruction set; the C source picks its loops by the macros these define
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma"],  # explicit AVX-512 intrinsics
    "avx2": ["-mavx2", "-mfma"],  # the plain C loops, vectorised by the compiler
    "generic": [],  # the plain C loops, baseline x86-64 / any other architecture
}


def best_isa() -> str:
    """The widest of :data:`ISA_FLAGS` that torch itself uses on this host."""
    cap = torch.backends.cpu.get_cpu_capability()
    return "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "generic"


def runnable_isas() -> list[str]:
    """Every library this host can execute, best first (the tests run each against the reference)."""
    order = list(ISA_FLAGS)
    return order[order.index(best_isa()):]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llmcomp" / "native"


def _c_flags(isa: str | None) -> list[str]:
    return ["-O3", "-std=c99", "-fPIC", "-ffp-contract=fast", *ISA_FLAGS[isa or best_isa()]]


def _build(stem: str, key: str, commands: Callable[[Path], list[list[str]]]) -> tuple[Path | None, str]:
    """``<cache>/<stem>_<hash of key>.so``, built once: ``commands(tmp)`` run in a temporary folder
    next to it and write ``tmp/out.so``, which is then moved in atomically (a concurrent process
    sees the whole library or none). (path, "") or (None, reason)."""
    path = _cache_dir() / f"{stem}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.so"
    if path.exists():
        return path, ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            for cmd in commands(Path(tmp)):
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            os.replace(Path(tmp) / "out.so", path)
    except subprocess.CalledProcessError as exc:
        return None, f"building {stem} failed: {(exc.stderr or '').strip()[-300:]}"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {stem} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return path, ""


def _cc() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.cache
def _library(isa: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """The C kernel for ``isa`` (default: :func:`best_isa`) as a plain shared library for ctypes;
    (lib, "") or (None, reason).

    Plain C with no torch headers: it builds in about a second, with any C compiler. It is the
    path when the torch operator (:func:`native_op`) cannot be built, and the tests' way to run
    each ISA's loops."""
    if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
        return None, f"{NO_NATIVE_ENV} is set"
    cc, flags, source = _cc(), _c_flags(isa), C_SOURCE.read_text()
    if cc is None:
        return None, "no C compiler (cc/gcc) on PATH"
    path, reason = _build("act_sparse_packed", source + " ".join(flags),
                          lambda tmp: [[cc, *flags, "-shared", str(C_SOURCE), "-o", str(tmp / "out.so")]])
    if path is None:
        return None, reason
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load the C kernel: {exc}"
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn in (lib.sparse_gemv_int4, lib.sparse_gemv_int8):
        fn.argtypes = [ptr, i32, ptr, i64, i64, ptr, i64, ptr, ptr, i64, ptr, i32]
        fn.restype = i32
    return lib, ""


def native_available() -> tuple[bool, str]:
    lib, reason = _library()
    return lib is not None, reason


@functools.lru_cache(maxsize=1)
def native_op() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """The torch operator ``llmcomp_sparse::gemv(x, handles, keep)`` (act_sparse_packed_op.cpp
    with the C kernel for :func:`best_isa` linked in), built once per source and torch version
    (about 20 s) and loaded; (op, "") or (None, reason).

    Why: a Python custom op costs about 10 us per call (dispatcher to Python, argument
    conversion, ctypes), more than the kernel on the small layers, while the C++ dispatcher costs
    about 4. The weights are registered with the operator once (:func:`register_native`) and
    passed as int handles: under torch.compile every tensor a step reads is guarded before each
    step (about a microsecond each), and four tensors per sparse layer made those guards cost as
    much as the kernels' savings. Without a C++ compiler or torch's headers the kernel runs
    through ctypes (:func:`_library`) instead."""
    if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
        return None, f"{NO_NATIVE_ENV} is set"
    cc, cxx = _cc(), os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cc is None or cxx is None:
        return None, "no C and C++ compiler (cc/gcc, g++/c++) on PATH"
    import torch.utils.cpp_extension as cpp_extension

    flags = _c_flags(None)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{d}" for d in cpp_extension.include_paths()]
    libs = [f"-L{d}" for d in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]

    def commands(tmp: Path) -> list[list[str]]:  # the kernel with its ISA flags; the torch side without
        return [[cc, *flags, "-c", str(C_SOURCE), "-o", str(tmp / "kernel.o")],
                [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", abi, "-w", *includes, str(OP_SOURCE),
                 str(tmp / "kernel.o"), *libs, "-o", str(tmp / "out.so")]]

    key = C_SOURCE.read_text() + OP_SOURCE.read_text() + " ".join(flags) + torch.__version__
    path, reason = _build("act_sparse_packed_op", key, commands)
    if path is None:
        return None, reason
    try:
        torch.ops.load_library(str(path))
        torch.library.register_fake("llmcomp_sparse::gemv")(_native_gemv_fake)
    except (OSError, RuntimeError) as exc:
        return None, f"cannot load the torch operator: {str(exc)[:200]}"
    return torch.ops.llmcomp_sparse.gemv.default, ""


NATIVE_IO_DTYPES = (torch.float32, torch.bfloat16)  # what the C code reads and writes itself
OP_NAME = "act_sparse_packed_gemv"  # the Python op (ctypes), llmcomp::


def _run(x: torch.Tensor, norms: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor,
         offset: torch.Tensor, keep: int, group: int, bits: int, isa: str | None = None) -> torch.Tensor:
    """The C call: ``x`` one contiguous row ``[K]`` (float32 or bfloat16), result ``[N_pad]`` in its dtype.

    Nothing is checked here (the hot path): :func:`pack_transposed` made the layout."""
    lib, reason = _library(isa)
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
                offset: torch.Tensor, keep: int, group: int, bits: int, isa: str | None = None) -> torch.Tensor:
    """``[N_pad]`` in ``x``'s dtype: one row ``x`` ``[K]`` through the packed sparse GEMV, checked.
    ``isa``: one of :func:`runnable_isas` (default the best; tests run them all)."""
    check_inputs(x, norms, codes, scale, offset, keep, group, bits)
    return _run(x, norms, codes, scale, offset, keep, group, bits, isa)


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


_NATIVE_OUT: dict[int, int] = {}  # handle -> N_pad (what the fake op needs to size its result)


def register_native(state: _PackedState) -> int | None:
    """Register ``state``'s tensors with the C++ operator; its handle (released when ``state`` is
    garbage), or None when the operator is not available."""
    if native_op()[0] is None:
        return None
    handle = int(torch.ops.llmcomp_sparse.put(state.col_norms, state.codes, state.scale, state.offset, state.group,
                                              state.bits))
    _NATIVE_OUT[handle] = state.scale.shape[1]
    weakref.finalize(state, _release_native, handle).atexit = False
    return handle


def _release_native(handle: int) -> None:
    _NATIVE_OUT.pop(handle, None)
    torch.ops.llmcomp_sparse.drop(handle)


def _native_gemv_fake(x, handles, keep):  # noqa: ANN001, ANN202
    return x.new_empty(sum(_NATIVE_OUT[h] for h in handles))


def packed_siblings(row: torch.Tensor, states: list[_PackedState], biases: list[torch.Tensor | None]) -> torch.Tensor:
    """Layers that read the same ``row`` ``[K]`` (one layer, or siblings: q/k/v, gate/up), each
    with its own weights, selection and keep, in one call of the C++ operator: their outputs
    (plus biases) concatenated, ``[sum N]`` in ``row``'s dtype. Every state must have its
    ``handle`` (the caller checks).

    Why one call: at batch 1 the runtime's cost per call (dispatch, guards, wrapper code) is
    comparable to the kernel's on SmolLM2's layers; the dense int4 runtime fuses these siblings
    into one GEMV (llmcomp.runtime.fuse), and this gives the sparse layers the same call count.
    Everything read here is an int, so the compiled step guards no weight tensors."""
    y = torch.ops.llmcomp_sparse.gemv.default(row, [st.handle for st in states], [st.keep for st in states])
    if all(b is None for b in biases) and all(st.n == st.n_pad for st in states):
        return y
    outs, start = [], 0
    for state, bias in zip(states, biases, strict=True):
        part = y[start:start + state.n]
        outs.append(part if bias is None else part + bias.to(y.dtype))
        start += state.n_pad  # an odd N has one padding column
    return torch.cat(outs)


@dataclass
class _PackedState:
    codes: torch.Tensor  # int4: uint8 [K, N_pad / 2]; int8: int8 [K, N]
    scale: torch.Tensor  # float32 [G, N_pad]
    offset: torch.Tensor  # float32 [G, N_pad]: w = code * scale - offset
    group: int  # effective group length along K
    bits: int
    col_norms: torch.Tensor | None
    n: int = 0  # out_features
    n_pad: int = 0  # N_pad: scale.shape[1]
    keep: int = 0  # inputs kept per row (prepare: the layout's)
    handle: int | None = None  # the weights registered with the C++ operator (prepare), if it was built

    def __deepcopy__(self, memo: dict) -> _PackedState:
        """A copy registers its own handle (the original's is released with the original)."""
        new = _PackedState(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)
                              if f.name != "handle"})
        new.handle = register_native(new) if self.handle is not None else None
        return new


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
    return _PackedState(codes, scale.t().contiguous(), offset.t().contiguous(), group, bits, None, n,
                        scale.shape[0])


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
        state.keep = layout.keep
        state.handle = register_native(state)
        return state

    def apply(self, x: torch.Tensor, layout: ActivationSparseLayout, state: _PackedState,
              bias: torch.Tensor | None) -> torch.Tensor:
        lead, k, n = x.shape[:-1], layout.in_features, layout.out_features
        x2 = x.reshape(-1, k)
        if x2.shape[0] == 1:  # decode: selection and GEMV in one C call
            row = x2[0] if x.dtype in NATIVE_IO_DTYPES else x2[0].float()
            row = row.contiguous()
            # The C++ op when it was built (eager and compiled); else ctypes: eager the C call
            # directly, under torch.compile the Python op (one opaque node either way).
            if state.handle is not None:
                out = torch.ops.llmcomp_sparse.gemv.default(row, [state.handle], [layout.keep])
            else:
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
