"""Triton kernels (GEMM, LUT GEMM, sparse GEMV) against an independent float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter: a module-scoped fixture sets
``TRITON_INTERPRET=1`` for this module's tests only (restored afterwards, so other test modules
and the processes they spawn never see it). That works whenever it is set, even after ``triton``
was imported, because the kernel module decorates its kernels lazily in the current mode and
uses no ``@triton.jit`` helpers of ``triton.language``. With a GPU the same tests run natively.
"""

import pytest
import torch

pytest.importorskip("triton")

from llmcomp.kernels import lut_gemm, sparse_gemv  # noqa: E402
from llmcomp.kernels import triton_configs as tc  # noqa: E402
from llmcomp.kernels import triton_gemm as tg  # noqa: E402
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, select_kernel  # noqa: E402

ON_GPU = torch.cuda.is_available() and not tg.interpreting()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (a, r): |y - ref| <= a * (|x| @ |W|.T + |bias|) + r * |ref|.
# fp16: weights rounded to fp16 before the dot (2^-11) and fp16 output. bf16: bf16 weights on
# GPU (2^-8), and the interpreter truncates bf16 stores (2^-7). fp32: fp32 dot and rounding.
TOL = {F16: (1e-3, 1e-3), BF16: (8e-3, 1e-2), F32: (2e-5, 2e-5)}


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """Run the kernels in Triton's CPU interpreter when there is no GPU (this module only)."""
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


# ---------------------------------------------------------------- independent reference helpers
def pack_spec(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed q [N, K] exactly as the storage contract says, written out plainly."""
    if bits == 8:
        return q.to(torch.int8)
    vpw = 32 // bits
    n, k = q.shape
    words = torch.zeros(n, -(-k // vpw), dtype=torch.int64)
    for j in range(k):
        words[:, j // vpw] |= (q[:, j].to(torch.int64) + 2 ** (bits - 1)) << ((j % vpw) * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def random_layer(n: int, k: int, bits: int, group: int, sym: bool, seed: int):
    """Random q over the full signed range, group scales spanning 4x, zero points in range."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (n, k), generator=gen).to(torch.int8)
    scale = (torch.rand(n, groups, generator=gen) * 1.5 + 0.5) * (0.1 / 2 ** (bits - 1))
    zero = None if sym else torch.randint(lo, hi + 1, (n, groups), generator=gen).to(torch.int8)
    return q, scale, zero


def dequant64(q, scale, zero, group) -> torch.Tensor:
    g = torch.arange(q.shape[1]) // group
    z = 0.0 if zero is None else zero.double()[:, g]
    return (q.double() - z) * scale.double()[:, g]


def assert_matches(y, x, w64, bias, dtype, cols=None):
    """Compare with x @ w64.T (+ bias) in float64, within the bound of the dtype's rounding."""
    x64, w64 = x.double().cpu(), w64.double()
    if cols is not None:
        x64, w64 = x64[..., cols], w64[:, cols]
    ref = x64 @ w64.T
    bound = x64.abs() @ w64.abs().T
    if bias is not None:
        ref = ref + bias.double().cpu()
        bound = bound + bias.double().cpu().abs()
    a, r = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double().cpu() - ref).abs()
    excess = err - (a * bound + r * ref.abs() + 1e-6)
    assert excess.max() <= 0, f"max error {err.max():.3e} exceeds the bound by {excess.max():.3e}"


def make_case(m, n, k, bits, group, sym, dtype, with_bias, seed=0):
    q, scale, zero = random_layer(n, k, bits, group, sym, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen) if with_bias else None
    layout = QuantLayout(n, k, bits, group, sym)
    tensors = QuantTensors(pack_spec(q, bits), scale, zero)
    return x, bias, layout, tensors, dequant64(q, scale, zero, group)


# ------------------------------------------------------------------------------- GEMM
GEMM_CASES = [
    # m, n, k, bits, group, sym, dtype, bias
    (1, 48, 256, 4, 128, True, F16, False),  # decode, split-K
    (1, 40, 200, 4, 64, False, F32, True),  # partial last group (200 = 3 * 64 + 8)
    (2, 24, 96, 4, 16, False, BF16, True),
    (3, 96, 160, 4, 32, True, BF16, False),
    (5, 36, 100, 4, 100, False, F16, True),  # per-channel, K not a multiple of 8 (padded word)
    (7, 33, 130, 8, 16, False, F16, False),  # int8, partial last group of 2
    (16, 64, 192, 8, 192, True, BF16, True),  # int8 per-channel, largest decode M
    (17, 50, 96, 4, 32, False, F32, False),  # first prefill bucket, odd N
    (33, 72, 256, 4, 128, False, F16, True),  # several M tiles
    (64, 40, 128, 8, 64, False, F32, True),
    (4, 40, 110, 4, 20, True, F16, False),  # group 20: no power-of-two block fits, gathered scales
    (9, 56, 144, 4, 48, False, BF16, False),  # group 48: BLOCK_K shrinks to 16
    (2, 32, 96, 2, 32, False, F16, False),  # 2-bit
    (3, 24, 100, 3, 32, True, F32, True),  # 3-bit (10 per word), partial group
]


@pytest.mark.parametrize("m,n,k,bits,group,sym,dtype,with_bias", GEMM_CASES)
def test_gemm_matches_float64_reference(m, n, k, bits, group, sym, dtype, with_bias):
    x, bias, layout, tensors, w64 = make_case(m, n, k, bits, group, sym, dtype, with_bias, seed=m * 1000 + k)
    w = tg.prepare_weights(layout, tensors).to(DEVICE)
    y = tg.quant_matmul(x.to(DEVICE), w, None if bias is None else bias.to(DEVICE))
    assert_matches(y, x, w64, bias, dtype)


@pytest.mark.parametrize(
    "cfg",
    [tc.GemmConfig(16, 16, 16, 3), tc.GemmConfig(32, 64, 64, 1), tc.GemmConfig(16, 32, 32, 4)],
    ids=["split3", "wide", "split4-last-split-empty"],
)
def test_gemm_forced_configs(cfg):
    x, bias, layout, tensors, w64 = make_case(5, 40, 136, 4, 64, False, F32, True, seed=7)
    w = tg.prepare_weights(layout, tensors).to(DEVICE)
    assert_matches(tg.quant_matmul(x.to(DEVICE), w, bias.to(DEVICE), config=cfg), x, w64, bias, F32)


def test_gemm_batched_input_and_empty():
    x, _, layout, tensors, w64 = make_case(6, 24, 64, 4, 32, True, F16, False, seed=3)
    w = tg.prepare_weights(layout, tensors).to(DEVICE)
    x3 = x.reshape(2, 3, 64).to(DEVICE)
    y = tg.quant_matmul(x3, w)
    assert y.shape == (2, 3, 24)
    assert_matches(y.reshape(6, 24), x, w64, None, F16)
    assert tg.quant_matmul(x3[:, :0], w).shape == (2, 0, 24)


def test_reference_check_catches_a_wrong_last_group():
    """The tolerance is tight enough to see one wrong scale in the short last group."""
    x, _, layout, tensors, w64 = make_case(3, 16, 200, 4, 64, True, F16, False, seed=11)
    w = tg.prepare_weights(layout, tensors).to(DEVICE)
    w.scale[-1] *= 1.5
    with pytest.raises(AssertionError):
        assert_matches(tg.quant_matmul(x.to(DEVICE), w), x, w64, None, F16)


def test_pack_spec_agrees_with_intquant():
    from llmcomp import intquant

    for bits in (2, 3, 4, 8):
        q, _, _ = random_layer(5, 37, bits, 37, True, seed=bits)
        assert torch.equal(intquant.pack(q, bits), pack_spec(q, bits))


# ------------------------------------------------------------------------------- dispatch
def test_dispatch_selects_triton_when_forced_and_runs_it():
    x, bias, layout, tensors, w64 = make_case(3, 40, 96, 4, 32, False, F16, True, seed=5)
    kernel = select_kernel(layout, DEVICE, F16, prefer="triton")
    assert kernel.name == "triton"
    state = kernel.prepare(layout, tensors, F16)
    y = kernel.apply(x.to(DEVICE), layout, state, bias.to(DEVICE))
    assert_matches(y, x, w64, bias, F16)


def test_can_implement_is_honest(monkeypatch):
    kernel = tg.TritonGemmKernel()
    layout = QuantLayout(64, 64, 4, 32, True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = kernel.can_implement(layout, torch.device("cpu"), F16)
    assert not ok and "CUDA" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel.can_implement(layout, torch.device("cpu"), F16) == (True, "")
    assert not kernel.can_implement(QuantLayout(64, 64, 5, 32, True), torch.device("cpu"), F16)[0]
    assert not kernel.can_implement(layout, torch.device("cpu"), torch.float64)[0]


def test_triton_not_chosen_for_cpu_unless_asked(monkeypatch):
    monkeypatch.delenv("LLMCOMP_KERNEL", raising=False)
    layout = QuantLayout(64, 64, 4, 32, True)
    assert select_kernel(layout, torch.device("cpu"), F16).name != "triton"


def test_kernels_follow_the_interpreter_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tg.jit_kernels().INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tg.jit_kernels().INTERPRETED


# ------------------------------------------------------------------------------- configs
def test_fit_block_k():
    assert tc.fit_block_k(128, 128, 4096) == (128, True)
    assert tc.fit_block_k(128, 32, 4096) == (32, True)
    assert tc.fit_block_k(64, 48, 4096) == (16, True)
    assert tc.fit_block_k(64, 20, 4096) == (64, False)
    assert tc.fit_block_k(256, 4096, 4096) == (256, True)  # per-channel


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32, 64, 128, 512])
def test_cuda_candidates_are_valid(m):
    for n, k, group in [(4096, 4096, 128), (11008, 4096, 32), (4096, 14336, 14336)]:
        cands = tc.candidates(m, n, k, group, on_cuda=True, num_sms=132)
        assert cands and len(set(cands)) == len(cands)
        for c in cands:
            assert min(c.block_m, c.block_n, c.block_k) >= tc.MIN_DOT
            assert group >= k or group % c.block_k == 0
            assert 1 <= c.split_k <= tc.MAX_SPLIT_K
            assert (c.block_m == 16) == (m <= tc.DECODE_MAX_M)
    decode = tc.candidates(1, 4096, 4096, 128, on_cuda=True, num_sms=132)
    assert max(c.split_k for c in decode) > 1  # decode fills the GPU by splitting K


def test_tuned_config_is_cached():
    calls = []
    cands = [tc.GemmConfig(16, 32, 32), tc.GemmConfig(16, 64, 32)]
    key = ("test", 1)
    assert tc.tuned_config(key, cands, calls.append, on_cuda=False) == cands[0]
    assert tc.tuned_config(key, cands[::-1], calls.append, on_cuda=False) == cands[0]
    assert calls == []  # nothing is timed off CUDA


# ------------------------------------------------------------------------------- LUT GEMM
@pytest.mark.parametrize(
    "m,n,k,bits,group,per_row,dtype,scaled",
    [
        (1, 40, 128, 8, 64, False, F16, True),
        (3, 24, 100, 4, 32, True, BF16, True),  # partial last group, padded word
        (17, 32, 96, 4, 96, False, F32, False),
        (5, 36, 72, 8, 16, True, F32, True),
    ],
)
def test_lut_gemm(m, n, k, bits, group, per_row, dtype, scaled):
    gen = torch.Generator().manual_seed(m + k)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    lut = torch.randn(n if per_row else 1, 2**bits, generator=gen)
    groups = -(-k // group)
    scale = torch.rand(n, groups, generator=gen) + 0.5 if scaled else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    table = lut if per_row else lut[0]
    w = lut_gemm.prepare_lut(lut_gemm.pack_codes(codes, bits), table, scale, bits, k, group)
    y = lut_gemm.lut_matmul(x.to(DEVICE), w.to(DEVICE))
    w64 = torch.gather(lut.double().expand(n, -1), 1, codes)
    if scaled:
        w64 = w64 * scale.double()[:, torch.arange(k) // group]
    assert_matches(y, x, w64, None, dtype)


def test_lut_rejects_bad_inputs():
    with pytest.raises(ValueError):
        lut_gemm.pack_codes(torch.full((2, 8), 16), 4)
    codes = lut_gemm.pack_codes(torch.zeros(2, 8, dtype=torch.int64), 4)
    with pytest.raises(ValueError):
        lut_gemm.prepare_lut(codes, torch.zeros(8), None, 4, 8)


# ------------------------------------------------------------------------------- sparse GEMV
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("m", [1, 3, 20])
def test_sparse_gemv_dense(dtype, m):
    gen = torch.Generator().manual_seed(m)
    n, k = 40, 200
    weight = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    cols = sparse_gemv.select_columns(x, 70)
    y = sparse_gemv.sparse_matmul(x.to(DEVICE), sparse_gemv.prepare_sparse_dense(weight.to(DEVICE)), cols)
    assert_matches(y, x, weight.double(), None, dtype, cols=cols.long())


@pytest.mark.parametrize(
    "bits,group,sym,dtype",
    [(4, 32, False, F16), (8, -1, True, BF16), (4, 64, True, F32), (3, 16, False, F32)],
)
def test_sparse_gemv_quantized(bits, group, sym, dtype):
    n, k = 36, 150
    eff = k if group == -1 else group
    x, bias, _, tensors, w64 = make_case(2, n, k, bits, eff, sym, dtype, True, seed=bits + eff)
    w = sparse_gemv.prepare_sparse_quant(QuantLayout(n, k, bits, eff, sym), tensors).to(DEVICE)
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.randperm(k, generator=torch.Generator().manual_seed(1))[:50]] = True
    y = sparse_gemv.sparse_matmul(x.to(DEVICE), w, mask, bias.to(DEVICE))
    assert_matches(y, x, w64, bias, dtype, cols=mask.nonzero().flatten())


def test_select_columns_wina_and_empty_selection():
    x = torch.tensor([[0.1, -3.0, 0.5, 2.0]])
    assert sparse_gemv.select_columns(x, 2).tolist() == [1, 3]
    norms = torch.tensor([100.0, 0.1, 1.0, 1.0])
    assert sparse_gemv.select_columns(x, 2, norms).tolist() == [0, 3]  # |x| * ||W[:, k]||
    w = sparse_gemv.prepare_sparse_dense(torch.randn(5, 4))
    bias = torch.randn(5)
    y = sparse_gemv.sparse_matmul(x, w, torch.zeros(0, dtype=torch.int64), bias)
    assert torch.allclose(y, bias[None])
