"""The int4 x int8 CPU kernel (cpu_w4a8) against float64 references: the exact emulation of what it
computes, the closed-form bound on its activation rounding, dispatch by name, a model and compile."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_CONFIG, random_llama

from llmcomp import intquant
from llmcomp.kernels import w4a8_cpu
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, preferred_kernels, select_kernel
from llmcomp.modules import QuantLinear

AVAILABLE, WHY = w4a8_cpu.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"w4a8 kernel unavailable: {WHY}")
ISAS = [i for i in (1, 2) if i <= w4a8_cpu.isa_level()]  # every path this CPU can run
F32_REL = 2e-6  # float32 accumulation of int32 partial sums vs float64
BF16_REL = 8e-3  # the output is rounded to bfloat16


def _quantized(n: int, k: int, group: int, symmetric: bool, seed: int = 0, bits: int = 4):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1.0 + torch.rand(n, 1, generator=gen))
    w[:, k // 3] *= 6.0  # an outlier column, like real LLM weights
    qw = intquant.quantize_rtn(w, bits, group, symmetric)
    layout = QuantLayout(n, k, bits, qw.group_size, symmetric)
    return layout, QuantTensors(intquant.pack(qw.q, bits), qw.scale, qw.zero), qw


def _activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 5] *= 20.0  # an activation outlier channel: its block gets a coarse scale
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


CASES = [(4, 48, 256, 64, False), (4, 32, 320, 128, False),  # 320 = 2 x 128 + a short group of 64
         (4, 32, 192, 32, True), (4, 64, 384, 128, False), (4, 16, 160, -1, False),
         (8, 48, 256, -1, True), (8, 32, 192, 64, False)]


# 8-bit weights run on AVX-512 VNNI only (AVX2's vpmaddubsw would saturate), so no (AVX2, 8-bit) case.
RUNNABLE = [(isa, *case) for isa in ISAS for case in CASES if case[0] == 4 or isa == 2]


@pytest.mark.parametrize(("isa", "bits", "n", "k", "group", "symmetric"), RUNNABLE)
def test_kernel_matches_float64_emulation(isa: int, bits: int, n: int, k: int, group: int, symmetric: bool) -> None:
    layout, tensors, _ = _quantized(n, k, group, symmetric, bits=bits)
    state = w4a8_cpu.pack(layout, tensors)
    for m in (1, 2, 5, 8, 9, 19):  # row chunks of 8 (AVX-512) and 4 (AVX2), with tails
        x = _activations(m, k, seed=m)
        ref = w4a8_cpu.reference(x, layout, tensors)
        out = w4a8_cpu.w4a8_mm(x, state, isa)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert _rel(out, ref) < F32_REL, (isa, m)
        xb = x.bfloat16()
        outb = w4a8_cpu.w4a8_mm(xb, state, isa)
        assert outb.dtype == torch.bfloat16
        assert _rel(outb, w4a8_cpu.reference(xb, layout, tensors)) < BF16_REL, (isa, m)


def test_emulation_is_a_naive_loop_and_within_the_rounding_bound() -> None:
    """The reference itself, checked two ways: against a per-element Python loop of the block-32
    absmax rounding, and against the exact product within sum_k |w_k| * d_block / 2."""
    layout, tensors, qw = _quantized(16, 64, 32, False)
    x = _activations(2, 64)
    w = intquant.dequantize(qw.q, qw.scale, qw.zero, qw.group_size, torch.float64)
    ref = w4a8_cpu.reference(x, layout, tensors)
    x_hat = torch.empty(2, 64, dtype=torch.float64)
    half_step = torch.empty(2, 64, dtype=torch.float64)
    for m in range(2):
        for b in range(2):
            block = [float(v) for v in x[m, 32 * b : 32 * b + 32]]
            d = float(torch.tensor(max(abs(v) for v in block)) / 127.0)  # float32 division, as the kernel
            for i, v in enumerate(block):
                q = float(torch.round(torch.tensor(v) / torch.tensor(d)))
                x_hat[m, 32 * b + i] = q * d
                half_step[m, 32 * b + i] = d / 2
    torch.testing.assert_close(ref, x_hat @ w.t(), rtol=0, atol=1e-9)
    exact = x.double() @ w.t()
    bound = half_step @ w.abs().t()
    assert ((ref - exact).abs() <= bound * 1.0001 + 1e-12).all()
    assert (ref - exact).abs().max() > 0  # the activations really are rounded


def test_all_zero_rows_and_blocks_stay_exact() -> None:
    """A block of zeros has absmax 0: the kernel must not divide by zero (scale 1, codes 0)."""
    layout, tensors, _ = _quantized(32, 128, 64, False)
    state = w4a8_cpu.pack(layout, tensors)
    x = _activations(3, 128)
    x[0] = 0.0
    x[1, 32:64] = 0.0
    out = w4a8_cpu.w4a8_mm(x, state)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    assert _rel(out, w4a8_cpu.reference(x, layout, tensors)) < F32_REL


def test_chosen_only_by_name_and_refuses_what_it_cannot_run() -> None:
    dev = torch.device("cpu")
    lay4 = QuantLayout(64, 576, 4, 64, False)
    assert select_kernel(lay4, dev, torch.bfloat16).name == "cpu_int4pack"  # never by default
    assert select_kernel(lay4, dev, torch.bfloat16, prefer="cpu_w4a8").name == "cpu_w4a8"
    lay8 = QuantLayout(64, 576, 8, 576, True)
    with preferred_kernels("cpu_w4a8,cpu_int8pack"):  # a model mixing int4 and int8 layers
        assert select_kernel(lay4, dev, torch.bfloat16).name == "cpu_w4a8"
        assert select_kernel(lay8, dev, torch.bfloat16).name == "cpu_int8pack"
    with pytest.raises(ValueError, match="needs 4 bits"):
        select_kernel(lay8, dev, torch.bfloat16, prefer="cpu_w4a8")
    ok, reason = w4a8_cpu.W4A8CpuKernel().can_implement(QuantLayout(64, 576, 4, 48, False), dev, torch.bfloat16)
    assert not ok and "multiples of 32" in reason
    ok, reason = w4a8_cpu.W4A8CpuKernel().can_implement(QuantLayout(40, 576, 4, 64, False), dev, torch.bfloat16)
    assert not ok and "multiple of 16" in reason
    ok, reason = w4a8_cpu.W8A8CpuKernel().can_implement(lay4, dev, torch.bfloat16)
    assert not ok and "needs 8 bits" in reason


def test_quant_linear_and_compiled_graph_use_the_operator() -> None:
    gen = torch.Generator().manual_seed(3)
    qw = intquant.quantize_rtn(torch.randn(48, 128, generator=gen), 4, 64, symmetric=False)
    bias = torch.randn(48, generator=gen)
    mod = QuantLinear.from_quantized(qw, bias, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 128, generator=gen).bfloat16()
    with preferred_kernels("cpu_w4a8"):
        eager = mod(x)
        compiled = torch.compile(mod, fullgraph=True, dynamic=False)(x)  # the fake kernel traces it
    assert mod._kernel_state is not None and mod._kernel_state[0].name == "cpu_w4a8"
    layout = QuantLayout(48, 128, 4, 64, False)
    tensors = QuantTensors(intquant.pack(qw.q, 4), qw.scale.bfloat16(), qw.zero)
    ref = w4a8_cpu.reference(x.reshape(6, 128), layout, tensors).reshape(2, 3, 48) + bias.bfloat16().double()
    assert _rel(eager, ref) < BF16_REL
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def _int4_llama() -> torch.nn.Module:
    model = random_llama(0, torch.float32, vocab_size=256, **TINY_CONFIG)
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            qw = intquant.quantize_rtn(mod.weight.detach(), 4, 32, symmetric=False)
            model.model.layers.set_submodule(name, QuantLinear.from_quantized(qw, None, dtype=torch.float32))
    return model


def test_runtime_prefill_with_w4a8_tracks_the_exact_int4_model() -> None:
    """A tiny int4 Llama through the runtime (fused q/k/v and gate/up): logits with int8 activations
    stay close to the same model's exact-activation logits (a small approximation, same model)."""
    from llmcomp.runtime import ModelRunner

    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    exact = ModelRunner(_int4_llama(), 1, 32).prefill(0, ids, logits_for_all=True).double()
    with preferred_kernels("cpu_w4a8"):
        runner = ModelRunner(_int4_llama(), 1, 32)
        approx = runner.prefill(0, ids, logits_for_all=True).double()
    used = {m._kernel_state[0].name for m in runner.model.modules() if isinstance(m, QuantLinear) and m._kernel_state}
    assert "cpu_w4a8" in used
    assert float((approx - exact).norm() / exact.norm()) < 0.05
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
