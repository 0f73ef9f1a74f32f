"""SparseGPT (Frantar & Alistarh, 2023): prune with an OBS update of the remaining weights.

Per input group (q/k/v share one), ``H = 2/n sum x x^T`` in float32. Columns are visited left to
right in blocks of 128: at the start of each block the mask of that block is chosen from
``w^2 / [H^-1]_jj^2`` (``[H^-1]`` = the upper Cholesky factor of the inverse Hessian, whose
diagonal is the OBS saliency denominator of a column once the columns before it are fixed);
for N:M the choice is made every M columns instead. Each pruned column's error is spread over
the columns to its right (the OBS update); updates to later blocks are batched ("lazy").

Unstructured sparsity is exact per row: block boundaries get their share of the row's count by
cumulative rounding, so every row loses ``int(in * sparsity)`` weights, as with Wanda. A mask
fixed in advance (DSnoT's refined mask) can be given instead of choosing one: then only the
compensation runs.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.errors import LlmcompError
from llmcomp.passes.base import CompressionPass, ModuleReport, ModuleState, Needs, register_pass
from llmcomp.passes.sparsity_masks import SparsityConfig, apply_mask, check_nm, parse_pattern, pruned_per_row

DEFAULT_BLOCK = 128
DEFAULT_DAMP = 0.01
# On a failed Cholesky the damping is multiplied by this, this many times, before giving up.
DAMP_GROWTH = 10.0
DAMP_RETRIES = 4


class SparseGPTConfig(SparsityConfig):
    block_size: int = Field(DEFAULT_BLOCK, ge=1, description="columns per lazy-update block")
    damp: float = Field(DEFAULT_DAMP, gt=0.0, description="damping added to H's diagonal, as a fraction of its mean")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, name: str = "?") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more damping if that fails."""
    h = hessian.clone()
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    factor = damp
    for _ in range(DAMP_RETRIES + 1):
        try:
            lower = torch.linalg.cholesky(h + factor * mean_diag * eye)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            factor *= DAMP_GROWTH
    raise LlmcompError(
        f"sparsegpt: {name}: Hessian not positive definite even with damping {factor / DAMP_GROWTH:g} "
        "of its mean diagonal; use more (or more varied) calibration samples"
    )


def _block_mask(scores: torch.Tensor, start: int, stop: int, n_cols: int, sparsity: float) -> torch.Tensor:
    """Unstructured keep-mask of columns [start, stop): this block's share of the per-row count."""
    total = pruned_per_row(n_cols, sparsity)
    share = round(total * stop / n_cols) - round(total * start / n_cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if share > 0:
        keep.scatter_(1, torch.topk(scores, share, dim=1, largest=False).indices, False)
    return keep


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                    block_size: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP, fixed_keep: torch.Tensor | None = None,
                    forced_prune: torch.Tensor | None = None, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight, keep-mask)``; computes in ``hessian``'s dtype (float32 in the pass).

    ``fixed_keep``: use this mask instead of choosing one (compensation only). ``forced_prune``:
    positions that must end up pruned (an earlier pass's zeros), preferred when choosing.
    """
    dtype = hessian.dtype
    w = weight.to(dtype).clone()
    h = hessian.clone()
    n_rows, n_cols = w.shape
    dead = torch.diagonal(h) == 0
    if bool(dead.all()):
        raise LlmcompError(f"sparsegpt: {name}: the Hessian is zero (no calibration inputs reached this module)")
    h[dead, dead] = 1.0  # an input that is always 0: its weights do not matter, keep H invertible
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, damp, name)
    nm = parse_pattern(pattern)
    if nm is not None:
        check_nm(n_cols, pattern)
        if block_size % nm[1]:
            raise ValueError(f"sparsegpt block_size {block_size} must be a multiple of M={nm[1]}")
    keep = torch.ones(n_rows, n_cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        diag = torch.diagonal(u1)
        if fixed_keep is not None:
            keep1 = fixed_keep[:, i1:i2].clone()
        elif nm is None:
            scores = _saliency(w1, diag, forced_prune, i1, i2)
            keep1 = _block_mask(scores, i1, i2, n_cols, sparsity)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for j in range(i2 - i1):
            if fixed_keep is None and nm is not None and j % nm[1] == 0:
                n, m = nm
                scores = _saliency(w1[:, j:j + m], diag[j:j + m], forced_prune, i1 + j, i1 + j + m)
                idx = torch.topk(scores, n, dim=1, largest=False).indices
                keep1[:, j:j + m].scatter_(1, idx, False)
            col = w1[:, j]
            q = col * keep1[:, j].to(dtype)
            e = (col - q) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w * keep.to(dtype), keep


def _saliency(w: torch.Tensor, diag: torch.Tensor, forced: torch.Tensor | None, i1: int, i2: int) -> torch.Tensor:
    scores = w**2 / diag.unsqueeze(0) ** 2
    if forced is not None:
        scores = scores.masked_fill(forced[:, i1:i2], float("-inf"))
    return scores


@register_pass
class SparseGPTPass(CompressionPass):
    name = "sparsegpt"
    Config = SparseGPTConfig
    base_needs = Needs(hessian=True, sequential=True)

    def compress_module(
        self, name: str, linear: nn.Linear, state: ModuleState, stats: InputStats | None
    ) -> tuple[None, ModuleReport]:
        if stats is None:
            raise RuntimeError("sparsegpt needs calibration statistics")
        cfg: SparseGPTConfig = self.config_for(name)  # type: ignore[assignment]
        original = linear.weight.data.clone()
        forced = None if state.mask is None else ~state.mask
        new, keep = sparsegpt_prune(original, stats.hessian.float(), cfg.sparsity, cfg.pattern, cfg.block_size,
                                    cfg.damp, forced_prune=forced, name=name)
        if state.mask is not None:
            keep &= state.mask
        return None, apply_mask(linear, keep, state, cfg.pattern, original, new)
