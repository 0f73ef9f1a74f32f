"""Codebook kernels for CodebookLinear: the blocked CPU kernel and the Triton LUT GEMM (in Triton's
CPU interpreter, fp32, when there is no GPU) against a float64 reference."""

import pytest
import torch

from llmcomp import codebook as cb
from llmcomp import gg
from llmcomp.kernels.dispatch import select_kernel
from llmcomp.modules.codebook_linear import CodebookLinear


def layer(fmt: str, n: int, k: int, group: int, seed: int, per_row: bool = False) -> CodebookLinear:
    w = gg.sample((n, k), 1.4, 0.03, generator=torch.Generator().manual_seed(seed))
    codes, scale, table = cb.quantize(w, fmt, group)
    if per_row:  # one table per output row: the shared table, scaled differently per row
        table = table.unsqueeze(0) * torch.linspace(0.5, 1.5, n).unsqueeze(1)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    return CodebookLinear.from_codes(codes, scale, table, cb.FORMAT_BITS[fmt], group, bias, torch.float32, fmt)


def reference(mod: CodebookLinear, x: torch.Tensor) -> torch.Tensor:
    """float64, from the stored tensors written out plainly (no dispatch helpers)."""
    k, bits = mod.in_features, mod.bits
    if bits == 8:
        codes = mod.weight_packed.to(torch.int64)
    else:
        vpw = 32 // bits
        words = mod.weight_packed.to(torch.int64) & 0xFFFFFFFF
        codes = torch.stack([(words[:, j // vpw] >> ((j % vpw) * bits)) & (2**bits - 1) for j in range(k)], dim=1)
    lut = mod.weight_lut.double()
    vals = lut[codes] if lut.dim() == 1 else torch.gather(lut, 1, codes)
    w = vals * mod.weight_scale.double()[:, torch.arange(k) // mod.group_size]
    return x.double() @ w.T + mod.bias.double()


CASES = [("rf8", 200, 96, -1, False), ("gg4", 300, 100, 32, False), ("nf4", 40, 128, 64, True),
         ("fp8-e5m2", 24, 72, 24, False)]


@pytest.mark.parametrize("fmt,n,k,group,per_row", CASES)
@pytest.mark.parametrize("m", [1, 7])
def test_blocked_cpu_kernel_matches_float64(fmt, n, k, group, per_row, m, monkeypatch):
    monkeypatch.setenv("LLMCOMP_KERNEL", "cpu_codebook_blocked")
    mod = layer(fmt, n, k, group, seed=n + k, per_row=per_row)
    x = torch.randn(m, 3, k, generator=torch.Generator().manual_seed(m))
    assert select_kernel(mod.layout, x.device, x.dtype).name == "cpu_codebook_blocked"
    torch.testing.assert_close(mod(x).double(), reference(mod, x), rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    mod.invalidate_kernel_cache()
    ref = reference(mod, xb.float())
    torch.testing.assert_close(mod(xb).double(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().mean()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_cpu_kernel_is_the_cached_reference(dtype, monkeypatch):
    monkeypatch.delenv("LLMCOMP_KERNEL", raising=False)
    mod = layer("rf8", 16, 32, -1, seed=0)
    assert select_kernel(mod.layout, torch.device("cpu"), dtype).name == "reference_codebook"


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from llmcomp.kernels import triton_gemm

    if not (torch.cuda.is_available() and not triton_gemm.interpreting()):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("fmt,n,k,group,per_row", CASES[:3])
def test_codebook_linear_through_triton_lut(triton_interpreter, fmt, n, k, group, per_row, monkeypatch):
    monkeypatch.setenv("LLMCOMP_KERNEL", "triton_lut")
    mod = layer(fmt, n, k, group, seed=k, per_row=per_row).to(triton_interpreter)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    assert select_kernel(mod.layout, triton_interpreter, torch.float32).name == "triton_lut"
    got = mod(x.to(triton_interpreter)).cpu().double()
    torch.testing.assert_close(got, reference(mod.cpu(), x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", ["rf8", "fp8-e4m3"])
@pytest.mark.parametrize("m", [1, 2, 5])  # 5 > INT8X2_MAX_M: the decode-on-the-fly path
@pytest.mark.parametrize("k", [96, 100])  # 100: rows padded to a multiple of 16
def test_int8x2_cpu_kernel_matches_float64(fmt, m, k, monkeypatch):
    from llmcomp.kernels import codebook_cpu

    monkeypatch.setenv("LLMCOMP_KERNEL", "cpu_codebook_int8x2")
    mod = layer(fmt, 48, k, -1, seed=k + m)
    x = torch.randn(m, k + 1, generator=torch.Generator().manual_seed(m))[:, 1:].to(torch.bfloat16)  # misaligned
    assert select_kernel(mod.layout, x.device, torch.bfloat16).name == "cpu_codebook_int8x2"
    q1, q2, a1, a2 = codebook_cpu.split_table(mod.weight_lut)
    assert float((a1 * q1.double() + a2 * q2.double() - mod.weight_lut.double()).abs().max()) <= a2 / 2 + 1e-12
    ref = reference(mod, x.float())
    got = mod(x).double()
    # bf16 activations, scales and output: a few bf16 ulps of the row's magnitude
    tol = 2e-2 * float(ref.abs().mean())
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=tol)
    with pytest.raises(ValueError, match="one scale per output channel"):
        select_kernel(layer("gg4", 8, 64, 32, 0).layout, x.device, torch.bfloat16)
