"""DSnoT (Zhang et al., ICLR 2024): training-free refinement of a sparse mask by pruned/grown swaps.

Per output row i the expected reconstruction error of the sparse layer is
``eps_i = sum_{j pruned} W_ij E[x_j]`` (dense output minus sparse output, in expectation). Each
cycle makes at most one swap per row, so per-row sparsity never changes:

* grow the pruned weight that best cancels ``eps``: the largest ``sign(eps) W_ij E[x_j] / Var[x_j]^p``;
* prune, among the kept weights whose removal reduces ``|eps|`` (after the growth), the one with the
  lowest Wanda score ``|W_ij| ||X_j||``; for N:M it must lie in the grown weight's M-block.

A row stops when ``|eps|`` is under the threshold, when ``eps`` changes sign, when no weight
qualifies for removal, or after ``max_cycles``. All rows move at once (tensor ops, no row loop).

What we do differently from the public code: every linear layer is refined (it skips the MLP), and
the removal rule is applied (its ``--without_same_sign`` flag is always on); both are options
(``targets``, ``sign_rule``) so each choice can be measured. The initial mask is computed here
from the dense weights (``initial``) because growing needs the original values; with SparseGPT
the refined mask is then compensated by SparseGPT's OBS update with that mask held fixed.

With SparseGPT two options go beyond the paper (docs/SPARSITY.md has the measurements):
``error_reference="compensated"`` scores swaps against what the OBS-updated layer really outputs
(kept weights at their updated values, ``eps = (W_dense - W_updated) E[x]``) instead of the
uncompensated error; ``guard`` keeps, per row, SparseGPT's own result whenever the refined and
re-compensated row has the larger output error ``delta H delta^T`` (SparseGPT's objective), so the
layer's calibration error can only go down.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.passes.base import CompressionPass, ModuleReport, ModuleState, Needs, register_pass
from llmcomp.passes.sparsegpt import DEFAULT_BLOCK, DEFAULT_DAMP, sparsegpt_prune
from llmcomp.passes.sparsity_masks import SparsityConfig, apply_mask, honour_earlier, parse_pattern, prune_mask
from llmcomp.passes.wanda import wanda_scores

DEFAULT_CYCLES = 50
# The public default is 0.1 on an error summed over a 2048-token sequence; ours is per token.
DEFAULT_THRESHOLD = 0.1 / 2048
DEFAULT_VAR_POWER = 1.0
VAR_FLOOR = 1e-12  # keeps 1 / Var^p finite for a constant input channel


class DSnoTConfig(SparsityConfig):
    initial: Literal["magnitude", "wanda", "sparsegpt"] = Field("wanda", description="the mask DSnoT starts from")
    max_cycles: int = Field(DEFAULT_CYCLES, ge=0, description="at most this many swaps per row")
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, description="stop a row once |eps| (per token) is under this")
    var_power: float = Field(DEFAULT_VAR_POWER, ge=0.0, description="p in the growth score W E[x] / Var[x]^p")
    sign_rule: bool = Field(True, description="prune only weights whose removal reduces |eps| (false: public code)")
    compensate: bool = Field(True, description="with initial=sparsegpt: OBS-compensate the refined mask")
    block_size: int = Field(DEFAULT_BLOCK, ge=1, description="sparsegpt block size (initial=sparsegpt)")
    damp: float = Field(DEFAULT_DAMP, gt=0.0, description="sparsegpt damping (initial=sparsegpt)")
    error_reference: Literal["pruned", "compensated"] = Field(
        "pruned", description="initial=sparsegpt: eps from the pruned dense weights (paper) or from the "
        "OBS-updated layer's real error")
    guard: bool = Field(False, description="initial=sparsegpt: per row, keep SparseGPT's result where the "
                        "refined row's output error (delta H delta^T) is larger")

    @model_validator(mode="after")
    def _sparsegpt_only(self) -> DSnoTConfig:
        if self.initial != "sparsegpt" and (self.guard or self.error_reference != "pruned"):
            raise ValueError("guard and error_reference='compensated' need initial='sparsegpt'")
        if self.guard and not self.compensate:
            raise ValueError("guard compares OBS-compensated rows: it needs compensate=true")
        return self


def row_output_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row ``delta H delta^T`` with ``delta = dense - weight``: the row's mean squared output error x 2."""
    delta = (dense - weight).to(hessian.dtype)
    return ((delta @ hessian) * delta).sum(1)


def dsnot_refine(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 sq_norm: torch.Tensor, pattern: str = "unstructured", max_cycles: int = DEFAULT_CYCLES,
                 threshold: float = DEFAULT_THRESHOLD, var_power: float = DEFAULT_VAR_POWER,
                 sign_rule: bool = True, frozen: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The refined keep-mask and a summary (swaps, |eps| before and after, mean over rows).

    ``frozen``: pruned positions that may never grow back (an earlier pass's zeros). ``offset``:
    per-row error the kept weights already carry (``sum_kept (W_dense - W) E[x]`` when ``weight``
    holds compensated kept values), added to ``eps``. Speed: the
    score matrices are masked once and then updated at the two swapped positions per row, and the
    rows still swapping are compacted whenever they fall to half of the working set.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype)
    keep = keep.clone()
    n_rows, n_cols = w.shape
    contrib = w * mean.to(dtype).unsqueeze(0)  # W_ij E[x_j]: what pruning weight j adds to eps_i
    grow_score = contrib / var.to(dtype).clamp_min(VAR_FLOOR).pow(var_power).unsqueeze(0)
    wanda = wanda_scores(w, sq_norm).to(dtype)
    nm = parse_pattern(pattern)
    eps = (contrib * (~keep).to(dtype)).sum(1)
    if offset is not None:
        eps = eps + offset.to(dtype)
    eps0 = eps.clone()
    sign0 = torch.sign(eps)
    swaps = torch.zeros(n_rows, dtype=torch.int64)
    growable = ~keep if frozen is None else ~keep & ~frozen
    work = _Work(torch.arange(n_rows), contrib, grow_score, wanda, keep, growable, sign_rule and nm is None)
    active = eps.abs() > threshold
    for _ in range(max_cycles):
        n_active = int(active[work.rows].sum())
        if not n_active:
            break
        if n_active <= work.rows.numel() // 2:
            work = work.subset(active[work.rows])
        r = work.rows
        e = eps[r]
        grow, has_grow = work.grow(e)
        eps_after = e - work.contrib.gather(1, grow[:, None])[:, 0]
        if nm is None:
            prune, has_prune = work.prune(eps_after)
        else:
            prune, has_prune = _prune_in_block(work, keep, grow, eps_after, nm[1], sign_rule)
        go = active[r] & has_grow & has_prune
        work.swap(go, grow, prune, keep)
        p_contrib = work.contrib.gather(1, prune[:, None])[:, 0]
        eps[r] = torch.where(go, eps_after + p_contrib, e)
        swaps[r] += go.long()
        active[r] = go & (eps[r].abs() > threshold) & (torch.sign(eps[r]) == sign0[r])
    return keep, {
        "dsnot_swaps": float(swaps.float().mean()),
        "dsnot_eps_before": float(eps0.abs().mean()),
        "dsnot_eps_after": float(eps.abs().mean()),
    }


class _Work:
    """Masked score matrices of the rows still swapping (``rows`` = their global indices)."""

    def __init__(self, rows: torch.Tensor, contrib: torch.Tensor, grow_score: torch.Tensor, wanda: torch.Tensor,
                 keep: torch.Tensor, growable: torch.Tensor, interval: bool) -> None:
        self.rows, self.contrib, self.grow_score, self.wanda = rows, contrib, grow_score, wanda
        self.interval = interval  # unstructured with the sign rule: candidates split by the sign of W E[x]
        ninf = torch.tensor(float("-inf"), dtype=contrib.dtype)
        inf = torch.tensor(float("inf"), dtype=contrib.dtype)
        self.g_pos = torch.where(growable, grow_score, ninf)
        self.g_neg = torch.where(growable, -grow_score, ninf)
        if interval:
            self.abs_contrib = contrib.abs()
            self.p_neg = torch.where(keep & (contrib < 0), wanda, inf)  # removable when eps > 0
            self.p_pos = torch.where(keep & (contrib > 0), wanda, inf)  # removable when eps < 0
        else:
            self.p_all = torch.where(keep, wanda, inf)

    def subset(self, sel: torch.Tensor) -> _Work:
        new = object.__new__(_Work)
        for key, value in vars(self).items():
            setattr(new, key, value[sel] if isinstance(value, torch.Tensor) else value)
        return new

    def grow(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the growable weight with the largest sign(eps) W E[x] / Var^p, and whether one exists."""
        best_pos, idx_pos = self.g_pos.max(1)  # two read-only reductions beat one masked copy
        best_neg, idx_neg = self.g_neg.max(1)
        up = eps > 0
        best = torch.where(up, best_pos, best_neg)
        return torch.where(up, idx_pos, idx_neg), torch.isfinite(best) & (eps != 0)

    def prune(self, eps_after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the removable kept weight with the lowest Wanda score, and whether one exists."""
        if self.interval:  # |eps' + c| < |eps'|  <=>  c opposite to eps' and |c| < 2 |eps'|
            inside = self.abs_contrib < 2 * eps_after.abs().unsqueeze(1)
            inf = torch.tensor(float("inf"), dtype=self.p_neg.dtype)
            best_n, idx_n = torch.where(inside, self.p_neg, inf).min(1)
            best_p, idx_p = torch.where(inside, self.p_pos, inf).min(1)
            down = eps_after > 0
            return torch.where(down, idx_n, idx_p), torch.isfinite(torch.where(down, best_n, best_p))
        best, idx = self.p_all.min(1)
        return idx, torch.isfinite(best)

    def swap(self, go: torch.Tensor, grow: torch.Tensor, prune: torch.Tensor, keep: torch.Tensor) -> None:
        """Apply the swaps of rows ``go``: ``grow`` becomes kept, ``prune`` pruned (and growable)."""
        loc = go.nonzero()[:, 0]
        if not loc.numel():
            return
        g, p = grow[loc], prune[loc]
        keep[self.rows[loc], g] = True
        keep[self.rows[loc], p] = False
        ninf, inf = float("-inf"), float("inf")
        self.g_pos[loc, g] = ninf
        self.g_neg[loc, g] = ninf
        self.g_pos[loc, p] = self.grow_score[loc, p]
        self.g_neg[loc, p] = -self.grow_score[loc, p]
        if self.interval:
            c, score = self.contrib[loc, g], self.wanda[loc, g]
            self.p_neg[loc, g] = torch.where(c < 0, score, inf)
            self.p_pos[loc, g] = torch.where(c > 0, score, inf)
            self.p_neg[loc, p] = inf
            self.p_pos[loc, p] = inf
        else:
            self.p_all[loc, g] = self.wanda[loc, g]
            self.p_all[loc, p] = inf


def _prune_in_block(work: _Work, keep: torch.Tensor, grow: torch.Tensor, eps_after: torch.Tensor, m: int,
                    sign_rule: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M: the removable kept weight with the lowest Wanda score inside the grown weight's block."""
    cols = (grow // m * m).unsqueeze(1) + torch.arange(m)
    kept = keep[work.rows.unsqueeze(1), cols]
    kept.scatter_(1, (grow % m).unsqueeze(1), False)  # still pruned as far as this cycle's choice goes
    if sign_rule:
        c = work.contrib.gather(1, cols)
        kept &= (eps_after.unsqueeze(1) + c).abs() < eps_after.abs().unsqueeze(1)
    score = torch.where(kept, work.wanda.gather(1, cols), torch.tensor(float("inf"), dtype=work.wanda.dtype))
    best, idx = score.min(1)
    return cols.gather(1, idx.unsqueeze(1))[:, 0], torch.isfinite(best)


@register_pass
class DSnoTPass(CompressionPass):
    name = "dsnot"
    Config = DSnoTConfig

    def needs(self) -> Needs:
        if self.config.initial == "sparsegpt":  # type: ignore[attr-defined]
            return Needs(moments=True, hessian=True, sequential=True)
        return Needs(moments=True)

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[None, ModuleReport]:
        if stats is None:
            raise RuntimeError("dsnot needs calibration statistics")
        cfg: DSnoTConfig = self.config_for(name)  # type: ignore[assignment]
        original = linear.weight.data.clone()
        w = original.float()
        forced = None if state.mask is None else ~state.mask
        w_sg = None
        if cfg.initial == "sparsegpt":
            w_sg, keep = sparsegpt_prune(w, stats.hessian.float(), cfg.sparsity, cfg.pattern, cfg.block_size,
                                         cfg.damp, forced_prune=forced, name=name)
        else:
            scores = w.abs() if cfg.initial == "magnitude" else wanda_scores(w, stats.sq_norm)
            keep = prune_mask(honour_earlier(scores, state), cfg.sparsity, cfg.pattern)
        if state.mask is not None:
            keep &= state.mask
        score_w, offset = w, None
        if w_sg is not None and cfg.error_reference == "compensated":
            # Kept weights at their OBS-updated values (what pruning one removes), pruned ones at their
            # dense values (what growing one restores); the kept weights' updates are already an error.
            score_w = torch.where(keep, w_sg, w)
            offset = ((w - w_sg) * keep * stats.mean.to(w.dtype)).sum(1)
        refined, summary = dsnot_refine(score_w, keep, stats.mean, stats.var, stats.sq_norm, cfg.pattern,
                                        cfg.max_cycles, cfg.threshold, cfg.var_power, cfg.sign_rule, frozen=forced,
                                        offset=offset)
        new = None
        if w_sg is not None and cfg.compensate:
            new, _ = sparsegpt_prune(w, stats.hessian.float(), cfg.sparsity, cfg.pattern, cfg.block_size, cfg.damp,
                                     fixed_keep=refined, name=name)
            if cfg.guard:
                h = stats.hessian.float()
                worse = row_output_error(new, w, h) > row_output_error(w_sg, w, h)
                refined = torch.where(worse.unsqueeze(1), keep, refined)
                new = torch.where(worse.unsqueeze(1), w_sg, new)
                summary["dsnot_guarded_rows"] = float(worse.float().mean())
        report = apply_mask(linear, refined, state, cfg.pattern, original, new)
        return None, {**report, "initial": cfg.initial, **summary}
