"""Budgeted mixed precision: per-layer bits and group size under a global bits-per-weight or
size budget (``llmcomp compress MODEL --target-bits 4.25`` / ``--target-size 80MB``).

Planning (``begin_model``, once, on the uncompressed model):

1. every targeted linear is fitted at every candidate (bits x group size, FineQuant's
   activation-weighted least squares) and its relative weighted error ``e^2`` recorded;
2. the *measured sensitivity* of each layer group (q/k/v, o, gate/up, down: the units engines
   fuse, which must share one setting) is the KL divergence of the model's next-token
   distribution on calibration text when only that group is quantized at a probe setting
   (int3, group 128): :mod:`llmcomp.passes.sensitivity`;
3. an option's estimated cost to the model is ``s * sum(numel * e^2)`` with
   ``s = (KL_probe / sum(numel * e^2_probe)) ** damping``. ``damping = 0`` is FineQuant's own
   uniform price per bit; ``1`` trusts the probe fully. The probe is one noisy sample of a
   nonlinear response, and ``0.5`` was best on SmolLM2 at 4.25 and 3.5 bits (docs/AUTOBITS.md);
4. a multiple-choice knapsack (:mod:`llmcomp.passes.budget`) picks one option per group so the
   total stored bits (scales and zero points included) stay within the budget.

Then, layer by layer, each module is quantized with its planned bits and group size, fitted to
the calibration statistics of the already-compressed model (as ``finequant-*-aw`` does), and
keeping an earlier pass's sparsity mask.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from llmcomp import intquant
from llmcomp.errors import LlmcompError
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.base import CompressionPass, LayerWork, Needs, PassConfig, register_pass, scale_bits
from llmcomp.passes.budget import Item, Option, solve
from llmcomp.passes.sensitivity import KLProbe, probe_layers
from llmcomp.scheme import fused_key

DEFAULT_BITS = [3, 4, 8]
PROBE_BITS, PROBE_GROUP = 3, 128
DEFAULT_DAMPING = 0.5
DEFAULT_PROBE_SAMPLES = 8
MIN_GROUP = 32


class AutoBitsConfig(PassConfig):
    target_bits: float | None = Field(
        None, gt=1.0, le=16.0, description="average stored bits per weight of the targeted layers (scales included)"
    )
    target_bytes: int | None = Field(
        None, gt=0, description="total size of the checkpoint's tensors in bytes (everything else counted as stored)"
    )
    bits: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: list(DEFAULT_BITS),
                                            description="bit widths the plan may use")
    min_group_size: int = Field(MIN_GROUP, ge=8, description="finest group size considered")
    damping: float = Field(DEFAULT_DAMPING, ge=0.0, le=1.0,
                           description="exponent on the measured sensitivity (0: one price per bit, 1: full trust)")
    probe_samples: int = Field(DEFAULT_PROBE_SAMPLES, gt=0,
                               description="calibration windows the sensitivity probes run on")
    fit_iters: int = Field(fit.DEFAULT_FIT_ITERS, ge=0)
    symmetric_8bit: bool = Field(True, description="8-bit layers symmetric per channel (the fast int8 CPU kernel)")

    @model_validator(mode="after")
    def _one_target(self) -> AutoBitsConfig:
        if (self.target_bits is None) == (self.target_bytes is None):
            raise ValueError("give exactly one of target_bits and target_bytes")
        if self.lm_head:
            raise ValueError("autobits plans the decoder layers; the output head is not supported (lm_head: false)")
        return self


Choice = tuple[int, int, bool]  # (bits, effective group size, symmetric)


def candidate_choices(k: int, bits: list[int], min_group: int, symmetric_8bit: bool) -> list[Choice]:
    """Bit widths x FineQuant's group ladder (per channel, then powers of two); 8 bits per channel only."""
    out: list[Choice] = []
    for b in sorted(set(bits)):
        if b == 8 and symmetric_8bit:
            out.append((8, k, True))
            continue
        out.extend((b, g, False) for g in fit.group_ladder(k, min_group))
    return out


@register_pass
class AutoBitsPass(CompressionPass):
    """Mixed-precision integer quantization planned under a global budget (see the module doc)."""

    name = "autobits"
    Config = AutoBitsConfig
    base_needs = Needs(moments=True)

    def __init__(self, config: AutoBitsConfig) -> None:
        super().__init__(config)
        self.plan: dict[str, Choice] = {}
        self.summary: dict[str, Any] = {}

    # -- planning ------------------------------------------------------------------------------
    def begin_model(self, model: Any) -> None:
        cfg: AutoBitsConfig = self.config  # type: ignore[assignment]
        t0 = time.perf_counter()
        names = [n for n in model.module_shapes if self.selects(n)]
        numel = sum(model.module_shapes[n][0] * model.module_shapes[n][1] for n in names)
        budget = self._budget_bits(model, names, numel)
        ids = model.calibration_ids()[: cfg.probe_samples]
        full = model.load_model(torch.float32)
        try:
            energy = _input_energy(full, names, ids)
            candidates = {n: self._fit_candidates(full.get_submodule(n).weight.detach(), energy[n], model.dtype)
                          for n in names}
            groups: dict[str, list[str]] = {}
            for n in names:
                groups.setdefault(fused_key(n), []).append(n)
            kl = self._probe(full, model.layer_prefix, groups, candidates, energy, ids, model.dtype)
        finally:
            del full
        items = []
        for key, members in groups.items():
            choices = [c for c, _, _ in candidates[members[0]]]
            probe = _probe_index(choices)
            probe_err = sum(candidates[m][probe][2] for m in members)
            s = (kl[key] / max(probe_err, 1e-30)) ** cfg.damping
            items.append(Item(members, [Option(sum(candidates[m][i][1] for m in members),
                                               s * sum(candidates[m][i][2] for m in members))
                                        for i in range(len(choices))]))
        picked = solve(items, budget, numel)
        plan_bits = 0.0
        for item, i in zip(items, picked, strict=True):
            for m in item.names:
                self.plan[m] = candidates[m][i][0]
                plan_bits += candidates[m][i][1]
        counts: dict[str, int] = {}
        for bits, group, _ in self.plan.values():
            key = f"int{bits} g{group}"
            counts[key] = counts.get(key, 0) + 1
        self.summary = {
            "target_bits": cfg.target_bits, "target_bytes": cfg.target_bytes,
            "budget_bits_per_weight": round(budget / numel, 4),
            "planned_bits_per_weight": round(plan_bits / numel, 4),
            "sensitivity": {k: round(v, 6) for k, v in sorted(kl.items(), key=lambda kv: -kv[1])},
            "choices": dict(sorted(counts.items())), "damping": cfg.damping,
            "probe": {"bits": PROBE_BITS, "group_size": PROBE_GROUP, "samples": int(ids.shape[0]),
                      "seq_len": int(ids.shape[1])},
            "planning_seconds": round(time.perf_counter() - t0, 1),
        }

    def _budget_bits(self, model: Any, names: list[str], numel: int) -> float:
        cfg: AutoBitsConfig = self.config  # type: ignore[assignment]
        if cfg.target_bits is not None:
            return cfg.target_bits * numel
        targeted = {f"{n}.weight" for n in names}
        other = 0
        for name in model.weights.names():
            if name in targeted:
                continue
            shape, dtype = model.weights.shape_dtype(name)
            count = 1
            for d in shape:
                count *= d
            other += count * dtype.itemsize
        budget = (cfg.target_bytes - other) * 8.0
        if budget <= 0:
            raise LlmcompError(f"target size {cfg.target_bytes / 1e6:.1f} MB is below the {other / 1e6:.1f} MB of "
                               "tensors that stay dense (embeddings, norms, head)")
        return budget

    def _fit_candidates(self, w: torch.Tensor, energy: torch.Tensor, dtype: torch.dtype
                        ) -> list[tuple[Choice, float, float]]:
        """(choice, stored bits, numel * relative weighted error^2) for every candidate; scales are
        stored (and counted) in the model's dtype."""
        cfg: AutoBitsConfig = self.config  # type: ignore[assignment]
        stored = w.to(dtype).float()  # the weights as the checkpoint holds them
        ref = float(((stored.double() ** 2) @ energy.double()).sum())
        out = []
        for bits, group, sym in candidate_choices(w.shape[1], cfg.bits, cfg.min_group_size, cfg.symmetric_8bit):
            qw = fit.fit_quantize(stored, bits, group, sym, cfg.fit_iters, dtype, column_weight=energy)
            err = float((((intquant.dequantize_qw(qw) - stored).double() ** 2) @ energy.double()).sum())
            bpw = intquant.storage_bits_per_weight(w.shape[1], qw.group_size, bits, not sym, scale_bits(dtype))
            cost = bpw * w.numel()
            out.append(((bits, qw.group_size, sym), cost, w.numel() * err / max(ref, 1e-30)))
        return out

    def _probe(self, full: nn.Module, layer_prefix: str, groups: dict[str, list[str]],
               candidates: dict[str, list[tuple[Choice, float, float]]], energy: dict[str, torch.Tensor],
               ids: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
        """KL of quantizing each group alone at the probe setting (int3, group 128)."""
        cfg: AutoBitsConfig = self.config  # type: ignore[assignment]
        layers, head = probe_layers(full, layer_prefix)
        probe = KLProbe(full, layers, head, ids)
        kl = {}
        for key, members in groups.items():
            index = int(key[len(layer_prefix) + 1 :].split(".")[0])
            saved = {m: full.get_submodule(m).weight.data for m in members}
            for m in members:
                bits, group, sym = [c for c, _, _ in candidates[m]][_probe_index([c for c, _, _ in candidates[m]])]
                w = saved[m].to(dtype).float()
                qw = fit.fit_quantize(w, bits, group, sym, cfg.fit_iters, dtype, column_weight=energy[m])
                full.get_submodule(m).weight.data = intquant.dequantize_qw(qw)
            kl[key] = probe.kl_from(index)
            for m in members:
                full.get_submodule(m).weight.data = saved[m]
        return kl

    def state_dict(self) -> dict[str, Any]:
        return {"plan": {n: list(c) for n, c in self.plan.items()}, "summary": self.summary}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = {n: (int(c[0]), int(c[1]), bool(c[2])) for n, c in state.get("plan", {}).items()}
        self.summary = state.get("summary", {})

    def end_model(self, model: Any) -> dict[str, Any] | None:
        return {**self.summary, "plan": {n: {"bits": c[0], "group_size": c[1], "symmetric": c[2]}
                                         for n, c in self.plan.items()}}

    # -- per layer -----------------------------------------------------------------------------
    def process_layer(self, work: LayerWork) -> None:
        cfg: AutoBitsConfig = self.config  # type: ignore[assignment]
        for name, linear in list(work.targets.items()):
            if name not in self.plan:
                raise LlmcompError(f"autobits has no plan for {name} (was the plan made for another model?)")
            bits, group, sym = self.plan[name]
            stats = None if work.stats is None else work.stats.get(name)
            energy = None if stats is None else stats.sum_sq.float()
            mask = work.states[name].mask
            w = linear.weight.detach() if mask is None else linear.weight.detach() * mask.to(linear.weight.dtype)
            qw = fit.fit_quantize(w, bits, group, sym, cfg.fit_iters, w.dtype, column_weight=energy, mask=mask)
            work.replace(name, QuantLinear.from_quantized(qw, linear.bias, dtype=linear.weight.dtype))
            k = linear.in_features
            work.states[name].passes.append({
                "pass": self.name, "bits": bits, "group_size": qw.group_size, "symmetric": sym,
                "rel_error": fit.relative_error(w, intquant.dequantize_qw(qw), energy),
                "bits_per_weight": intquant.storage_bits_per_weight(k, qw.group_size, bits, not sym,
                                                                    scale_bits(linear.weight.dtype)),
                "numel": linear.weight.numel(), "kept_mask": mask is not None,
            })


def _probe_index(choices: list[Choice]) -> int:
    """The candidate closest to the probe setting (int3, group 128; the nearest group if absent)."""
    pool = [i for i, c in enumerate(choices) if c[0] == PROBE_BITS] or list(range(len(choices)))
    return min(pool, key=lambda i: abs(choices[i][1] - PROBE_GROUP))


def _input_energy(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_t x_tj^2`` per input channel of each named linear (the activation-aware fit weights)."""
    energy = {n: torch.zeros(model.get_submodule(n).in_features, dtype=torch.float64) for n in names}
    handles = []
    for n in names:
        def hook(_m: nn.Module, args: tuple, _n: str = n) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            energy[_n] += (x * x).sum(0)

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], 4):
                model(input_ids=ids[start : start + 4], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: e.float() for n, e in energy.items()}
