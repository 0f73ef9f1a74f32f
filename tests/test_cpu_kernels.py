"""CPU kernels vs the float64 dequantize reference, for every bit width / group size combination."""

from __future__ import annotations

import pytest
import torch

from llmcomp import intquant
from llmcomp.kernels import cpu
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, select_kernel
from llmcomp.modules import QuantLinear

KERNELS = [cpu.Int4PackCpuKernel(), cpu.Int8PackCpuKernel(), cpu.DenseCpuKernel()]
# Relative output error allowed per activation dtype (bf16 rounds inputs, scales and outputs).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _quantized(n: int, k: int, bits: int, group: int, symmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1.0 + torch.rand(n, 1, generator=gen))
    w[:, k // 3] *= 6.0  # an outlier column, like real LLM weights
    qw = intquant.quantize_rtn(w, bits, group, symmetric)
    layout = QuantLayout(n, k, bits, qw.group_size, symmetric)
    tensors = QuantTensors(intquant.pack(qw.q, bits), qw.scale, qw.zero)
    ref_w = intquant.dequantize(qw.q, qw.scale, qw.zero, qw.group_size, dtype=torch.float64)
    return layout, tensors, ref_w


def _check(kernel, layout, tensors, ref_w, dtype, m: int, bias: bool = True) -> bool:
    # Correctness in every dtype, even those routed elsewhere for speed (see FAST_ACT_DTYPES).
    if not kernel.supports_layout(layout)[0]:
        return False
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, layout.in_features, generator=gen).to(dtype)
    b = torch.randn(layout.out_features, generator=gen).to(dtype) if bias else None
    state = kernel.prepare(layout, tensors, dtype)
    out = kernel.apply(x, layout, state, b).double()
    ref = x.double() @ ref_w.T + (0.0 if b is None else b.double())
    rel = float((out - ref).norm() / ref.norm())
    assert rel < TOLERANCE[dtype], f"{kernel.name} {layout} {dtype} M={m}: rel err {rel}"
    return True


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 192, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernels_match_float64_reference(bits: int, group: int, symmetric: bool) -> None:
    # K = 576 is not divisible by 128 (short last group); N = 48 is a multiple of 16.
    layout, tensors, ref_w = _quantized(48, 576, bits, group, symmetric)
    ran = []
    for kernel in KERNELS:
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, cpu.INT8PACK_MAX_M + 3):
                if _check(kernel, layout, tensors, ref_w, dtype, m):
                    ran.append(kernel.name)
    assert "cpu_dense" in ran
    if bits == 4:
        assert "cpu_int4pack" in ran  # every group here maps onto a kernel group (576 = 9 * 64)
    if bits == 8 and group == -1:
        assert "cpu_int8pack" in ran


def test_int4pack_convention_is_u_minus_8_times_scale_plus_zero() -> None:
    """The raw op's convention, pinned down independently of our prepare()."""
    gen = torch.Generator().manual_seed(3)
    n, k, g = 32, 128, 32
    u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scale = torch.rand(k // g, n, generator=gen) + 0.1
    zero = torch.randn(k // g, n, generator=gen)
    packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    x = torch.randn(3, k, generator=gen)
    out = torch._weight_int4pack_mm_for_cpu(x, packed, g, torch.stack([scale, zero], -1))
    w = (u.double() - 8) * scale.double().t().repeat_interleave(g, 1) + zero.double().t().repeat_interleave(g, 1)
    torch.testing.assert_close(out.double(), x.double() @ w.T, rtol=1e-5, atol=1e-4)


def test_int4pack_group_replication() -> None:
    assert cpu.int4pack_group(QuantLayout(16, 576, 4, 576, True)) == 64
    assert cpu.int4pack_group(QuantLayout(16, 1536, 4, 1536, True)) == 256
    assert cpu.int4pack_group(QuantLayout(16, 576, 4, 256, True)) == 64  # short last group of 64
    assert cpu.int4pack_group(QuantLayout(16, 576, 4, 48, True)) is None
    assert cpu.int4pack_group(QuantLayout(16, 200, 4, 200, True)) is None


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        (QuantLayout(48, 576, 8, 64, True), "per output channel"),
        (QuantLayout(50, 576, 4, 64, True), "out_features"),
        (QuantLayout(48, 576, 4, 48, True), "kernel group"),
    ],
)
def test_fast_kernels_refuse_what_they_cannot_run(layout: QuantLayout, reason: str) -> None:
    results = [k.can_implement(layout, torch.device("cpu"), torch.bfloat16) for k in KERNELS[:2]]
    results += [k.supports_layout(layout) for k in KERNELS[:2]]
    assert not any(ok for ok, _ in results)
    assert any(reason in why for _, why in results)


def test_dispatch_priority_on_cpu() -> None:
    dev = torch.device("cpu")
    assert select_kernel(QuantLayout(64, 576, 4, 64, False), dev, torch.bfloat16).name == "cpu_int4pack"
    assert select_kernel(QuantLayout(64, 576, 8, 576, True), dev, torch.bfloat16).name == "cpu_int8pack"
    assert select_kernel(QuantLayout(64, 576, 3, 64, True), dev, torch.bfloat16).name == "cpu_dense"
    # K = 72 is no multiple of 16: int8pack runs it on zero-padded rows (tests/test_kernel_alignment.py).
    assert select_kernel(QuantLayout(64, 72, 8, 72, True), dev, torch.bfloat16).name == "cpu_int8pack"
    # float32 activations would hit torch's scalar fallback of the weight-only ops.
    assert select_kernel(QuantLayout(64, 576, 4, 64, False), dev, torch.float32).name == "cpu_dense"
    ok, reason = cpu.Int4PackCpuKernel().can_implement(QuantLayout(64, 576, 4, 64, False), dev, torch.float32)
    assert not ok and "fast path" in reason


@pytest.mark.parametrize(("bits", "kernel"), [(3, "cpu_dense"), (4, "cpu_int4pack"), (8, "cpu_int8pack")])
def test_quant_linear_forward_uses_fast_path_and_matches(bits: int, kernel: str) -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=gen)
    bias = torch.randn(64, generator=gen)
    qw = intquant.quantize_rtn(w, bits, -1 if bits == 8 else 64, symmetric=bits != 8)
    mod = QuantLinear.from_quantized(qw, bias, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 256, generator=gen).bfloat16()
    out = mod(x)
    assert mod._kernel_state is not None and mod._kernel_state[0].name == kernel
    ref_w = intquant.dequantize(qw.q, qw.scale.bfloat16(), qw.zero, qw.group_size, torch.float64)
    ref = x.double() @ ref_w.T + bias.double()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert out.shape == (2, 3, 64) and rel < TOLERANCE[torch.bfloat16]
