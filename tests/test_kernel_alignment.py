"""CPU kernels on deliberately misaligned tensors (weights, scales, activations at odd byte offsets).

torch's weight-only int8 op segfaults on AVX-512 hosts when its inputs are not aligned (PLATFORM-NOTES),
and tensors read from safetensors sit at arbitrary file offsets. The matrix runs in a child process
so that a regression shows up as a failing test naming the case, not as a dead pytest.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from llmcomp import intquant
from llmcomp.kernels import cpu
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors

OFFSETS = (1, 2, 4, 8)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
_NUMPY_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # dtypes numpy lacks


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    src = t.contiguous()
    as_np = _NUMPY_VIEW.get(src.dtype, src.dtype)
    raw = src.view(as_np).reshape(-1).view(torch.uint8) if src.numel() else src.view(torch.uint8)
    base = torch.empty(raw.numel() + 128, dtype=torch.uint8)  # the allocator aligns this to 64
    start = (-base.data_ptr()) % 64 + offset
    base[start : start + raw.numel()] = raw
    np_dtype = torch.empty(0, dtype=as_np).numpy().dtype
    arr = np.frombuffer(base.numpy(), dtype=np_dtype, offset=start, count=src.numel())
    out = torch.from_numpy(arr).view(src.dtype).reshape(src.shape)
    assert out.data_ptr() % 64 == offset and torch.equal(out.view(as_np), src.view(as_np))
    return out


def _case(kernel, n: int, k: int, bits: int, group: int, symmetric: bool, dtype: torch.dtype, m: int,
          offset: int) -> float:
    gen = torch.Generator().manual_seed(bits * 1000 + k + m)
    w = torch.randn(n, k, generator=gen)
    qw = intquant.quantize_rtn(w, bits, group, symmetric)
    layout = QuantLayout(n, k, bits, qw.group_size, symmetric)
    packed = intquant.pack(qw.q, bits)
    tensors = QuantTensors(misaligned(packed, offset), misaligned(qw.scale.to(dtype), offset),
                           None if qw.zero is None else misaligned(qw.zero, offset))
    x = misaligned(torch.randn(m, k, generator=gen).to(dtype), offset)
    state = kernel.prepare(layout, tensors, dtype)
    out = kernel.apply(x, layout, state, None).double()
    ref_w = intquant.dequantize(qw.q, qw.scale.to(dtype), qw.zero, qw.group_size, dtype=torch.float64)
    ref = x.double() @ ref_w.T
    return float((out - ref).norm() / ref.norm())


def cases():
    """(kernel, n, k, bits, group, symmetric): K = 584 and 570 are not multiples of 16."""
    yield cpu.Int8PackCpuKernel(), 48, 576, 8, -1, True
    yield cpu.Int8PackCpuKernel(), 48, 584, 8, -1, False
    yield cpu.Int8PackCpuKernel(), 32, 570, 8, -1, True
    yield cpu.Int4PackCpuKernel(), 48, 576, 4, 64, False
    yield cpu.Int4PackCpuKernel(), 32, 256, 4, 128, True
    yield cpu.DenseCpuKernel(), 48, 576, 3, 64, False
    yield cpu.DenseCpuKernel(), 32, 584, 8, 32, True


def run_matrix() -> None:
    for kernel, n, k, bits, group, sym in cases():
        layout = QuantLayout(n, k, bits, intquant.effective_group_size(group, k), sym)
        assert kernel.supports_layout(layout)[0], (kernel.name, layout, kernel.supports_layout(layout))
        for dtype in (torch.bfloat16, torch.float32):
            for m in (1, 6, cpu.INT8PACK_MAX_M + 8):
                for offset in OFFSETS:
                    label = f"{kernel.name} N={n} K={k} bits={bits} {dtype} M={m} offset={offset}"
                    print(label, flush=True)
                    rel = _case(kernel, n, k, bits, group, sym, dtype, m, offset)
                    assert rel < TOLERANCE[dtype], f"{label}: relative error {rel}"
    print("ALL OK", flush=True)


def test_misaligned_inputs_match_float64_reference() -> None:
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "(no case started)"
    assert res.returncode == 0, f"exit {res.returncode} during: {last}\n{res.stderr[-2000:]}"
    assert last == "ALL OK"


def test_misaligned_helper_really_misaligns() -> None:
    t = torch.arange(40, dtype=torch.int32).reshape(4, 10)
    for offset in OFFSETS:
        assert misaligned(t, offset).data_ptr() % 64 == offset


def test_prepare_never_aliases_checkpoint_storage() -> None:
    """What prepare hands to a native op lives in fresh, aligned storage, even for aligned inputs."""
    gen = torch.Generator().manual_seed(5)
    qw = intquant.quantize_rtn(torch.randn(32, 576, generator=gen), 8, -1, True)
    packed, scale = intquant.pack(qw.q, 8), qw.scale.to(torch.bfloat16)
    layout = QuantLayout(32, 576, 8, 576, True)
    state = cpu.Int8PackCpuKernel().prepare(layout, QuantTensors(packed, scale, None), torch.bfloat16)
    assert state.weight.data_ptr() != packed.data_ptr() and state.scale.data_ptr() != scale.data_ptr()
    assert state.weight.data_ptr() % 64 == 0 and state.scale.data_ptr() % 64 == 0


if __name__ == "__main__":
    run_matrix()
