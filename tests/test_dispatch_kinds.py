"""Kernel dispatch by layout kind (int_affine, codebook, activation_sparse) against float64 references.

The Triton kernels of the new kinds (``triton_lut``, ``triton_sparse_gemv``) are forced with
``prefer=`` and run in Triton's CPU interpreter when there is no GPU: as in
tests/test_kernels_triton.py, a module-scoped fixture sets ``TRITON_INTERPRET=1`` for this module's
tests only (the kernels are decorated lazily, so the late setting works). CPU kernels and selection
rules do not care about the variable.
"""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch
import torch.nn.functional as F

from llmcomp import intquant
from llmcomp.kernels import cpu
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    CodebookLayout,
    CodebookTensors,
    DenseLayout,
    QuantLayout,
    QuantTensors,
    select_kernel,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from llmcomp.kernels import triton_gemm as tg

ON_GPU = HAS_TRITON and torch.cuda.is_available() and not tg.interpreting()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CPU = torch.device("cpu")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# (a, r): |y - ref| <= a * (|x| @ |W|.T + |bias|) + r * |ref| (as in tests/test_kernels_triton.py).
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


@pytest.fixture(autouse=True)
def no_forced_kernel(monkeypatch):
    monkeypatch.delenv("LLMCOMP_KERNEL", raising=False)


# ---------------------------------------------------------------- independent float64 references
def assert_matches(y, x64, w64, bias, dtype):
    """``y`` vs ``x64 @ w64.T (+ bias)`` within the rounding bound of ``dtype``."""
    x64, w64 = x64.double().cpu(), w64.double().cpu()
    ref, bound = x64 @ w64.T, x64.abs() @ w64.abs().T
    if bias is not None:
        ref, bound = ref + bias.double().cpu(), bound + bias.double().cpu().abs()
    a, r = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double().cpu() - ref).abs()
    excess = err - (a * bound + r * ref.abs() + 1e-6)
    assert excess.max() <= 0, f"max error {err.max():.3e} exceeds the bound by {excess.max():.3e}"


def naive_selection(x: torch.Tensor, w64: torch.Tensor, density: float, criterion: str) -> list[int]:
    """Columns kept, written out with loops: score_k = max_m |x[m, k]| (* ||W[:, k]|| for wina)."""
    m, k = x.shape
    scores = []
    for j in range(k):
        s = max(abs(float(x[i, j])) for i in range(m))
        if criterion == "wina":
            s *= math.sqrt(sum(float(v) ** 2 for v in w64[:, j]))
        scores.append((s, j))
    keep = math.ceil(density * k)
    return sorted(j for _, j in sorted(scores, reverse=True)[:keep])


def naive_sparse_matmul(x: torch.Tensor, w64: torch.Tensor, cols: list[int], bias) -> torch.Tensor:
    y = torch.zeros(x.shape[0], w64.shape[0], dtype=torch.float64)
    for j in cols:
        y += x[:, j : j + 1].double() * w64[:, j][None, :]
    return y if bias is None else y + bias.double()


def sparse_case(base: str, n: int, k: int, density: float, criterion: str, dtype, seed: int):
    """(layout, tensors, float64 weight as the kernels see it)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (0.5 + torch.rand(1, k, generator=gen))  # columns differ in norm
    if base == "dense":
        w = w.to(dtype)
        return ActivationSparseLayout(DenseLayout(n, k), density, criterion), ActivationSparseTensors(w), w.double()
    qw = intquant.quantize_rtn(w, 4, 32, symmetric=False)
    layout = ActivationSparseLayout(QuantLayout(n, k, 4, qw.group_size, False), density, criterion)
    tensors = ActivationSparseTensors(QuantTensors(intquant.pack(qw.q, 4), qw.scale, qw.zero))
    return layout, tensors, intquant.dequantize(qw.q, qw.scale, qw.zero, qw.group_size, torch.float64)


def codebook_case(n: int, k: int, bits: int, group: int, per_row: bool, scaled: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    lut = torch.randn(n if per_row else 1, 2**bits, generator=gen)
    scale = torch.rand(n, -(-k // group), generator=gen) + 0.5 if scaled else None
    w64 = torch.gather(lut.double().expand(n, -1), 1, codes)
    if scaled:
        w64 = w64 * scale.double()[:, torch.arange(k) // group]
    stored = codes.to(torch.uint8) if bits == 8 else intquant.pack(codes - 2 ** (bits - 1), bits)
    tensors = CodebookTensors(stored, lut if per_row else lut[0], scale)
    return CodebookLayout(n, k, bits, group, per_row), tensors, w64


# ---------------------------------------------------------------- selection by kind
def test_select_kernel_by_kind_on_cpu():
    assert select_kernel(QuantLayout(64, 576, 4, 64, False), CPU, BF16).name == "cpu_int4pack"
    assert select_kernel(QuantLayout(64, 576, 8, 576, True), CPU, BF16).name == "cpu_int8pack"
    assert select_kernel(QuantLayout(64, 576, 4, 64, False), CPU, F32).name == "cpu_dense"
    assert select_kernel(QuantLayout(64, 576, 4, 64, False), CPU, torch.float64).name == "reference"
    assert select_kernel(CodebookLayout(64, 576, 4, 64, True), CPU, BF16).name == "reference_codebook"
    dense = ActivationSparseLayout(DenseLayout(64, 576), 0.5, "teal")
    quant = ActivationSparseLayout(QuantLayout(64, 576, 4, 64, False), 0.25, "wina")
    for layout in (dense, quant):
        for dtype in (F32, BF16, F16):
            assert select_kernel(layout, CPU, dtype).name == "cpu_sparse_gather"
    assert select_kernel(dense, CPU, torch.float64).name == "reference_activation_sparse"


def test_forcing_a_kernel_of_another_kind_is_a_value_error():
    with pytest.raises(ValueError, match="runs int_affine layouts, not 'codebook'"):
        select_kernel(CodebookLayout(64, 128, 4, 64, False), CPU, F32, prefer="cpu_dense")
    with pytest.raises(ValueError, match="runs activation_sparse layouts, not 'int_affine'"):
        select_kernel(QuantLayout(64, 128, 4, 64, False), CPU, F32, prefer="cpu_sparse_gather")
    with pytest.raises(ValueError, match="unknown kernel"):
        select_kernel(QuantLayout(64, 128, 4, 64, False), CPU, F32, prefer="no_such_kernel")


@needs_triton
def test_forcing_triton_kernels_of_another_kind():
    with pytest.raises(ValueError, match="runs codebook layouts, not 'int_affine'"):
        select_kernel(QuantLayout(64, 128, 4, 64, False), CPU, F32, prefer="triton_lut")
    sparse = ActivationSparseLayout(DenseLayout(64, 128), 0.5)
    with pytest.raises(ValueError, match="runs int_affine layouts, not 'activation_sparse'"):
        select_kernel(sparse, CPU, F32, prefer="triton")


def test_env_preference_applies_to_its_own_kind_only(monkeypatch):
    monkeypatch.setenv("LLMCOMP_KERNEL", "cpu_dense,reference_activation_sparse")
    assert select_kernel(QuantLayout(64, 576, 4, 64, False), CPU, BF16).name == "cpu_dense"
    assert select_kernel(ActivationSparseLayout(DenseLayout(64, 576), 0.5), CPU, F32).name == (
        "reference_activation_sparse"
    )
    assert select_kernel(CodebookLayout(64, 576, 4, 64, True), CPU, F32).name == "reference_codebook"
    monkeypatch.setenv("LLMCOMP_KERNEL", "cpu_dense,nope")
    with pytest.raises(ValueError, match="nope"):
        select_kernel(QuantLayout(64, 576, 4, 64, False), CPU, BF16)


def test_unknown_kind_lists_every_reason():
    class FactorizedLayout:
        kind = "factorized"

    with pytest.raises(RuntimeError) as info:
        select_kernel(FactorizedLayout(), CPU, F32)
    msg = str(info.value)
    assert "cpu_dense: runs int_affine, not factorized" in msg
    assert "cpu_sparse_gather: runs activation_sparse, not factorized" in msg
    assert "no reference kernel for kind 'factorized'" in msg


def test_layouts_validate_and_keep_their_kind():
    assert QuantLayout(8, 16, 4, 16, True).kind == "int_affine"
    assert QuantLayout(8, 16, 4, 16, True) == QuantLayout(out_features=8, in_features=16, bits=4, group_size=16,
                                                          symmetric=True)
    with pytest.raises(ValueError, match="bits"):
        CodebookLayout(8, 16, 5, 16, False)
    with pytest.raises(ValueError, match="group_size"):
        CodebookLayout(8, 16, 4, 32, False)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="density"):
            ActivationSparseLayout(DenseLayout(8, 16), bad)
    with pytest.raises(ValueError, match="criterion"):
        ActivationSparseLayout(DenseLayout(8, 16), 0.5, "topk")  # type: ignore[arg-type]
    layout = ActivationSparseLayout(DenseLayout(8, 10), 0.3, "wina")
    assert (layout.kind, layout.keep, layout.bits, layout.dense) == ("activation_sparse", 3, 16, True)
    assert ActivationSparseLayout(DenseLayout(8, 4096), 0.25).keep == 1024
    assert ActivationSparseLayout(DenseLayout(8, 10), 0.01).keep == 1


# ---------------------------------------------------------------- codebook
@pytest.mark.parametrize("per_row,scaled,bits", [(False, True, 4), (True, True, 8), (True, False, 2)])
def test_codebook_reference_matches_float64(per_row, scaled, bits):
    layout, tensors, w64 = codebook_case(24, 100, bits, 32, per_row, scaled, seed=bits)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(9))
    kernel = select_kernel(layout, CPU, F32)
    y = kernel.apply(x, layout, kernel.prepare(layout, tensors, F32), None)
    assert_matches(y, x, w64, None, F32)
    with pytest.raises(ValueError, match="lut must be"):  # the table's shape must match per_row_table
        kernel.prepare(CodebookLayout(24, 100, bits, 32, not per_row), tensors, F32)


@needs_triton
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize(
    "m,n,k,bits,group,per_row,scaled",
    [(1, 40, 128, 4, 64, False, True), (3, 24, 100, 4, 32, True, True), (5, 36, 72, 8, 16, True, False)],
)
def test_triton_lut_through_dispatch(m, n, k, bits, group, per_row, scaled, dtype):
    layout, tensors, w64 = codebook_case(n, k, bits, group, per_row, scaled, seed=m + k)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen) if m > 1 else None
    kernel = select_kernel(layout, DEVICE, dtype, prefer="triton_lut")
    assert kernel.name == "triton_lut"
    state = kernel.prepare(layout, tensors, dtype)  # on the CPU; apply moves it to x's device
    y = kernel.apply(x.to(DEVICE), layout, state, None if bias is None else bias.to(DEVICE))
    assert_matches(y, x, w64, bias, dtype)


# ---------------------------------------------------------------- activation sparsity
@pytest.mark.parametrize("base", ["dense", "int4"])
@pytest.mark.parametrize("criterion", ["teal", "wina"])
@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize("m", [1, 3, 9])  # 9 > cpu.SPARSE_BAG_MAX_M: the gather-then-GEMM path
def test_activation_sparse_cpu_and_reference_match_naive_loops(base, criterion, density, m):
    n, k = (40, 96) if base == "dense" else (33, 96)  # 40 = 8 parallel bags of 5 outputs, 33: one bag
    layout, tensors, w64 = sparse_case(base, n, k, density, criterion, F32, seed=k + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    cols = naive_selection(x, w64, density, criterion)
    assert len(cols) == layout.keep
    ref = naive_sparse_matmul(x, w64, cols, bias)
    outs = {}
    for name in ("cpu_sparse_gather", "reference_activation_sparse"):
        kernel = select_kernel(layout, CPU, F32, prefer=name)
        outs[name] = kernel.apply(x, layout, kernel.prepare(layout, tensors, F32), bias)
        assert_matches(outs[name], x[:, cols], w64[:, cols], bias, F32)
        torch.testing.assert_close(outs[name].double(), ref, rtol=1e-5, atol=1e-4)
    if density == 1.0:  # nothing dropped: the dense matmul, up to float error
        dense = F.linear(x, w64.float(), bias)
        for y in outs.values():
            torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    assert cpu.SPARSE_BAG_MAX_M < 9


def test_activation_sparse_cpu_kernel_in_16_bit_with_leading_dims():
    for dtype in (BF16, F16):
        layout, tensors, w64 = sparse_case("dense", 30, 64, 0.5, "wina", dtype, seed=2)  # 30: 2 bags per row
        x = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
        kernel = select_kernel(layout, CPU, dtype)
        y = kernel.apply(x, layout, kernel.prepare(layout, tensors, dtype), None)
        assert y.shape == (2, 1, 30)
        cols = naive_selection(x.reshape(2, 64), w64, 0.5, "wina")
        assert_matches(y.reshape(2, 30), x.reshape(2, 64)[:, cols], w64[:, cols], None, dtype)
    for name in ("cpu_sparse_gather", "reference_activation_sparse"):  # an empty batch
        kernel = select_kernel(layout, CPU, dtype, prefer=name)
        assert kernel.apply(x[:0], layout, kernel.prepare(layout, tensors, dtype), None).shape == (0, 1, 30)


def test_given_column_norms_are_used():
    layout, tensors, w64 = sparse_case("dense", 16, 8, 0.25, "wina", F32, seed=4)
    x = torch.ones(1, 8)
    norms = torch.zeros(8)
    norms[[1, 6]] = 1.0  # only columns 1 and 6 can win
    tensors = ActivationSparseTensors(tensors.base, norms)
    for name in ("cpu_sparse_gather", "reference_activation_sparse"):
        kernel = select_kernel(layout, CPU, F32, prefer=name)
        y = kernel.apply(x, layout, kernel.prepare(layout, tensors, F32), None)
        torch.testing.assert_close(y.double(), naive_sparse_matmul(x, w64, [1, 6], None))


@needs_triton
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("base,criterion,m", [("dense", "teal", 1), ("dense", "wina", 3), ("int4", "wina", 1),
                                              ("int4", "teal", 4)])
def test_triton_sparse_gemv_through_dispatch(base, criterion, m, dtype):
    n, k = 40, 150
    layout, tensors, w64 = sparse_case(base, n, k, 0.4, criterion, dtype, seed=m + len(base))
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    kernel = select_kernel(layout, DEVICE, dtype, prefer="triton_sparse_gemv")
    assert kernel.name == "triton_sparse_gemv"
    y = kernel.apply(x.to(DEVICE), layout, kernel.prepare(layout, tensors, dtype), bias.to(DEVICE))
    cols = naive_selection(x, w64, 0.4, criterion)
    assert_matches(y, x[:, cols], w64[:, cols], bias, dtype)
    reference = select_kernel(layout, CPU, dtype, prefer="reference_activation_sparse")
    y_ref = reference.apply(x, layout, reference.prepare(layout, tensors, dtype), bias)  # same selection
    assert_matches(y_ref, x[:, cols], w64[:, cols], bias, dtype)


def test_sparse_gather_beats_dense_at_batch_1():
    """M = 1, K = N = 4096, density 0.25: reading a quarter of the weight must show in the time."""
    n = k = 4096
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(1, k, generator=gen)
    layout = ActivationSparseLayout(DenseLayout(n, k), 0.25, "teal")
    kernel = select_kernel(layout, CPU, F32)
    assert kernel.name == "cpu_sparse_gather"
    state = kernel.prepare(layout, ActivationSparseTensors(weight), F32)
    sparse_fn = lambda: kernel.apply(x, layout, state, None)  # noqa: E731
    dense_fn = lambda: F.linear(x, weight)  # noqa: E731
    times = {"gather": [], "dense": []}
    threads = torch.get_num_threads()
    # One thread: on a shared, oversubscribed host a parallel op waits for its slowest (descheduled)
    # thread, which swamps the difference in bytes read that this test is about.
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # warm-up
            sparse_fn(), dense_fn()
        for _ in range(20):  # interleaved, so both see the same background load
            for name, fn in (("gather", sparse_fn), ("dense", dense_fn)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    gather_t, dense_t = min(times["gather"]), min(times["dense"])
    print(f"\nM=1 K=N=4096 density 0.25 fp32, 1 thread: cpu_sparse_gather {gather_t * 1e3:.3f} ms, "
          f"dense F.linear {dense_t * 1e3:.3f} ms ({gather_t / dense_t:.2f}x)")
    cols = torch.topk(x[0].abs(), layout.keep).indices
    torch.testing.assert_close(sparse_fn(), x[:, cols] @ weight[:, cols].T, rtol=1e-4, atol=1e-4)
    assert gather_t < 0.8 * dense_t
