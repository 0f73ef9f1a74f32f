"""FineQuant's pure maths: packing, scale fitting, error bounds, the granularity ladder."""

from __future__ import annotations

import math

import pytest
import torch

from llmcomp import intquant
from llmcomp.passes import finequant_fit as fit

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]  # K = 200 below: none of these divides it except per-channel


def _weight(n: int, k: int, seed: int = 0, heavy: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if heavy:  # Student-t-like tails: what outlier-ridden LLM matrices look like
        g = torch.randn(n, k, generator=gen)
        chi = torch.randn(n, k, 3, generator=gen).pow(2).sum(-1) / 3
        return g / chi.sqrt()
    return torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))


def _naive_dequant(qw: intquant.QuantizedWeight) -> torch.Tensor:
    """Element by element in float64, straight from the documented formula."""
    n, k = qw.shape
    out = torch.empty(n, k, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            g = j // qw.group_size
            z = 0.0 if qw.zero is None else float(qw.zero[i, g])
            out[i, j] = (float(qw.q[i, j]) - z) * float(qw.scale[i, g])
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [7, 64, 200])
def test_pack_unpack_round_trip(bits: int, k: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    qmin, qmax = intquant.qrange(bits)
    q = torch.randint(qmin, qmax + 1, (5, k), generator=gen, dtype=torch.int8)
    packed = intquant.pack(q, bits)
    assert tuple(packed.shape) == intquant.packed_shape(5, k, bits)
    assert torch.equal(intquant.unpack(packed, bits, k), q)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fit_codes_are_nearest_grid_points_and_in_range(bits: int, group: int, symmetric: bool) -> None:
    w = _weight(6, 200, seed=bits + group)
    qw = fit.fit_quantize(w, bits, group, symmetric, iters=4)
    qmin, qmax = intquant.qrange(bits)
    g = intquant.effective_group_size(group, 200)
    assert qw.group_size == g and qw.scale.shape == (6, math.ceil(200 / g))
    assert int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert (qw.zero is None) == symmetric
    if qw.zero is not None:
        assert int(qw.zero.min()) >= qmin and int(qw.zero.max()) <= qmax
    assert bool((qw.scale > 0).all())
    # Brute force in float64: no other code of the same grid is closer to the weight.
    deq = _naive_dequant(qw)
    torch.testing.assert_close(intquant.dequantize_qw(qw, torch.float64), deq)
    s = qw.scale.double().repeat_interleave(g, 1)[:, :200]
    z = 0.0 if qw.zero is None else qw.zero.double().repeat_interleave(g, 1)[:, :200]
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float64).reshape(-1, 1, 1)
    best = ((codes - z) * s - w.double()).abs().amin(0)
    assert torch.allclose((deq - w.double()).abs(), best, atol=1e-9)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fit_is_never_worse_than_rtn_and_usually_better(bits: int, group: int, symmetric: bool) -> None:
    w = _weight(16, 200, seed=7, heavy=True)
    rtn = intquant.quantize_rtn(w, bits, group, symmetric)
    fitted = fit.fit_quantize(w, bits, group, symmetric, iters=8)
    e_rtn = fit.relative_error(w, intquant.dequantize_qw(rtn))
    e_fit = fit.relative_error(w, intquant.dequantize_qw(fitted))
    assert e_fit <= e_rtn + 1e-7
    if bits <= 4:
        assert e_fit < 0.99 * e_rtn  # the fit must really move the grid at low bit widths


def test_fit_zero_iterations_is_rtn() -> None:
    w = _weight(8, 96, seed=3)
    for symmetric in (True, False):
        rtn = intquant.quantize_rtn(w, 4, 32, symmetric)
        fitted = fit.fit_quantize(w, 4, 32, symmetric, iters=0)
        assert torch.equal(rtn.q, fitted.q)
        torch.testing.assert_close(rtn.scale, fitted.scale)


@pytest.mark.parametrize("bits", BITS)
def test_rtn_error_bound_half_step(bits: int) -> None:
    """Min/max RTN: every weight lies within half a step of its dequantized value."""
    w = _weight(4, 200, seed=11)
    for symmetric in (True, False):
        qw = fit.fit_quantize(w, bits, 64, symmetric, iters=0)
        step = qw.scale.double().repeat_interleave(64, 1)[:, :200]
        err = (_naive_dequant(qw) - w.double()).abs()
        assert bool((err <= step / 2 + 1e-6).all())


def test_asymmetric_refit_matches_least_squares() -> None:
    """One refit step equals the float64 least-squares line through (codes, weights)."""
    w = _weight(3, 64, seed=5)
    gr = fit._group(w, 64)
    s, z = fit._minmax_init(gr, 4, symmetric=False)
    q = fit._codes(gr, s, z, 4)
    s_new, z_new = fit._refit_asymmetric(gr, q, s, z, 4)
    for row in range(3):
        qs, ws = q[row, 0].double(), gr.w[row, 0].double()
        design = torch.stack([qs, torch.ones_like(qs)], 1)
        a, b = torch.linalg.lstsq(design, ws.unsqueeze(1)).solution.flatten().tolist()
        z_ref = max(-8, min(7, round(-b / a)))
        assert z_new[row, 0].item() == z_ref
        s_ref = float((ws * (qs - z_ref)).sum() / ((qs - z_ref) ** 2).sum())
        assert s_new[row, 0].item() == pytest.approx(s_ref, rel=1e-4)


def test_scales_are_fitted_in_storage_dtype() -> None:
    w = _weight(8, 128, seed=2).bfloat16()
    qw = fit.fit_quantize(w, 8, -1, True, iters=3, scale_dtype=torch.bfloat16)
    assert torch.equal(qw.scale, qw.scale.bfloat16().float())  # exactly representable in bf16


def test_group_ladder() -> None:
    assert fit.group_ladder(576, 32) == [576, 256, 128, 64, 32]
    assert fit.group_ladder(1536, 64) == [1536, 512, 256, 128, 64]
    assert fit.group_ladder(64, 32) == [64, 32]
    assert fit.group_ladder(48, 32) == [48]
    assert fit.group_ladder(576, 32, divisible_only=True) == [576, 64, 32]
    assert fit.group_ladder(1536, 32, divisible_only=True) == [1536, 512, 256, 128, 64, 32]


def test_worth_refining_is_a_rate_distortion_test() -> None:
    # (0.2^2 - 0.1^2) = 0.03 of squared error bought with 0.5 bit: 0.06 per bit.
    assert fit.worth_refining(0.2, 0.1, 0.5, 0.05)
    assert not fit.worth_refining(0.2, 0.1, 0.5, 0.07)
    # The same relative improvement at a tenth of the error (int8-like) is not worth the bits.
    assert not fit.worth_refining(0.02, 0.01, 0.5, 0.05)
    assert fit.worth_refining(0.2, 0.19, 1e-3, 0.0) and not fit.worth_refining(0.2, 0.2, 0.1, 0.0)


def test_meta_bits_per_weight() -> None:
    assert fit.meta_bits_per_weight(576, 64, True, 16) == pytest.approx(9 * 24 / 576)
    assert fit.meta_bits_per_weight(576, 576, False, 16) == pytest.approx(16 / 576)


def test_relative_error_with_column_weights_closed_form() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    approx = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    assert fit.relative_error(w, approx) == pytest.approx(math.sqrt(2 / 30))
    c = torch.tensor([0.0, 2.0])
    assert fit.relative_error(w, approx, c) == pytest.approx(math.sqrt(4 / 40))


def _column_energy(k: int, seed: int) -> torch.Tensor:
    """LLM-like input energy: mostly O(1), a few channels hundreds of times larger."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(k, generator=gen) + 0.1
    c[torch.randperm(k, generator=gen)[:4]] *= 300.0
    return c


def test_weighted_refits_match_weighted_least_squares() -> None:
    """One refit step equals float64 weighted least squares (rows scaled by sqrt(c))."""
    w = _weight(3, 64, seed=21)
    c = _column_energy(64, seed=22)
    gr = fit._group(w, 64, c)
    cn = (c.double() / c.double().mean()).clamp_min(fit._MIN_RELATIVE_IMPORTANCE)
    s, z = fit._minmax_init(gr, 4, symmetric=False)
    q = fit._codes(gr, s, z, 4)
    s_new, z_new = fit._refit_asymmetric(gr, q, s, z, 4)
    s_sym = fit._refit_symmetric(gr, q, s)
    for row in range(3):
        qs, ws, r = q[row, 0].double(), gr.w[row, 0].double(), cn.sqrt()
        design = torch.stack([qs, torch.ones_like(qs)], 1) * r.unsqueeze(1)
        a, b = torch.linalg.lstsq(design, (ws * r).unsqueeze(1)).solution.flatten().tolist()
        z_ref = max(-8, min(7, round(-b / a)))
        assert z_new[row, 0].item() == z_ref
        s_ref = float((cn * ws * (qs - z_ref)).sum() / (cn * (qs - z_ref) ** 2).sum())
        assert s_new[row, 0].item() == pytest.approx(s_ref, rel=1e-4)
        s_sym_ref = float((cn * ws * qs).sum() / (cn * qs * qs).sum())
        assert s_sym[row, 0].item() == pytest.approx(s_sym_ref, rel=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_column_weights_change_nothing(symmetric: bool) -> None:
    w = _weight(8, 200, seed=23, heavy=True)
    plain = fit.fit_quantize(w, 4, 64, symmetric, iters=6)
    uniform = fit.fit_quantize(w, 4, 64, symmetric, iters=6, column_weight=torch.full((200,), 3.5))
    assert torch.equal(plain.q, uniform.q)
    torch.testing.assert_close(plain.scale, uniform.scale)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [64, -1])
def test_weighted_fit_lowers_the_weighted_error(bits: int, group: int) -> None:
    """Never worse than RTN in the error it fits, and better than the unweighted fit there."""
    w = _weight(32, 200, seed=24, heavy=True)
    c = _column_energy(200, seed=25)
    rtn = intquant.quantize_rtn(w, bits, group, symmetric=False)
    plain = fit.fit_quantize(w, bits, group, False, iters=8)
    weighted = fit.fit_quantize(w, bits, group, False, iters=8, column_weight=c)
    e_rtn, e_plain, e_weighted = (
        fit.relative_error(w, intquant.dequantize_qw(qw), c) for qw in (rtn, plain, weighted)
    )
    assert e_weighted <= e_rtn + 1e-7
    assert e_weighted < 0.97 * e_plain
    # ...and it pays for that in the unweighted error, which it does not fit.
    assert fit.relative_error(w, intquant.dequantize_qw(weighted)) > fit.relative_error(
        w, intquant.dequantize_qw(plain)
    )
