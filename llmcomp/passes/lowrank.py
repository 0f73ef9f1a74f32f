"""Truncated-SVD low-rank factorization ``W ~ U V`` (pass ``lowrank``), and what it shares with
the tensor-network pass: the bond/rank rule and the sensitivity defaults.

Why a baseline: a rank-``r`` factorization is the best approximation at its parameter count in
Frobenius norm (Eckart-Young), so the MPO pass (``tensornet``) is measured against it at an equal
parameter count.

Sensitivity defaults (CompactifAI, Tomut et al. 2024): the first decoder blocks and the MLP output
projection are the most sensitive, so they stay dense unless a recipe says otherwise
(``dense_first_blocks``, ``dense_modules``, or ``keep_dense`` per module through ``overrides``).
"""

from __future__ import annotations

import fnmatch
import re

import torch
from pydantic import Field
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.modules.lowrank_linear import LowRankLinear
from llmcomp.passes.base import (
    CompressionPass,
    ModuleReport,
    ModuleState,
    PassConfig,
    register_pass,
    scale_bits,
    weight_error,
)

DEFAULT_RATIO = 0.5
DEFAULT_DENSE_FIRST_BLOCKS = 2
DEFAULT_DENSE_MODULES = ["*.mlp.down_proj"]
BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")


class FactorizedConfig(PassConfig):
    """Knobs shared by ``lowrank`` and ``tensornet``. Precedence of the size rule: ``energy`` >
    ``chi`` > ``ratio`` (an override that wants a lower-precedence rule sets the others to null)."""

    ratio: float | None = Field(
        None, gt=0.0, le=1.0,
        description=f"kept parameters / dense parameters of each layer (default {DEFAULT_RATIO} when no rule is set)",
    )
    chi: int | None = Field(None, gt=0, description="fixed bond dimension (rank for lowrank) per layer")
    energy: float | None = Field(
        None, gt=0.0, le=1.0,
        description="keep the fewest singular values holding this fraction of the squared spectrum, per SVD",
    )
    dense_first_blocks: int = Field(
        DEFAULT_DENSE_FIRST_BLOCKS, ge=0, description="decoder blocks 0..N-1 stay dense (most sensitive)"
    )
    dense_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DENSE_MODULES),
        description="glob patterns kept dense by default (the MLP output projection is sensitive)",
    )
    keep_dense: bool | None = Field(
        None, description="per-module override: true = leave dense, false = compress despite the defaults"
    )

    def rule(self) -> tuple[str, float]:
        """The size rule in force: ``("energy"|"chi"|"ratio", value)``."""
        if self.energy is not None:
            return "energy", self.energy
        if self.chi is not None:
            return "chi", self.chi
        return "ratio", self.ratio if self.ratio is not None else DEFAULT_RATIO


def block_index(name: str) -> int | None:
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Fewest leading singular values whose squares hold ``energy`` of the total."""
    sq = s.double().pow(2)
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


class FactorizedPass(CompressionPass):
    """Targeting with the sensitivity defaults; subclasses implement :meth:`compress_module`."""

    Config = FactorizedConfig

    def selects(self, name: str) -> bool:
        if not super().selects(name):
            return False
        cfg: FactorizedConfig = self.config_for(name)  # type: ignore[assignment]
        if cfg.keep_dense is not None:
            return not cfg.keep_dense
        block = block_index(name)
        if block is not None and block < cfg.dense_first_blocks:
            return False
        return not any(fnmatch.fnmatchcase(name, pat) for pat in cfg.dense_modules)


def lowrank_rank(shape: tuple[int, int], cfg: FactorizedConfig, s: torch.Tensor) -> int:
    out_f, in_f = shape
    full = min(out_f, in_f)
    kind, value = cfg.rule()
    if kind == "energy":
        rank = energy_rank(s, float(value))
    elif kind == "chi":
        rank = int(value)
    else:
        rank = int(float(value) * out_f * in_f // (out_f + in_f))
    return max(1, min(full, rank))


def truncated_svd(weight: torch.Tensor, cfg: FactorizedConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U sqrt(S), sqrt(S) V^T, S)`` truncated by the size rule, computed in float64."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    rank = lowrank_rank(tuple(weight.shape), cfg, s)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


@register_pass
class LowRankPass(FactorizedPass):
    """Truncated SVD per linear layer, split evenly (``sqrt(S)`` on each side) for healing."""

    name = "lowrank"

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[nn.Module, ModuleReport]:
        cfg: FactorizedConfig = self.config_for(name)  # type: ignore[assignment]
        w = linear.weight.detach()
        if state.mask is not None:
            w = w * state.mask.to(w.dtype)
        u, v, s = truncated_svd(w, cfg)
        module = LowRankLinear.from_factors(u, v, linear.bias, dtype=w.dtype)
        kept = float(s[: u.shape[1]].double().pow(2).sum() / s.double().pow(2).sum().clamp_min(1e-300))
        rule, value = cfg.rule()
        return module, {
            "rank": u.shape[1],
            "rule": rule,
            "rule_value": value,
            "params": module.num_params,
            "param_ratio": module.num_params / w.numel(),
            "bits_per_weight": module.num_params * scale_bits(w.dtype) / w.numel(),
            "energy_kept": kept,
            "rel_error": weight_error(w, module.dequantized_weight(torch.float32)),
            "numel": w.numel(),
        }
