"""FineQuant: calibration-free weight-only quantization with per-matrix adaptive granularity.

For each linear layer it walks a ladder of group sizes, coarsest first (one scale per output
channel, then powers of two halving down to ``min_group_size``), fitting scales (and zero points)
at each rung by alternating least squares (:func:`~llmcomp.passes.finequant_fit.fit_quantize`).
It stops refining as soon as the finer grid no longer pays for its extra scale bits at a fixed
price per bit
(:func:`~llmcomp.passes.finequant_fit.worth_refining`): matrices with outliers get small groups,
smooth ones stay coarse. Projections that inference engines fuse (q/k/v, gate/up) are tied to the
finest group size any of them needs, so the fused weight has one layout.

The error that is fitted and drives the choice is the relative weight error, or, with
``activation_aware`` (the pipeline then provides calibration input statistics for the layer), the
activation-weighted error ``sum_j E[x_j^2] (W - W')_ij^2``: the expected output error when input
channels are uncorrelated. Weighting the fit protects the weights that multiply the few
high-energy input channels of LLMs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from llmcomp import intquant
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.base import (
    CompressionPass,
    LayerWork,
    ModuleReport,
    Needs,
    PassConfig,
    register_pass,
    scale_bits,
)
from llmcomp.scheme import FUSED_PROJECTIONS

DEFAULT_FUSED_SETS = [list(members) for members in FUSED_PROJECTIONS.values()]
DEFAULT_MIN_GROUP = 32
# Price of one extra bit per weight, in relative squared weight error. 0.015 picks group 64-128
# for int4 on SmolLM2, per-channel for int8 and group 32-64 for int3 (see docs/FINEQUANT.md).
DEFAULT_THRESHOLD = 0.015


class FineQuantConfig(PassConfig):
    bits: Literal[2, 3, 4, 8] = 4
    symmetric: bool = False
    min_group_size: int = Field(
        DEFAULT_MIN_GROUP, ge=1, description="finest group size the ladder may reach (the floor)"
    )
    max_group_size: int = Field(
        -1, description="coarsest group size to start from; -1 = one scale per output channel"
    )
    threshold: float = Field(
        DEFAULT_THRESHOLD,
        ge=0.0,
        description=(
            "refine while (err_coarse^2 - err_fine^2) / extra bits per weight > threshold "
            "(relative weight errors); smaller refines more, 0 = refine to the floor"
        ),
    )
    require_divisible: bool = Field(
        False,
        description="only group sizes that divide in_features (no short last group; needed by compressed-tensors)",
    )
    target_error: float = Field(
        0.0,
        ge=0.0,
        description=(
            "stop refining once the relative weight error is at most this (0 = off); int8 uses it to "
            "stay per-channel, the layout the fast int8 CPU kernel needs"
        ),
    )
    fit_iters: int = Field(fit.DEFAULT_FIT_ITERS, ge=0, description="least-squares scale fitting rounds; 0 = RTN")
    tie_fused: bool = Field(True, description="give fused siblings (q/k/v, gate/up) one bits/group/symmetric")
    activation_aware: bool = Field(
        False,
        description=(
            "fit scales and choose groups on the error weighted by calibration input energy E[x_j^2] "
            "(needs calibration data)"
        ),
    )
    fused_sets: list[list[str]] = Field(
        default_factory=lambda: [list(s) for s in DEFAULT_FUSED_SETS],
        description="child names that inference engines fuse when they share a parent module",
    )
    respect_mask: bool = Field(
        True,
        description=(
            "keep an earlier sparsity pass's mask: pruned weights are left out of the fit and decode to exactly 0 "
            "(false: fit them as ordinary weights, for comparison)"
        ),
    )


def fused_groups(names: Iterable[str], fused_sets: list[list[str]]) -> list[list[str]]:
    """Partition full module names into tie groups: siblings of one fused set share a group."""
    groups: dict[tuple[str, int] | str, list[str]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        key: tuple[str, int] | str = name
        for idx, members in enumerate(fused_sets):
            if child in members:
                key = (parent, idx)
                break
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class _Search:
    """Ladder search for one matrix; caches every fitted grid so tying costs no refit."""

    def __init__(self, weight: torch.Tensor, cfg: FineQuantConfig, column_weight: torch.Tensor | None,
                 mask: torch.Tensor | None = None):
        self.w = weight.detach() if mask is None else weight.detach() * mask.to(weight.dtype)
        self.cfg = cfg
        self.column_weight = column_weight
        self.mask = mask
        self.fitted: dict[int, intquant.QuantizedWeight] = {}
        self.errors: dict[int, float] = {}

    def at(self, group: int, bits: int, symmetric: bool) -> intquant.QuantizedWeight:
        if group not in self.fitted:
            qw = fit.fit_quantize(
                self.w, bits, group, symmetric, self.cfg.fit_iters, self.w.dtype, column_weight=self.column_weight,
                mask=self.mask,
            )
            self.fitted[group] = qw
            self.errors[group] = fit.relative_error(self.w, intquant.dequantize_qw(qw), self.column_weight)
        return self.fitted[group]

    def ladder(self) -> list[int]:
        k = self.w.shape[1]
        ladder = fit.group_ladder(k, self.cfg.min_group_size, self.cfg.require_divisible)
        if self.cfg.max_group_size > 0:
            ladder = [g for g in ladder if g <= self.cfg.max_group_size] or [ladder[-1]]
        return ladder

    def choose(self, bits: int, symmetric: bool) -> int:
        """Coarsest rung after which one more halving is not worth its scale bits."""

        def error_at(group: int) -> float:
            self.at(group, bits, symmetric)
            return self.errors[group]

        return fit.walk_ladder(
            self.ladder(), error_at, self.w.shape[1], not symmetric, scale_bits(self.w.dtype),
            self.cfg.threshold, self.cfg.target_error,
        )


@register_pass
class FineQuantPass(CompressionPass):
    """Adaptive-granularity weight-only int quantization (FineQuant, Kim et al. 2023)."""

    name = "finequant"
    Config = FineQuantConfig
    calibration_optional = True  # without statistics (the output head) the fit is unweighted

    def needs(self) -> Needs:
        """Calibration-free unless ``activation_aware`` (then input energies E[x_j^2])."""
        return Needs(moments=True) if self.config.activation_aware else Needs()  # type: ignore[attr-defined]

    def process_layer(self, work: LayerWork) -> None:
        base: FineQuantConfig = self.config  # type: ignore[assignment]
        groups = fused_groups(work.targets, base.fused_sets) if base.tie_fused else [[n] for n in work.targets]
        for members in groups:
            self._process_group(work, members)

    def _process_group(self, work: LayerWork, members: list[str]) -> None:
        cfgs: dict[str, FineQuantConfig] = {n: self.config_for(n) for n in members}  # type: ignore[misc]
        # Fused siblings must agree: take the most precise choice any of them asks for.
        bits = max(c.bits for c in cfgs.values())
        symmetric = all(c.symmetric for c in cfgs.values())
        searches, chosen = {}, {}
        for name in members:
            stats = None if work.stats is None else work.stats.get(name)
            sq = None if stats is None else stats.sum_sq.float()
            mask = work.states[name].mask if cfgs[name].respect_mask else None
            searches[name] = _Search(work.targets[name].weight, cfgs[name], sq, mask)
            chosen[name] = searches[name].choose(bits, symmetric)
        tied = min(chosen.values())
        for name in members:
            search, linear = searches[name], work.targets[name]
            k = linear.in_features
            # Tied groups smaller than K are ladder rungs (powers of two): fits may be cached.
            group = min(tied, k)
            qw = search.at(group, bits, symmetric)
            work.replace(name, QuantLinear.from_quantized(qw, linear.bias, dtype=linear.weight.dtype))
            work.states[name].passes.append(self._report(name, members, search, chosen[name], group, qw, bits,
                                                         symmetric, linear))

    def _report(self, name: str, members: list[str], search: _Search, own: int, group: int,
                qw: intquant.QuantizedWeight, bits: int, symmetric: bool, linear: nn.Linear) -> ModuleReport:
        k = linear.in_features
        return {
            "pass": self.name,
            "bits": bits,
            "group_size": qw.group_size,
            "symmetric": symmetric,
            "own_group_size": min(own, k),
            "tied_with": [m for m in members if m != name],
            "ladder_rel_error": {str(g): round(e, 6) for g, e in search.errors.items()},
            "rel_error": search.errors[group],
            "bits_per_weight": intquant.storage_bits_per_weight(
                k, qw.group_size, bits, not symmetric, scale_bits=scale_bits(linear.weight.dtype)
            ),
            "activation_weighted": search.column_weight is not None,
            "kept_mask": search.mask is not None,
            "numel": linear.weight.numel(),
        }
