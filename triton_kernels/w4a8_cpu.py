"""int4 / int8 weights x int8 activations on CPU (``cpu_w4a8``, ``cpu_w8a8``): a C kernel built on first use.

torch's int4 CPU op costs about M times its M = 1 time, so batched decode gains little over bf16
on hosts where bf16 GEMMs use AMX. This kernel quantizes each activation row to int8 in blocks of
32 columns (absmax, as llama.cpp does for its Q8 activations) and multiplies with integer dot
products (AVX-512 VNNI, or AVX2), one weight load serving up to 8 rows. The weights keep their
exact int4 codes, scales and zero points; the only approximation is the int8 activation, which is
why the kernel is chosen explicitly (``LLMCOMP_KERNEL=cpu_w4a8``, ``--int4-kernel w4a8``) rather
than by default. The quality cost is measured in docs/KERNELS.md.

``w4a8_cpu.c`` (the kernel) is wrapped by ``w4a8_op.cpp`` into the torch operator
``llmcomp_w4a8::mm``, compiled with the system C++ compiler against this torch into a per-user
cache the first time it is needed (10-30 s, once per source and torch version), and loaded with
``torch.ops.load_library``: the C++ dispatcher costs a few microseconds per call, where a Python
custom op costs about 40. Without a compiler, or on a CPU with neither AVX2 nor AVX-512 VNNI, the
kernel reports why it cannot run and dispatch moves on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

from llmcomp import intquant
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, register_kernel

HERE = Path(__file__).parent
SOURCES = (HERE / "w4a8_cpu.c", HERE / "w4a8_op.cpp")
BLOCK = 32  # activation block (columns per int8 scale); the C kernel's BLOCK
TILE = 16  # outputs per packed tile; the C kernel's TILE
CACHE_ENV = "LLMCOMP_KERNEL_CACHE"
OP = "llmcomp_w4a8::mm"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "llmcomp")
    return Path(root).expanduser() / "kernels"


def _build_command(cxx: str, output: Path) -> list[str]:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{HERE}"]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++20", abi, "-w"]
    return [cxx, *flags, *includes, str(SOURCES[1]), *libs, "-o", str(output)]


@functools.cache
def _load() -> str:
    """Build (once per source and torch version) and load the operator; '' or why it cannot run."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler (g++/c++) on PATH to build the w4a8 kernel"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()).hexdigest()
    target = _cache_dir() / f"w4a8_op-{digest[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run(_build_command(cxx, built), capture_output=True, text=True)
            if done.returncode != 0:
                return f"building the w4a8 kernel failed: {done.stderr.strip()[-300:]}"
            os.replace(built, target)  # atomic: concurrent builders never see a half-written file
        for stale in target.parent.glob("w4a8_op-*.so"):  # builds of older sources (safe even if loaded)
            if stale != target:
                stale.unlink(missing_ok=True)
    torch.ops.load_library(str(target))
    torch.library.register_fake(OP)(_fake_mm)
    return ""


def _fake_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zterm: torch.Tensor, group: int,
             isa: int = 0, bits: int = 4) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0] * TILE))


def available() -> tuple[bool, str]:
    """Whether the kernel runs here: it is built, loads, and the CPU has AVX2 or AVX-512 VNNI."""
    reason = _load()
    if reason:
        return False, reason
    isa = torch.ops.llmcomp_w4a8.isa()
    return (True, "") if isa else (False, "this CPU has neither AVX-512 VNNI nor AVX2")


def isa_name() -> str:
    """The instruction set the kernel uses here (for benchmark headers)."""
    ok, reason = available()
    return {2: "avx512-vnni", 1: "avx2"}[torch.ops.llmcomp_w4a8.isa()] if ok else f"unavailable ({reason})"


def w4a8_mm(x: torch.Tensor, state: W4A8State, isa: int = 0) -> torch.Tensor:
    """``x [M, K]`` times the packed weight: ``[M, N]`` in x's dtype (accumulated in float32).
    ``isa``: 0 the best this CPU has, 1 AVX2, 2 AVX-512 VNNI."""
    if not torch.compiler.is_compiling():  # under tracing the file checks would break the graph
        _load()  # cached: loads the operator on first use (prepare() already did, for modules)
    return torch.ops.llmcomp_w4a8.mm(x, state.packed, state.scale, state.zterm, state.group, isa, state.bits)


def isa_level() -> int:
    """2 AVX-512 VNNI, 1 AVX2, 0 unavailable."""
    return int(torch.ops.llmcomp_w4a8.isa()) if available()[0] else 0


# -- packing -------------------------------------------------------------------------------------
@dataclass
class W4A8State:
    packed: torch.Tensor  # uint8 [N/16, K/8, 64] (4 bits) or [N/16, K/4, 64] (8 bits); layout in w4a8_cpu.c
    scale: torch.Tensor  # float32 [N/16, groups, 16]
    zterm: torch.Tensor  # float32 [N/16, groups, 16]: s * (offset + z)
    group: int
    bits: int


def pack(layout: QuantLayout, tensors: QuantTensors) -> W4A8State:
    """Our int4 / int8 storage -> the kernel's tile layout (codes unchanged, offset to unsigned:
    u = q + 8 for 4 bits, q + 128 for 8 bits)."""
    n, k, g, bits = layout.out_features, layout.in_features, layout.group_size, layout.bits
    offset = 1 << (bits - 1)
    q = tensors.packed if bits == 8 else intquant.unpack(tensors.packed, bits, k)
    u = (q.to(torch.int16) + offset).to(torch.uint8)  # [N, K]
    if bits == 4:
        tiles = u.reshape(n // TILE, TILE, k // 8, 2, 4)  # [t, lane, chunk, lo/hi, i]
        chunks = tiles[:, :, :, 0, :] | (tiles[:, :, :, 1, :] << 4)  # [t, lane, chunk, i]
    else:
        chunks = u.reshape(n // TILE, TILE, k // 4, 4)
    packed = chunks.permute(0, 2, 1, 3).reshape(n // TILE, chunks.shape[2], TILE * 4).contiguous()
    scale = tensors.scale.float()  # [N, groups]
    zero = torch.zeros_like(scale) if tensors.zero is None else tensors.zero.float()
    zterm = scale * (offset + zero)

    def tile_major(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // TILE, TILE, -1).permute(0, 2, 1).contiguous()

    return W4A8State(packed, tile_major(scale), tile_major(zterm), g, bits)


# -- reference -------------------------------------------------------------------------------------
def reference(x: torch.Tensor, layout: QuantLayout, tensors: QuantTensors) -> torch.Tensor:
    """What the kernel computes, in float64: block-32 int8 activations times the exact int4/int8 weight."""
    xf = x.float().reshape(x.shape[0], -1, BLOCK)
    amax = xf.abs().amax(-1, keepdim=True)
    d = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # float32, as the kernel
    xq = torch.round(xf / d)
    x_hat = (xq.double() * d.double()).reshape(x.shape[0], -1)
    q = tensors.packed if layout.bits == 8 else intquant.unpack(tensors.packed, layout.bits, layout.in_features)
    w = intquant.dequantize(q, tensors.scale, tensors.zero, layout.group_size, torch.float64)
    return x_hat @ w.t()


# -- the dispatch kernel ---------------------------------------------------------------------------
class W4A8CpuKernel:
    """int4 weights with int8 activations (opt-in by name: it approximates the activations)."""

    name = "cpu_w4a8"
    kinds = frozenset({"int_affine"})
    bits = 4

    def can_implement(self, layout: QuantLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, f"device {device.type} is not cpu"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"activation dtype {dtype} is not supported"
        return self.supports_layout(layout)

    def supports_layout(self, layout: QuantLayout) -> tuple[bool, str]:
        if layout.bits != self.bits:
            return False, f"needs {self.bits} bits, got {layout.bits}"
        if layout.out_features % TILE:
            return False, f"out_features {layout.out_features} is not a multiple of {TILE}"
        if layout.group_size % BLOCK or layout.in_features % BLOCK:
            return False, (f"group size {layout.group_size} and in_features {layout.in_features} must be multiples "
                           f"of {BLOCK}")
        return self._runs_here()

    def _runs_here(self) -> tuple[bool, str]:
        return available()

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> W4A8State:
        _load()
        return pack(layout, tensors)

    def apply(self, x: torch.Tensor, layout: QuantLayout, state: W4A8State, bias: torch.Tensor | None):
        lead = x.shape[:-1]
        out = w4a8_mm(x.reshape(-1, x.shape[-1]), state)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*lead, layout.out_features)


class W8A8CpuKernel(W4A8CpuKernel):
    """int8 weights (any group size that is a multiple of 32) with int8 activations; AVX-512 VNNI only."""

    name = "cpu_w8a8"
    bits = 8

    def _runs_here(self) -> tuple[bool, str]:
        ok, reason = available()
        if ok and isa_level() < 2:
            return False, "int8 weights need AVX-512 VNNI (AVX2's vpmaddubsw saturates on 8-bit codes)"
        return ok, reason


def register() -> None:
    """Called by the dispatcher: registered on no device's priority list, so only chosen by name."""
    register_kernel(W4A8CpuKernel(), devices=())
    register_kernel(W8A8CpuKernel(), devices=())
