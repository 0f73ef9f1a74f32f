"""Pass ``deepshape``: reshape each weight's distribution toward a target generalized-Gaussian shape,
with a hard bound on how much the layer's outputs on calibration data may change.

The published DeepShape objective is not public; this one is ours (docs/GG.md). For a weight ``W``
and the calibration Hessian ``H = 2/n X^T X`` of its input, find ``W' = W + D`` minimising

    P(W') + E(D) / eps,   P = mean over groups of ((rho_g(W') - rho(nu_t)) / rho(nu_t))^2,
                          E = tr(D H D^T) / tr(W H W^T)   (relative output error on calibration data)

where ``rho_g = (mean|w|)^2 / mean(w^2)`` over each group of ``group_size`` columns is the moment
ratio the GG fit inverts (:mod:`llmcomp.gg`), so P pulls each group's fitted shape toward ``nu_t``.
A few Adam steps from ``D = 0``; then, since E is quadratic in D, ``D`` is scaled down so that
``E <= eps`` holds exactly (the bound). Groups the quantizer scales separately (default 64) are the
groups reshaped: a lighter-tailed group (larger nu) has a smaller absmax relative to its spread,
hence a finer grid for a following int4 / gg4 pass. The module stays a dense ``nn.Linear``; the
report gives the shape change, the output error used, the ideal entropy-coded size of per-channel
int8 codes, and the error an int4 round-to-nearest pass would make, before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from llmcomp import gg, intquant
from llmcomp.calibration import InputStats
from llmcomp.passes.base import (
    CompressionPass,
    ModuleReport,
    ModuleState,
    Needs,
    PassConfig,
    register_pass,
    weight_error,
)

PROBE_BITS, PROBE_GROUP = 4, 64  # the int4 RTN the report measures before and after (symmetric)
ENTROPY_BITS = 8  # entropy-coded size is measured on per-channel int8 RTN codes
EPS_FLOOR = 1e-30
MAX_TARGET_SHAPE = 16.0
SKETCH_SEED = 0
SKETCH_POWER_STEPS = 2


class DeepShapeConfig(PassConfig):
    target_shape: float = Field(8.0, gt=0.1, le=MAX_TARGET_SHAPE,
                                description="GG shape nu the groups are pulled toward (larger = lighter tails)")
    max_output_error: float = Field(
        5e-3, gt=0, lt=1, description="bound on tr(D H D^T) / tr(W H W^T), the relative calibration output error")
    group_size: int = Field(64, description="columns per reshaped group (the following quantizer's); -1 = per row")
    steps: int = Field(25, ge=1, le=1000, description="Adam steps")
    lr: float = Field(0.03, gt=0, description="Adam step size, relative to the weight's standard deviation")
    rank: int = Field(16, ge=1, description="eigen-directions of H the optimiser sees exactly (the rest: diagonal)")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N * groups, group]``; per row when the group does not divide K."""
    n, k = w.shape
    group = intquant.effective_group_size(group_size, k)
    if k % group:
        group = k
    return w.reshape(n * (k // group), group)


def shape_penalty(w: torch.Tensor, group_size: int, target_shape: float) -> torch.Tensor:
    """Cross-entropy of each group against GG(nu_t) at the group's own variance (scale invariant):
    ``mean |w / alpha_g|^nu_t`` with ``alpha_g`` the GG(nu_t) scale of the group's RMS; for nu_t
    above the group's shape its gradient falls mostly on the largest weights (the tails)."""
    g = _groups(w, group_size)
    rms = (g * g).mean(dim=1, keepdim=True).clamp_min(EPS_FLOOR).sqrt()
    alpha = rms * gg.scale_for_std(target_shape, 1.0)
    u = g.abs() / alpha
    return (u.pow(int(target_shape)) if float(target_shape).is_integer() else u.pow(target_shape)).mean()


@dataclass
class HessianSketch:
    """H as the optimiser sees it: ``H ~ P P^T + diag(d)``, P the top ``rank`` directions (randomised
    SVD, far cheaper than an eigendecomposition), d the diagonal H keeps beyond them. One per input
    group (q/k/v share it)."""

    hessian: torch.Tensor
    proj: torch.Tensor  # [K, r]
    diag: torch.Tensor  # [K]

    @classmethod
    def of(cls, hessian: torch.Tensor, rank: int) -> HessianSketch:
        h = hessian.float().clone()  # a clone: calibration tensors may be inference-mode tensors
        top = max(1, min(rank, h.shape[0]))
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(SKETCH_SEED)
        u, sv, _ = torch.svd_lowrank(h, q=top, niter=SKETCH_POWER_STEPS)
        torch.random.set_rng_state(gen_state)
        proj = u * sv.sqrt()  # H is symmetric PSD: its singular vectors are eigenvectors
        diag = (torch.diagonal(h) - (proj * proj).sum(dim=1)).clamp_min(0)
        return cls(h, proj, diag)


class OutputError:
    """``tr(D H D^T) / tr(W H W^T)``: the relative change of the layer's outputs on calibration data.

    :meth:`approx` (what the optimiser differentiates) uses the :class:`HessianSketch`;
    :meth:`exact` is what the bound is enforced with."""

    def __init__(self, w: torch.Tensor, sketch: HessianSketch) -> None:
        self.sketch = sketch
        self.ref = float(((w @ sketch.hessian) * w).sum().clamp_min(EPS_FLOOR))

    def approx(self, delta: torch.Tensor) -> torch.Tensor:
        sk = self.sketch
        return (((delta @ sk.proj) ** 2).sum() + (delta * delta * sk.diag).sum()) / self.ref

    def exact(self, delta: torch.Tensor) -> float:
        return float(((delta @ self.sketch.hessian) * delta).sum()) / self.ref


def reshape_weight(w: torch.Tensor, hessian: torch.Tensor | HessianSketch, cfg: DeepShapeConfig,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """``(W', relative output error)`` with the error at most ``cfg.max_output_error``."""
    w = w.detach().float().clone()
    sketch = hessian if isinstance(hessian, HessianSketch) else HessianSketch.of(hessian, cfg.rank)
    err_fn = OutputError(w, sketch)
    keep = None if mask is None else mask.to(w.dtype)
    delta = torch.zeros_like(w, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr * float(w.std()))
    base = float(shape_penalty(w, cfg.group_size, cfg.target_shape))
    for _ in range(cfg.steps):
        opt.zero_grad()
        d = delta if keep is None else delta * keep
        loss = shape_penalty(w + d, cfg.group_size, cfg.target_shape) / base + err_fn.approx(d) / cfg.max_output_error
        loss.backward()
        opt.step()
    with torch.no_grad():
        d = delta.detach() if keep is None else delta.detach() * keep
        err = err_fn.exact(d)
        if err > cfg.max_output_error:  # E is quadratic in D: scaling by sqrt(bound / E) meets the bound
            d = d * math.sqrt(cfg.max_output_error / err)
            err = err_fn.exact(d)
    return w + d, err


def probe(w: torch.Tensor) -> dict[str, float]:
    """GG shape, entropy of int8 codes and int4 RTN error of a weight (the report's before/after)."""
    q8 = intquant.quantize_rtn(w.float(), ENTROPY_BITS, -1, True)
    q4 = intquant.quantize_rtn(w.float(), PROBE_BITS, PROBE_GROUP, True)
    return {"shape": gg.fit(w).shape, "entropy_bits": gg.empirical_entropy_bits(q8.q),
            "int4_error": weight_error(w, intquant.dequantize_qw(q4))}


@register_pass
class DeepShapePass(CompressionPass):
    """Bounded-output-change reshaping toward a GG shape (dense in, dense out)."""

    name = "deepshape"
    Config = DeepShapeConfig
    base_needs = Needs(hessian=True)

    def __init__(self, config: PassConfig) -> None:
        super().__init__(config)
        self._sketch: tuple[InputStats, int, HessianSketch] | None = None

    def compress_module(self, name: str, linear: nn.Linear, state: ModuleState,
                        stats: InputStats | None) -> tuple[None, ModuleReport]:
        cfg: DeepShapeConfig = self.config_for(name)  # type: ignore[assignment]
        if stats is None:
            raise ValueError(f"deepshape needs calibration statistics for {name}")
        w = linear.weight.detach().clone()
        before = probe(w)
        if self._sketch is None or self._sketch[0] is not stats or self._sketch[1] != cfg.rank:
            self._sketch = (stats, cfg.rank, HessianSketch.of(stats.hessian, cfg.rank))  # one per input group
        with torch.enable_grad():
            new, err = reshape_weight(w, self._sketch[2], cfg, state.mask)
        linear.weight.data.copy_(new.to(w.dtype))
        after = probe(linear.weight.detach())
        report = {
            "gg_shape_before": round(before["shape"], 4), "gg_shape": round(after["shape"], 4),
            "entropy_bits_before": round(before["entropy_bits"], 4), "entropy_bits": round(after["entropy_bits"], 4),
            "int4_error_before": before["int4_error"], "int4_error_after": after["int4_error"],
            "output_error": err, "weight_change": weight_error(w, linear.weight.detach()),
        }
        return None, report
