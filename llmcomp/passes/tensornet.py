"""Tensor-network compression (CompactifAI, Tomut et al. 2024): pass ``tensornet``.

Each selected linear ``W [out, in]`` becomes a matrix product operator (tensor-train matrix,
:class:`~llmcomp.modules.mpo_linear.MPOLinear`): ``out`` and ``in`` are factored into ``d`` factors
each (2-4 cores; automatic near-balanced factors, or given), ``W`` is reshaped to
``[m_1, n_1, m_2, n_2, ...]`` and split by sequential truncated SVDs (TT-SVD, Oseledets 2011). The
bond dimension per layer comes from a fixed ``chi``, a target parameter ratio (the largest uniform
``chi`` whose cores fit), or a singular-value energy threshold per SVD. Computed in float64.

For two cores the truncation error is exactly the discarded singular values of the reshaped
matrix (Eckart-Young on the ``(m_1 n_1) x (m_2 n_2)`` unfolding); for more cores the squared error
is at most the sum of the squared discarded values of every SVD. Sensitivity defaults (dense first
blocks and MLP output projections) are shared with ``lowrank`` (:mod:`llmcomp.passes.lowrank`).

``core_bits`` (4 or 8) then quantizes the cores themselves (the paper's tensorization +
quantization setting): each core's ``[r m, n s]`` view gets FineQuant's least-squares fitted group
scales (:func:`~llmcomp.passes.finequant_fit.fit_quantize`) at a fixed ``core_group_size``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from llmcomp import intquant
from llmcomp.calibration import InputStats
from llmcomp.modules.mpo_linear import (
    DEFAULT_CORE_GROUP,
    MAX_CORES,
    MIN_CORES,
    MPOLinear,
    core_matrix_shape,
    mpo_params,
)
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.base import ModuleReport, ModuleState, register_pass, weight_error
from llmcomp.passes.lowrank import FactorizedConfig, FactorizedPass, energy_rank

DEFAULT_CORES = 2
BALANCE_FLOOR = 1e-12  # bond singular values below this fraction of the largest are floored (no division by 0)


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_factors(n: int, d: int) -> list[int]:
    """``d`` factors of ``n``, as equal as its primes allow (largest primes placed first, each on the
    currently smallest factor), sorted in descending order."""
    factors = [1] * d
    for p in sorted(prime_factors(n), reverse=True):
        i = min(range(d), key=lambda j: factors[j])
        factors[i] *= p
    return sorted(factors, reverse=True)


def auto_factors(out_features: int, in_features: int, d: int) -> tuple[list[int], list[int]]:
    """Output factors descending, input factors ascending: the core sizes ``m_k n_k`` come out even,
    which maximizes the largest possible bond dimension for a given number of cores."""
    return balanced_factors(out_features, d), sorted(balanced_factors(in_features, d))


def max_bonds(out_factors: list[int], in_factors: list[int]) -> list[int]:
    """Full (lossless) bond dimensions: the smaller side of each unfolding."""
    sizes = [m * n for m, n in zip(out_factors, in_factors, strict=True)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1)]


def core_shapes(out_factors: list[int], in_factors: list[int], ranks: list[int]) -> list[tuple[int, int, int, int]]:
    bonds = [1, *ranks, 1]
    return [(bonds[k], m, n, bonds[k + 1]) for k, (m, n) in enumerate(zip(out_factors, in_factors, strict=True))]


def ranks_for_chi(out_factors: list[int], in_factors: list[int], chi: int) -> list[int]:
    return [min(chi, b) for b in max_bonds(out_factors, in_factors)]


def chi_for_ratio(out_factors: list[int], in_factors: list[int], ratio: float) -> int:
    """Largest uniform bond cap whose cores hold at most ``ratio`` of the dense parameters (at least 1)."""
    budget = ratio * math.prod(out_factors) * math.prod(in_factors)
    lo, hi = 1, max(max_bonds(out_factors, in_factors))
    while lo < hi:  # parameters grow monotonically with chi
        mid = (lo + hi + 1) // 2
        if mpo_params(core_shapes(out_factors, in_factors, ranks_for_chi(out_factors, in_factors, mid))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def mpo_decompose(weight: torch.Tensor, out_factors: list[int], in_factors: list[int],
                  max_ranks: list[int] | None = None, energy: float | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TT-SVD of ``weight [out, in]`` in float64: ``(cores, singular values of every SVD)``.

    ``max_ranks`` caps each bond (None: lossless); ``energy`` keeps, at each SVD, the fewest
    singular values holding that fraction of the unfolding's squared spectrum (within the cap).
    Singular values are pushed right (left-orthonormal cores), so the last core carries the scale.
    """
    d = len(out_factors)
    if len(in_factors) != d or math.prod(out_factors) != weight.shape[0] or math.prod(in_factors) != weight.shape[1]:
        raise ValueError(f"factors {out_factors} x {in_factors} do not match the weight shape {tuple(weight.shape)}")
    t = weight.detach().double().reshape(*out_factors, *in_factors)
    t = t.permute([i for k in range(d) for i in (k, d + k)])  # [m1, n1, m2, n2, ...]
    rest = t.reshape(1, -1)
    cores, spectra, bond = [], [], 1
    for k in range(d - 1):
        size = out_factors[k] * in_factors[k]
        u, s, vh = torch.linalg.svd(rest.reshape(bond * size, -1), full_matrices=False)
        keep = s.numel()
        if max_ranks is not None:
            keep = min(keep, max_ranks[k])
        if energy is not None:
            keep = min(keep, energy_rank(s, energy))
        keep = max(1, keep)
        cores.append(u[:, :keep].reshape(bond, out_factors[k], in_factors[k], keep))
        spectra.append(s)
        rest = s[:keep, None] * vh[:keep]
        bond = keep
    cores.append(rest.reshape(bond, out_factors[-1], in_factors[-1], 1))
    return cores, spectra


def _svd_fixed(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mat = u diag(s) vh`` with exactly ``rank`` columns of ``u`` (zero-padded where ``mat`` has fewer)."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    pad = rank - s.numel()
    if pad > 0:
        u, s, vh = F.pad(u, (0, pad)), F.pad(s, (0, pad)), F.pad(vh, (0, 0, 0, pad))
    return u, s, vh


def balance_cores(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same MPO (same product, same shapes) with each bond's singular values split as square
    roots into its two neighbouring cores (Vidal's ``sqrt(l) Gamma sqrt(l)``), in float64.

    Why: TT-SVD leaves every core but the last orthonormal and the whole scale in the last one, so
    Adam's per-entry steps during healing are large relative changes of the small cores (on
    SmolLM2 at ratio 0.5, balanced cores healed to perplexity 336 in 60 steps vs 530 unbalanced:
    docs/TENSORNET.md). Balanced, the left and right
    Gram matrices at every bond both equal ``diag(l)``, the singular values of that bond's
    unfolding (tested), as the low-rank factors ``U sqrt(S)``, ``sqrt(S) V^T`` are.
    Method: a left-to-right SVD sweep (left-orthonormal), a right-to-left one that reads off the
    bond spectra ``l``, then core ``k`` gets ``sqrt(l_{k-1})`` on its left and ``1/sqrt(l_k)`` on
    its right (``l`` floored at ``BALANCE_FLOOR * max``: the factors cancel exactly either way).
    """
    g = [c.detach().double() for c in cores]
    d = len(g)
    for k in range(d - 1):
        bond = g[k].shape[3]
        u, s, vh = _svd_fixed(g[k].reshape(-1, bond), bond)
        g[k] = u.reshape(g[k].shape)
        g[k + 1] = torch.tensordot(s[:, None] * vh, g[k + 1], dims=([1], [0]))
    spectra: list[torch.Tensor] = [torch.ones(1, dtype=torch.float64)] * (d + 1)  # bond k+1 between cores k, k+1
    for k in range(d - 1, 0, -1):
        bond = g[k].shape[0]
        u, s, vh = _svd_fixed(g[k].reshape(bond, -1), bond)
        g[k] = vh.reshape(g[k].shape)
        g[k - 1] = torch.tensordot(g[k - 1], u * s, dims=([3], [0]))
        top = float(s.max())
        spectra[k] = s.clamp_min(top * BALANCE_FLOOR) if top > 0 else torch.ones_like(s)
    out = []
    for k, core in enumerate(g):
        left, right = spectra[k].sqrt(), spectra[k + 1].rsqrt()
        out.append((left[:, None, None, None] * core * right).to(cores[k].dtype))
    return out


class TensorNetConfig(FactorizedConfig):
    num_cores: int = Field(DEFAULT_CORES, ge=MIN_CORES, le=MAX_CORES, description="cores per MPO (2-4)")
    out_factors: list[int] | None = Field(None, description="factors of out_features (default: automatic)")
    in_factors: list[int] | None = Field(None, description="factors of in_features (default: automatic)")
    core_bits: Literal[4, 8] | None = Field(None, description="quantize the cores to this many bits (None: float)")
    core_group_size: int = Field(DEFAULT_CORE_GROUP, description="group length of quantized cores; -1 = whole rows")
    core_symmetric: bool = Field(False, description="quantized cores without zero points")
    core_fit_iters: int = Field(fit.DEFAULT_FIT_ITERS, ge=0, description="least-squares scale rounds; 0 = RTN")
    balance_cores: bool | None = Field(
        None, description="split each bond's singular values as square roots into both neighbouring cores (same "
        "product; heals faster); None = when the cores stay float (healable), not before core_bits")

    @model_validator(mode="after")
    def _factor_lengths(self) -> TensorNetConfig:
        for label, f in (("out_factors", self.out_factors), ("in_factors", self.in_factors)):
            if f is not None and (len(f) != self.num_cores or any(x < 1 for x in f)):
                raise ValueError(f"{label} needs {self.num_cores} positive factors (num_cores), got {f}")
        if self.core_group_size != -1 and self.core_group_size < 1:
            raise ValueError(f"core_group_size must be positive or -1, got {self.core_group_size}")
        return self


def quantize_cores(module: MPOLinear, bits: int, group_size: int = DEFAULT_CORE_GROUP, symmetric: bool = False,
                   fit_iters: int = fit.DEFAULT_FIT_ITERS) -> MPOLinear:
    """A copy of float-core ``module`` with int ``bits`` cores (FineQuant fitted scales, stored in
    the module's dtype, which the codes are chosen against). Quantize after healing: int cores do not train."""
    if module.core_bits is not None:
        raise ValueError("the cores are quantized already")
    dtype = module.cores[0].dtype
    qcores = []
    for core in module.cores:
        rows, cols = core_matrix_shape(tuple(core.shape))
        group = intquant.effective_group_size(group_size, cols)
        qcores.append(fit.fit_quantize(core.detach().reshape(rows, cols).float(), bits, group, symmetric, fit_iters,
                                       scale_dtype=dtype))
    return MPOLinear.from_quantized_cores(qcores, module.core_shapes, group_size, module.bias, dtype)


def plan_factors(shape: tuple[int, int], cfg: TensorNetConfig) -> tuple[list[int], list[int]]:
    out_f, in_f = shape
    auto_out, auto_in = auto_factors(out_f, in_f, cfg.num_cores)
    out_factors = list(cfg.out_factors) if cfg.out_factors is not None else auto_out
    in_factors = list(cfg.in_factors) if cfg.in_factors is not None else auto_in
    if math.prod(out_factors) != out_f or math.prod(in_factors) != in_f:
        raise ValueError(f"factors {out_factors} x {in_factors} do not multiply to the layer's {out_f} x {in_f}")
    return out_factors, in_factors


def decompose_for(weight: torch.Tensor, cfg: TensorNetConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decompose ``weight`` with the factors and the size rule of ``cfg``."""
    out_factors, in_factors = plan_factors(tuple(weight.shape), cfg)
    rule, value = cfg.rule()
    if rule == "energy":
        caps = ranks_for_chi(out_factors, in_factors, cfg.chi) if cfg.chi is not None else None
        return mpo_decompose(weight, out_factors, in_factors, caps, energy=float(value))
    chi = int(value) if rule == "chi" else chi_for_ratio(out_factors, in_factors, float(value))
    return mpo_decompose(weight, out_factors, in_factors, ranks_for_chi(out_factors, in_factors, chi))


@register_pass
class TensorNetPass(FactorizedPass):
    """MPO (tensor-train matrix) decomposition of the selected linear layers."""

    name = "tensornet"
    Config = TensorNetConfig

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[nn.Module, ModuleReport]:
        cfg: TensorNetConfig = self.config_for(name)  # type: ignore[assignment]
        w = linear.weight.detach()
        if state.mask is not None:
            w = w * state.mask.to(w.dtype)
        cores, _ = decompose_for(w, cfg)
        balance = cfg.core_bits is None if cfg.balance_cores is None else cfg.balance_cores
        if balance:
            cores = balance_cores(cores)
        module = MPOLinear.from_cores(cores, linear.bias, dtype=w.dtype)
        float_error = weight_error(w, module.dequantized_weight(torch.float32))
        if cfg.core_bits is not None:
            module = quantize_cores(module, cfg.core_bits, cfg.core_group_size, cfg.core_symmetric,
                                    cfg.core_fit_iters)
        rule, value = cfg.rule()
        return module, {
            "out_factors": module.out_factors,
            "in_factors": module.in_factors,
            "ranks": module.ranks,
            "rule": rule,
            "rule_value": value,
            "params": module.num_params,
            "param_ratio": module.num_params / w.numel(),
            "core_bits": cfg.core_bits,
            "balanced_cores": balance,
            "bits_per_weight": module.storage_bytes * 8 / w.numel(),
            "rel_error": weight_error(w, module.dequantized_weight(torch.float32)),
            "rel_error_float_cores": float_error,
            "numel": w.numel(),
        }
