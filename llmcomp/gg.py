"""Generalized-Gaussian (GG) priors: fit, density, quantiles, sampling, and GG initialisation.

The GG density with shape ``nu``, scale ``alpha`` and mean ``mu`` is
``f(x) = nu / (2 alpha Gamma(1/nu)) * exp(-(|x - mu| / alpha)^nu)`` (nu = 2: Gaussian,
nu = 1: Laplacian). Trained LLM weights fit it with nu mostly between 1 and 2, which is why a
shape-aware code (RF8, gg4 in :mod:`llmcomp.codebook`) beats a Gaussian- or uniform-shaped one.

Fitting is by the moment ratio ``rho = (E|x - mu|)^2 / E[(x - mu)^2]``, which for a GG equals
``Gamma(2/nu)^2 / (Gamma(1/nu) Gamma(3/nu))`` and increases monotonically with nu, so nu is one
bracketed root solve (bisection in log nu, float64); alpha follows from the variance
``alpha^2 Gamma(3/nu) / Gamma(1/nu)``. This is the method of moments, not maximum likelihood:
tests/test_gg.py states how closely it matches ``scipy.stats.gennorm.fit`` (the MLE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SHAPE_MIN, SHAPE_MAX = 0.1, 3.0  # the shape range the fit reports (the table range)
_BISECT_STEPS = 64  # halvings of [log SHAPE_MIN, log SHAPE_MAX]: far below float64 resolution
_FIT_SAMPLE = 1 << 22  # values a fit reads at most (a fixed-seed subsample of bigger tensors)
_FIT_SEED = 0
_QUANTILE_STEPS = 60  # bisection steps of the quantile function


def moment_ratio(nu: torch.Tensor | float) -> torch.Tensor:
    """``Gamma(2/nu)^2 / (Gamma(1/nu) Gamma(3/nu))``: (E|x|)^2 / E[x^2] of a zero-mean GG."""
    nu = torch.as_tensor(nu, dtype=torch.float64)
    return torch.exp(2 * torch.lgamma(2 / nu) - torch.lgamma(1 / nu) - torch.lgamma(3 / nu))


def shape_from_ratio(rho: torch.Tensor | float) -> torch.Tensor:
    """Invert :func:`moment_ratio` on ``[SHAPE_MIN, SHAPE_MAX]`` (clamped at the ends), elementwise."""
    rho = torch.as_tensor(rho, dtype=torch.float64)
    lo = torch.full_like(rho, math.log(SHAPE_MIN))
    hi = torch.full_like(rho, math.log(SHAPE_MAX))
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        above = moment_ratio(torch.exp(mid)) > rho  # ratio increases with nu: root is below mid
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return torch.exp((lo + hi) / 2)


@dataclass(frozen=True)
class GGFit:
    """A fitted generalized Gaussian: ``shape`` nu, ``scale`` alpha, ``mean`` mu."""

    shape: float
    scale: float
    mean: float = 0.0

    @property
    def std(self) -> float:
        nu = self.shape
        return self.scale * math.exp(0.5 * (math.lgamma(3 / nu) - math.lgamma(1 / nu)))

    def log_pdf(self, x: torch.Tensor) -> torch.Tensor:
        nu, a = self.shape, self.scale
        z = (x.double() - self.mean).abs() / a
        return math.log(nu / (2 * a)) - math.lgamma(1 / nu) - z**nu

    def pdf(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_pdf(x).exp()

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        """``P(X <= x)`` through the regularized lower incomplete gamma function."""
        z = (x.double() - self.mean) / self.scale
        half = 0.5 * torch.special.gammainc(torch.tensor(1 / self.shape, dtype=torch.float64), z.abs() ** self.shape)
        return 0.5 + torch.sign(z) * half

    def quantile(self, p: torch.Tensor) -> torch.Tensor:
        """Inverse CDF (bisection on :meth:`cdf`; torch has no inverse incomplete gamma)."""
        p = p.double().clamp(1e-300, 1 - 1e-16)
        q = torch.abs(2 * p - 1)  # P(|X - mu| <= t) = q
        a = torch.tensor(1 / self.shape, dtype=torch.float64)
        lo, hi = torch.zeros_like(q), torch.ones_like(q)
        while bool((torch.special.gammainc(a, hi) < q).any()):  # bracket u = (t / alpha)^nu
            hi = torch.where(torch.special.gammainc(a, hi) < q, hi * 2, hi)
        for _ in range(_QUANTILE_STEPS):
            mid = (lo + hi) / 2
            below = torch.special.gammainc(a, mid) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = self.scale * ((lo + hi) / 2) ** (1 / self.shape)
        return self.mean + torch.sign(2 * p - 1) * t

    def entropy_bits(self) -> float:
        """Differential entropy in bits: ``1/nu - ln(nu / (2 alpha Gamma(1/nu)))`` nats."""
        nu, a = self.shape, self.scale
        return (1 / nu - math.log(nu / (2 * a)) + math.lgamma(1 / nu)) / math.log(2)

    def sample(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return sample(shape, self.shape, self.scale, self.mean, generator=generator, dtype=dtype)


def _fit_values(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    if flat.numel() > _FIT_SAMPLE:
        gen = torch.Generator().manual_seed(_FIT_SEED)
        flat = flat[torch.randint(flat.numel(), (_FIT_SAMPLE,), generator=gen, device="cpu").to(flat.device)]
    return flat.double()


def fit(x: torch.Tensor, zero_mean: bool = False) -> GGFit:
    """Fit (nu, alpha, mu) to all values of ``x`` by the moment ratio (see the module doc)."""
    v = _fit_values(x)
    if v.numel() < 2:
        raise ValueError("a GG fit needs at least 2 values")
    mu = 0.0 if zero_mean else float(v.mean())
    c = v - mu
    m1, m2 = float(c.abs().mean()), float((c * c).mean())
    if m2 <= 0:
        raise ValueError("a GG fit needs values that are not all equal")
    nu = float(shape_from_ratio(m1 * m1 / m2))
    alpha = math.sqrt(m2 * math.exp(math.lgamma(1 / nu) - math.lgamma(3 / nu)))
    return GGFit(nu, alpha, mu)


def fit_rows(x: torch.Tensor) -> torch.Tensor:
    """Shape nu of each row of a 2-D tensor (zero mean per row), float64 ``[rows]``."""
    c = x.detach().double()
    c = c - c.mean(dim=1, keepdim=True)
    rho = c.abs().mean(dim=1) ** 2 / (c * c).mean(dim=1).clamp_min(1e-300)
    return shape_from_ratio(rho)


def sample(shape: tuple[int, ...] | torch.Size, nu: float, alpha: float = 1.0, mean: float = 0.0,
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GG samples: ``|x - mu| / alpha = G^(1/nu)`` with ``G ~ Gamma(1/nu, 1)`` and a random sign.

    torch's gamma sampler takes no generator, so with ``generator`` the global RNG is forked and
    seeded from it: reproducible, and the caller's global RNG state is left untouched.
    """
    if not nu > 0:
        raise ValueError(f"shape nu must be positive, got {nu}")
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        g = torch._standard_gamma(torch.full(tuple(shape), 1.0 / nu, dtype=torch.float64))
        sign = torch.randint(0, 2, tuple(shape), dtype=torch.int8).double() * 2 - 1
    return (mean + sign * alpha * g.pow(1.0 / nu)).to(dtype)


def scale_for_std(nu: float, std: float) -> float:
    """The alpha that gives a GG of shape nu the standard deviation ``std``."""
    return std * math.exp(0.5 * (math.lgamma(1 / nu) - math.lgamma(3 / nu)))


@torch.no_grad()
def init_(module: nn.Module, shape: float = 2.0, gain: float = 1.0, mode: str = "fan_in",
          generator: torch.Generator | None = None) -> nn.Module:
    """GG initialisation of every ``nn.Linear`` / ``nn.Embedding`` weight under ``module``, in place.

    Variance preserving: each weight gets standard deviation ``gain / sqrt(fan)`` (LeCun for
    ``mode="fan_in"``; ``"fan_out"`` and ``"fan_avg"`` as in Glorot), so activations keep their
    scale through depth whatever the shape nu; embeddings get std ``gain``. Biases are zeroed.
    """
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"mode must be fan_in, fan_out or fan_avg, got {mode!r}")
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            fan_out, fan_in = sub.weight.shape
            fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
            std = gain / math.sqrt(fan)
        elif isinstance(sub, nn.Embedding):
            std = gain
        else:
            continue
        w = sample(sub.weight.shape, shape, scale_for_std(shape, std), generator=generator)
        sub.weight.copy_(w.to(sub.weight.dtype))
        if getattr(sub, "bias", None) is not None:
            sub.bias.zero_()
    return module


def empirical_entropy_bits(codes: torch.Tensor) -> float:
    """Shannon entropy (bits per symbol) of integer codes: what an ideal entropy coder spends."""
    _, counts = torch.unique(codes.reshape(-1), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())
