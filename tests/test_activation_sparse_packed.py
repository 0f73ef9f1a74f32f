"""The packed int4 / int8 gather kernel (``cpu_sparse_packed``) against a naive float64 reference.

Reference: dequantize the codes with the closed form ``(q - z) * s`` in float64 (Python loops),
score ``|x|`` (teal) or ``|x| * ||W[:, k]||`` (wina), keep the ``ceil(d K)`` best, sum the kept
columns. Independent of the kernel's transposed, nibble-split layout and its per-group algebra.
"""

from __future__ import annotations

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


def test_packed_kernel_compiles_without_graph_break():
    """Under torch.compile the C call is one custom-op node (no graph break) and gives the eager result."""
    qw, qlayout, tensors = make_layer(24, 40, 4, 8, False, seed=5)
    layout = ActivationSparseLayout(qlayout, 0.5, "teal")
    kernel = select_kernel(layout, torch.device("cpu"), torch.float32, prefer="cpu_sparse_packed")
    state = kernel.prepare(layout, ActivationSparseTensors(tensors), torch.float32)
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
