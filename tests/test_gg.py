"""GG fit against scipy's maximum-likelihood ``gennorm.fit``, closed forms, and GG initialisation.

Stated tolerance of the fit (moment ratio) against scipy's MLE on 100,000 samples of known shape:
shape within 3 % relative, scale within 3 % relative, mean within 0.02 * scale; both within 4 %
of the true shape. (The two estimators differ by sampling noise only; the moment estimator's own
standard error at nu = 2.5 and n = 1e5 is about 1 %.)
"""

import math

import pytest
import torch
from torch import nn

from llmcomp import gg

scipy_stats = pytest.importorskip("scipy.stats")

SAMPLES = 100_000
FIT_REL_TOL = 0.03
TRUE_REL_TOL = 0.04
MEAN_TOL = 0.02  # times the scale


def test_moment_ratio_closed_forms():
    assert float(gg.moment_ratio(2.0)) == pytest.approx(2 / math.pi, rel=1e-12)  # Gaussian
    assert float(gg.moment_ratio(1.0)) == pytest.approx(0.5, rel=1e-12)  # Laplacian: (b)^2 / (2 b^2)
    nus = torch.linspace(gg.SHAPE_MIN, gg.SHAPE_MAX, 50, dtype=torch.float64)
    r = gg.moment_ratio(nus)
    assert bool((r[1:] > r[:-1]).all()), "the ratio must increase with the shape (the root solve relies on it)"
    assert torch.allclose(gg.shape_from_ratio(r), nus, rtol=1e-9)


@pytest.mark.parametrize("nu", [0.7, 1.0, 1.5, 2.0, 2.5])
def test_fit_matches_scipy_gennorm(nu):
    gen = torch.Generator().manual_seed(int(nu * 100))
    alpha, mu = 0.37, -0.05
    x = gg.sample((SAMPLES,), nu, alpha, mu, generator=gen, dtype=torch.float64)
    ours = gg.fit(x)
    beta, loc, scale = scipy_stats.gennorm.fit(x.numpy())
    assert ours.shape == pytest.approx(beta, rel=FIT_REL_TOL)
    assert ours.scale == pytest.approx(scale, rel=FIT_REL_TOL)
    assert abs(ours.mean - loc) <= MEAN_TOL * scale
    assert ours.shape == pytest.approx(nu, rel=TRUE_REL_TOL)
    assert ours.scale == pytest.approx(alpha, rel=TRUE_REL_TOL)


def test_density_cdf_quantile_against_scipy():
    fit = gg.GGFit(1.3, 0.8, 0.2)
    x = torch.linspace(-3, 3, 41, dtype=torch.float64)
    ref_pdf = torch.from_numpy(scipy_stats.gennorm.logpdf(x.numpy(), 1.3, 0.2, 0.8))
    ref_cdf = torch.from_numpy(scipy_stats.gennorm.cdf(x.numpy(), 1.3, 0.2, 0.8))
    assert torch.allclose(fit.log_pdf(x), ref_pdf, atol=1e-10)
    assert torch.allclose(fit.cdf(x), ref_cdf, atol=1e-10)
    p = torch.tensor([0.001, 0.1, 0.37, 0.5, 0.8, 0.999], dtype=torch.float64)
    ref_q = torch.from_numpy(scipy_stats.gennorm.ppf(p.numpy(), 1.3, 0.2, 0.8))
    assert torch.allclose(fit.quantile(p), ref_q, atol=1e-9)
    assert fit.entropy_bits() == pytest.approx(scipy_stats.gennorm.entropy(1.3, 0.2, 0.8) / math.log(2), rel=1e-9)
    assert fit.std == pytest.approx(scipy_stats.gennorm.std(1.3, 0.2, 0.8), rel=1e-9)


def test_fit_rows_and_errors():
    gen = torch.Generator().manual_seed(3)
    rows = torch.stack([gg.sample((20000,), nu, 1.0, generator=gen) for nu in (0.8, 1.6, 2.4)])
    assert torch.allclose(gg.fit_rows(rows), torch.tensor([0.8, 1.6, 2.4], dtype=torch.float64), rtol=0.05)
    with pytest.raises(ValueError):
        gg.fit(torch.ones(10))
    with pytest.raises(ValueError):
        gg.sample((3,), -1.0)


def test_sampling_reproducible_and_leaves_global_rng():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = gg.sample((100,), 1.2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    b = gg.sample((100,), 1.2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("nu", [0.8, 1.0, 2.0])
@pytest.mark.parametrize("mode", ["fan_in", "fan_avg"])
def test_init_matches_shape_and_variance(nu, mode):
    model = nn.Sequential(nn.Linear(512, 384), nn.ReLU(), nn.Linear(384, 256, bias=False), nn.Embedding(300, 64))
    gg.init_(model, shape=nu, mode=mode, generator=torch.Generator().manual_seed(0))
    for layer in (model[0], model[2]):
        w = layer.weight.detach().double()
        fan_out, fan_in = w.shape
        fan = fan_in if mode == "fan_in" else (fan_in + fan_out) / 2
        assert float(w.var()) == pytest.approx(1 / fan, rel=0.03)
        assert gg.fit(w).shape == pytest.approx(nu, rel=0.05)
    assert float(model[3].weight.detach().double().var()) == pytest.approx(1.0, rel=0.05)
    assert torch.count_nonzero(model[0].bias) == 0
    with pytest.raises(ValueError):
        gg.init_(model, mode="bogus")


def test_empirical_entropy():
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert gg.empirical_entropy_bits(codes) == pytest.approx(2.0)
    gen = torch.Generator().manual_seed(0)
    skewed = (torch.rand(100000, generator=gen) < 0.1).long()
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert gg.empirical_entropy_bits(skewed) == pytest.approx(h, abs=0.01)
