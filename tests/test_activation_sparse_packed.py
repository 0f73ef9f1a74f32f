"""The packed int4 / int8 gather kernel (``cpu_sparse_packed``) against a naive float64 reference.

Reference: dequantize the codes with the closed form ``(q - z) * s`` in float64 (Python loops),
score ``|x|`` (teal) or ``|x| * ||W[:, k]||`` (wina), keep the ``ceil(d K)`` best, sum the kept
columns. Independent of the kernel's transposed, nibble-split layout and its per-group algebra.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmcomp import intquant
from llmcomp.kernels import act_sparse_packed
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    QuantLayout,
    QuantTensors,
    select_kernel,
)
from llmcomp.modules.activation_sparse import ActivationSparseLinear
from llmcomp.modules.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(not act_sparse_packed.native_available()[0],
                                reason=f"no C kernel: {act_sparse_packed.native_available()[1]}")


def naive_reference(x: torch.Tensor, qw: intquant.QuantizedWeight, density: float, criterion: str) -> torch.Tensor:
    """float64 loops: dequantize element by element, select per call (max over rows), sum kept columns."""
    q, s = qw.q.tolist(), qw.scale.double().tolist()
    z = None if qw.zero is None else qw.zero.double().tolist()
    n, k = len(q), len(q[0])
    g = intquant.effective_group_size(qw.group_size, k)
    w = [[(q[o][i] - (z[o][i // g] if z is not None else 0.0)) * s[o][i // g] for i in range(k)] for o in range(n)]
    rows = x.double().tolist()
    norms = [math.sqrt(sum(w[o][i] ** 2 for o in range(n))) for i in range(k)]
    score = [max(abs(r[i]) for r in rows) * (norms[i] if criterion == "wina" else 1.0) for i in range(k)]
    keep = max(1, math.ceil(density * k - 1e-9))
    kept = sorted(range(k), key=lambda i: -score[i])[:keep]
    return torch.tensor([[sum(w[o][i] * r[i] for i in kept) for o in range(n)] for r in rows], dtype=torch.float64)


def make_layer(n: int, k: int, bits: int, group: int, symmetric: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.3, 2.5, k)  # uneven columns: wina != teal
    qw = intquant.quantize_rtn(w, bits, group, symmetric, scale_dtype=torch.float32)
    layout = QuantLayout(n, k, bits, intquant.effective_group_size(group, k), symmetric)
    return qw, layout, QuantTensors(intquant.pack(qw.q, bits), qw.scale, qw.zero)


@pytest.mark.parametrize(("bits", "n", "k", "group", "symmetric"), [
    (4, 24, 40, 8, False),   # the usual case
    (4, 23, 40, 16, True),   # odd N (one padding column), symmetric
    (4, 16, 37, 8, False),   # K not a multiple of the group
    (4, 20, 48, -1, False),  # per-channel
    (8, 24, 40, 8, False),
    (8, 13, 33, -1, True),
])
@pytest.mark.parametrize("criterion", ["teal", "wina"])
@pytest.mark.parametrize("rows", [1, 3])
def test_packed_kernel_matches_naive_reference(bits, n, k, group, symmetric, criterion, rows):
    qw, qlayout, tensors = make_layer(n, k, bits, group, symmetric, seed=bits * 100 + n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows))
    for density in (0.35, 0.5, 0.75):
        layout = ActivationSparseLayout(qlayout, density, criterion)
        kernel = select_kernel(layout, torch.device("cpu"), torch.float32, prefer="cpu_sparse_packed")
        state = kernel.prepare(layout, ActivationSparseTensors(tensors), torch.float32)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
        got = kernel.apply(x, layout, state, bias)
        want = naive_reference(x, qw, density, criterion) + bias.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_packed_kernel_bf16_and_leading_dims():
    qw, qlayout, tensors = make_layer(32, 64, 4, 16, False, seed=3)
    layout = ActivationSparseLayout(qlayout, 0.5, "wina")
    kernel = select_kernel(layout, torch.device("cpu"), torch.bfloat16, prefer="cpu_sparse_packed")
    state = kernel.prepare(layout, ActivationSparseTensors(tensors), torch.bfloat16)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = kernel.apply(x, layout, state, None)
    assert got.shape == (1, 1, 32) and got.dtype == torch.bfloat16
    want = naive_reference(x.reshape(1, 64).float(), qw, 0.5, "wina")
    torch.testing.assert_close(got.reshape(1, 32).double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("native", [True, False])
def test_packed_kernel_compiles_without_graph_break(native):
    """Under torch.compile the C call is one custom-op node (no graph break) and gives the eager
    result: the C++ operator, or (native=False, when it cannot be built) the Python op over ctypes."""
    qw, qlayout, tensors = make_layer(24, 40, 4, 8, False, seed=5)
    layout = ActivationSparseLayout(qlayout, 0.5, "teal")
    kernel = select_kernel(layout, torch.device("cpu"), torch.float32, prefer="cpu_sparse_packed")
    state = kernel.prepare(layout, ActivationSparseTensors(tensors), torch.float32)
    if native and state.handle is None:
        pytest.skip(f"no C++ operator: {act_sparse_packed.native_op()[1]}")
    if not native:
        state.handle = None
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(6))

    def step(v: torch.Tensor) -> torch.Tensor:
        return kernel.apply(v, layout, state, None) * 2.0

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))
    torch.testing.assert_close(step(x).double(), 2.0 * naive_reference(x, qw, 0.5, "teal"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_module_dispatches_int_base_to_packed_kernel(bits, monkeypatch):
    """An int4/int8-based ActivationSparseLinear runs the packed kernel at batch 1, the bag kernel
    when the C kernel is unavailable, and both agree with the masked dense path."""
    monkeypatch.delenv("LLMCOMP_KERNEL", raising=False)
    qw, _, _ = make_layer(24, 40, bits, 8, False, seed=7)
    mod = ActivationSparseLinear.wrap(QuantLinear.from_quantized(qw, None, dtype=torch.float32), "wina")
    mod.configure(0.5)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(8))
    got = mod(x)
    assert mod._kernel_state[0].name == "cpu_sparse_packed"
    torch.testing.assert_close(got.double(), naive_reference(x, qw, 0.5, "wina"), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(act_sparse_packed, "native_available", lambda: (False, "disabled by the test"))
    mod.invalidate_kernel_cache()
    fallback = mod(x)
    assert mod._kernel_state[0].name == "cpu_sparse_bag"
    torch.testing.assert_close(fallback, got, rtol=1e-5, atol=1e-5)


def test_packed_custom_op_checks_its_inputs_and_breaks_ties_by_index():
    _, qlayout, tensors = make_layer(24, 40, 4, 8, False, seed=9)
    state = act_sparse_packed.pack_transposed(ActivationSparseLayout(qlayout, 0.5), tensors)
    args = (state.codes, state.scale, state.offset)
    with pytest.raises(ValueError, match="contiguous float32/bfloat16 row"):
        act_sparse_packed.packed_gemv(torch.randn(39), None, *args, 20, state.group, 4)
    with pytest.raises(ValueError, match="wrong dtype"):
        act_sparse_packed.packed_gemv(torch.randn(40), None, state.codes.to(torch.int8), state.scale, state.offset,
                                      20, state.group, 4)
    with pytest.raises(ValueError, match="keep"):
        act_sparse_packed.packed_gemv(torch.randn(40), None, *args, 41, state.group, 4)
    # All scores equal: the lowest indices are kept (as a stable descending sort would).
    x = torch.full((40,), 0.5)
    got = act_sparse_packed.packed_gemv(x, None, *args, 7, state.group, 4)
    w = act_sparse_packed.dequantize_rows(state, torch.arange(7)).double()
    torch.testing.assert_close(got.double(), 0.5 * w.sum(0), rtol=1e-5, atol=1e-5)


# -- each instruction-set build, the C++ operator and the ctypes path --------------------------------
@pytest.mark.parametrize("isa", act_sparse_packed.runnable_isas())
@pytest.mark.parametrize(("bits", "n", "k", "group", "symmetric"), [
    (4, 70, 53, 16, False),   # width 35: two 16-lane blocks and a tail; K: three 16-lane blocks and a tail
    (4, 33, 100, 32, True),   # odd N
    (4, 64, 96, -1, False),   # per-channel, no tails
    (8, 37, 53, 8, False),
    (8, 48, 64, 16, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_isa_matches_naive_reference(isa, bits, n, k, group, symmetric, dtype):
    """The AVX-512 intrinsics, the AVX2-vectorised and the plain C loops (whichever this host can
    run) against the float64 reference, for odd sizes that exercise the vector tails."""
    qw, qlayout, tensors = make_layer(n, k, bits, group, symmetric, seed=n + k + bits)
    x = torch.randn(k, generator=torch.Generator().manual_seed(k)).to(dtype)
    for density, criterion in ((0.3, "teal"), (0.5, "wina"), (0.65, "wina")):
        layout = ActivationSparseLayout(qlayout, density, criterion)
        kernel = select_kernel(layout, torch.device("cpu"), dtype, prefer="cpu_sparse_packed")
        state = kernel.prepare(layout, ActivationSparseTensors(tensors), dtype)
        got = act_sparse_packed.packed_gemv(x, state.col_norms, state.codes, state.scale, state.offset, layout.keep,
                                            state.group, bits, isa=isa)
        assert got.dtype == dtype
        want = naive_reference(x[None].float(), qw, density, criterion)[0]
        tol = 1e-4 if dtype == torch.float32 else 1e-2 * want.abs().max().item()  # bf16 output rounding
        torch.testing.assert_close(got[:n].double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=tol)


@pytest.mark.parametrize("isa", act_sparse_packed.runnable_isas())
def test_each_isa_breaks_ties_by_lower_index(isa):
    """Few distinct |x| values (and -0.0, whose sign bit must not make it large): the kept set is
    the first `keep` channels of a stable descending sort, across the vectorised selection's blocks."""
    k, n = 75, 32
    _, qlayout, tensors = make_layer(n, k, 4, 16, False, seed=11)
    state = act_sparse_packed.pack_transposed(ActivationSparseLayout(qlayout, 0.5), tensors)
    x = torch.tensor([(-1.0) ** i * [0.0, 1.0, 2.0, 0.5][(i * 7) % 4] for i in range(k)])
    x[::9] = -0.0
    order = sorted(range(k), key=lambda i: (-abs(x[i].item()), i))
    for keep in (1, 5, 20, 37, 38, 60, 74, 75):
        got = act_sparse_packed.packed_gemv(x, None, state.codes, state.scale, state.offset, keep, state.group, 4,
                                            isa=isa)
        idx = torch.tensor(sorted(order[:keep]))
        want = x[idx].double() @ act_sparse_packed.dequantize_rows(state, idx).double()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_native_op_equals_ctypes_path_and_checks_its_inputs():
    """The C++ operator over registered weights (int handles) computes what the ctypes call does,
    bit for bit (the same C code); a released or unknown handle and a bad keep are errors."""
    op, reason = act_sparse_packed.native_op()
    if op is None:
        pytest.skip(f"no C++ operator: {reason}")
    parts = []
    for bits, n in ((4, 40), (8, 24), (4, 13)):
        _, qlayout, tensors = make_layer(n, 64, bits, 16, False, seed=12 + bits + n)
        state = act_sparse_packed.pack_transposed(ActivationSparseLayout(qlayout, 0.5), tensors)
        state.col_norms = torch.rand(64, generator=torch.Generator().manual_seed(n))
        state.handle = act_sparse_packed.register_native(state)
        parts.append(state)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, generator=torch.Generator().manual_seed(14)).to(dtype)
        keeps = [29, 64, 1]
        want = [act_sparse_packed._run(x, st.col_norms, st.codes, st.scale, st.offset, kp, st.group, st.bits)
                for st, kp in zip(parts, keeps, strict=True)]
        assert torch.equal(op(x, [st.handle for st in parts], keeps), torch.cat(want))  # several in one call
        assert torch.equal(op(x, [parts[1].handle], [64]), want[1])
    with pytest.raises(RuntimeError, match="keep"):
        op(x, [parts[0].handle], [65])
    with pytest.raises(RuntimeError, match="x has 63 inputs"):
        op(x[:63], [parts[0].handle], [5])
    handle = parts[2].handle
    del parts[2], state  # the weights are released with their state
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="no registered weights"):
        op(x, [handle], [5])
    copied = copy.deepcopy(parts[0])  # a copy registers its own weights
    assert copied.handle != parts[0].handle
    assert torch.equal(op(x, [copied.handle], [29]), op(x, [parts[0].handle], [29]))


def test_without_a_compiler_the_kernel_says_why(monkeypatch, tmp_path):
    """No cc/gcc/g++ and nothing cached: neither build is attempted, each gives its reason (dispatch
    then takes cpu_sparse_bag, test_module_dispatches_int_base_to_packed_kernel)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(act_sparse_packed.shutil, "which", lambda name: None)
    assert act_sparse_packed._library.__wrapped__("generic") == (None, "no C compiler (cc/gcc) on PATH")
    op, reason = act_sparse_packed.native_op.__wrapped__()
    assert op is None and "compiler" in reason


# -- siblings in one call (the runtime's q/k/v and gate/up) -------------------------------------------
def make_siblings(dtype: torch.dtype, criterion: str = "wina"):
    """Three int4 siblings over one input: odd N and a bias on one, a different sparsity each."""
    mods = []
    for i, (n, bias) in enumerate(((64, False), (33, True), (32, False))):
        qw, _, _ = make_layer(n, 48, 4, 16, False, seed=20 + i)
        b = torch.randn(n, generator=torch.Generator().manual_seed(30 + i)) if bias else None
        mod = ActivationSparseLinear.wrap(QuantLinear.from_quantized(qw, b, dtype=dtype), criterion)
        mod.configure(0.3 + 0.15 * i)
        mods.append(mod)
    return mods


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_fused_siblings_match_each_layer_alone(dtype, criterion):
    """One gemv_multi call equals each sibling's own call (bit for bit: the same C code), eager
    and compiled without a graph break; several rows and an unavailable operator fall back to
    the siblings one by one."""
    from llmcomp.modules.activation_sparse import FusedSparseSiblings
    from llmcomp.runtime.fuse import fuse_siblings

    if act_sparse_packed.native_op()[0] is None:
        pytest.skip(f"no C++ operator: {act_sparse_packed.native_op()[1]}")
    mods = make_siblings(dtype, criterion)
    fused = fuse_siblings(mods)
    assert isinstance(fused, FusedSparseSiblings)
    x = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(40)).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([m(x) for m in mods], dim=-1)
        assert all(m._kernel_state[0].name == "cpu_sparse_packed" for m in mods)
        got = fused(x)
        assert got.shape == (1, 1, 64 + 33 + 32) and got.dtype == dtype
        assert torch.equal(got, alone)
        explained = torch._dynamo.explain(fused)(x)
        assert explained.graph_break_count == 0
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fused, backend="eager", fullgraph=True)(x), alone)
        torch._dynamo.reset()
        rows = torch.randn(3, 48, generator=torch.Generator().manual_seed(41)).to(dtype)
        assert torch.equal(fused(rows), torch.cat([m(rows) for m in mods], dim=-1))
        for m in mods:
            m._kernel_state[1].handle = None  # as when the operator cannot be built: ctypes, one by one
        assert torch.equal(fused(x), alone)


def test_fused_siblings_follow_reconfiguration_and_the_reference():
    """configure() after fusing takes effect; each part matches the float64 reference of its own
    layer at its own sparsity."""
    from llmcomp.runtime.fuse import fuse_siblings

    if act_sparse_packed.native_op()[0] is None:
        pytest.skip(f"no C++ operator: {act_sparse_packed.native_op()[1]}")
    mods = make_siblings(torch.float32)
    fused = fuse_siblings(mods)
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(42))
    for sparsity in (0.5, 0.7):
        for m in mods:
            m.configure(sparsity)
        got = fused(x)[0].double()
        start = 0
        for i, m in enumerate(mods):
            n = m.out_features
            qw, _, _ = make_layer(n, 48, 4, 16, False, seed=20 + i)
            want = naive_reference(x, qw, 1.0 - m.sparsity, "wina")[0]
            if m.base.bias is not None:
                want = want + m.base.bias.double()
            torch.testing.assert_close(got[start:start + n], want, rtol=1e-4, atol=1e-4)
            start += n


def test_fuse_siblings_groups_only_compatible_layers():
    from llmcomp.runtime.fuse import fuse_siblings

    mods = make_siblings(torch.float32)
    qw8, _, _ = make_layer(16, 48, 8, 16, False, seed=50)
    int8 = ActivationSparseLinear.wrap(QuantLinear.from_quantized(qw8, None, dtype=torch.float32), "wina")
    assert fuse_siblings([mods[0], int8]) is None  # bit widths differ
    assert fuse_siblings([mods[0], mods[1].base]) is None  # one is not wrapped
    assert fuse_siblings([mods[0]]) is None
    assert isinstance(fuse_siblings([mods[0].base, mods[2].base]), QuantLinear)  # plain int siblings: fused copy
