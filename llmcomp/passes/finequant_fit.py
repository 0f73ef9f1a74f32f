"""Pure tensor functions behind the FineQuant pass: scale/zero fitting and the granularity ladder.

Why a fit instead of min/max: min/max round-to-nearest spends the grid on each group's two extreme
values. Alternating least squares (quantize with the current grid, then refit the grid to the
quantized codes) keeps the outliers representable but places the grid where most weights are. In
plain weight MSE that lowers the int4 error by 4-6% but hardly moves perplexity. Weighted by each
input channel's energy (``column_weight = E[x_j^2]`` from calibration) it fits what the layer's
output sees: on SmolLM2 int4 g128 perplexity goes from 27.8 (RTN) to 24.2 (bf16: 21.7).

All functions take a weight ``[N, K]`` and follow :mod:`llmcomp.intquant` conventions: signed codes
``q``, ``w = (q - z) * s``, integer zero points in the code range, groups along K with a short last
group when the group size does not divide K. Scales are rounded to the storage dtype *inside* the
fit, so the codes are chosen for the scale that will really be stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmcomp import intquant

DEFAULT_FIT_ITERS = 8
_TINY = 1e-12


@dataclass
class _Groups:
    """A weight viewed as ``[N, groups, group_size]``.

    ``weight`` (``[1, groups, group_size]`` or None for all ones) is the importance of each input
    column in the least-squares fit: 0 on the zero padding of a short last group, ``E[x_j^2]``
    when the fit is activation-aware.
    """

    w: torch.Tensor
    weight: torch.Tensor | None
    in_features: int
    group_size: int

    def weighted(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.weight is None else t * self.weight

    def total_weight(self) -> torch.Tensor:
        if self.weight is None:
            return torch.full(self.w.shape[:2], float(self.group_size))
        return self.weight.sum(-1).expand(self.w.shape[:2])


# Every column keeps at least this share of the mean importance, so channels the calibration
# text never excites are still fitted (and a group of them has a well-defined scale).
_MIN_RELATIVE_IMPORTANCE = 1e-3


def _group(w: torch.Tensor, group_size: int, column_weight: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> _Groups:
    """``mask`` (bool ``[N, K]``, True = kept) gives pruned weights no say in the fit."""
    n, k = w.shape
    g = intquant.effective_group_size(group_size, k)
    groups = math.ceil(k / g)
    pad = groups * g - k
    wf = w.detach().float()
    weight = None
    if column_weight is not None:
        c = column_weight.detach().double().reshape(-1)
        c = c / c.mean().clamp_min(_TINY)
        weight = c.clamp_min(_MIN_RELATIVE_IMPORTANCE).float().reshape(1, k)
    if mask is not None:
        weight = (torch.ones(1, k) if weight is None else weight) * mask.float()
    rows = 1 if weight is None else weight.shape[0]
    if pad:
        wf = torch.cat([wf, wf.new_zeros(n, pad)], dim=1)
        weight = torch.ones(1, k) if weight is None else weight
        weight = torch.cat([weight, torch.zeros(rows, pad)], dim=1)
    if weight is not None:
        weight = weight.reshape(rows, groups, g)
    return _Groups(wf.reshape(n, groups, g), weight, k, g)


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round to what will be stored; a scale that underflows to 0 becomes the smallest positive."""
    s = scale.to(scale_dtype).float()
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(scale_dtype).tiny))


def _codes(gr: _Groups, s: torch.Tensor, z: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``clamp(round(w / s) + z)``, exactly as :func:`llmcomp.intquant.quantize_with` does."""
    qmin, qmax = intquant.qrange(bits)
    q = torch.round(gr.w / s.unsqueeze(-1))
    if z is not None:
        q.add_(z.unsqueeze(-1))
    return q.clamp_(qmin, qmax)


def _group_sq_error(gr: _Groups, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """Weighted squared reconstruction error per group, ``[N, groups]``, for codes ``q``."""
    deq = q - z.unsqueeze(-1) if z is not None else q.clone()
    deq.mul_(s.unsqueeze(-1)).sub_(gr.w)
    return gr.weighted(deq * deq).sum(-1)


def _minmax_init(gr: _Groups, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    qmin, qmax = intquant.qrange(bits)
    if symmetric:
        s = gr.w.abs().amax(-1) / qmax
        return torch.where(s > 0, s, torch.ones_like(s)), None
    # The grid always contains 0 (integer zero point inside the code range), hence the clamps;
    # they also make the zero padding of a short last group harmless.
    wmin = gr.w.amin(-1).clamp(max=0.0)
    wmax = gr.w.amax(-1).clamp(min=0.0)
    s = (wmax - wmin) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(qmin - wmin / s).clamp(qmin, qmax)
    return s, z


def _refit_symmetric(gr: _Groups, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares scale for fixed codes: ``s = <w, q>_c / <q, q>_c``."""
    qc = gr.weighted(q)
    den = (qc * q).sum(-1)
    new = (gr.w * qc).sum(-1) / den.clamp_min(_TINY)
    return torch.where((den > 0) & (new > 0), new, s)


def _refit_asymmetric(
    gr: _Groups, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares line ``w ~ a q + b`` for fixed codes, then integer ``z = -b/a`` and
    refit ``s``."""
    qmin, qmax = intquant.qrange(bits)
    cnt = gr.total_weight()
    qm = gr.weighted(q)
    sq, sw = qm.sum(-1), gr.weighted(gr.w).sum(-1)
    sqq, sqw = (qm * q).sum(-1), (qm * gr.w).sum(-1)
    var = sqq - sq * sq / cnt
    a = (sqw - sq * sw / cnt) / var.clamp_min(_TINY)
    ok = (var > _TINY) & (a > 0)
    a_safe = torch.where(ok, a, s)
    b = (sw - a_safe * sq) / cnt
    z_new = torch.round(-b / a_safe).clamp(qmin, qmax)
    # s for the integer zero point: <w, q - z> / ||q - z||^2, from the same sums.
    num = sqw - z_new * sw
    den = sqq - 2 * z_new * sq + z_new * z_new * cnt
    s_new = num / den.clamp_min(_TINY)
    ok = ok & (den > _TINY) & (s_new > 0)
    return torch.where(ok, s_new, s), torch.where(ok, z_new, z)


def fit_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    iters: int = DEFAULT_FIT_ITERS,
    scale_dtype: torch.dtype = torch.float32,
    column_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> intquant.QuantizedWeight:
    """Quantize ``w`` with per-group scales (and zero points) fitted by alternating least squares.

    Starts from min/max round-to-nearest and keeps, per group, the best grid seen, so the result
    is never worse than RTN in the fitted error (weight MSE with the stored scale dtype, or with
    ``column_weight`` the activation-weighted error ``sum_j c_j (W - W')_ij^2``, which is the
    expected output error for uncorrelated inputs with ``c_j = E[x_j^2]``). ``iters=0`` is plain RTN.

    ``mask`` (bool ``[N, K]``, True = kept; pruned weights must be 0 in ``w``) leaves pruned weights
    out of the fit, and their codes are set to the zero point so they dequantize to exactly 0.
    """
    gr = _group(w, group_size, column_weight, mask)
    s, z = _minmax_init(gr, bits, symmetric)
    s = _round_scale(s, scale_dtype)
    best_s, best_z, best_err = s, z, None
    for step in range(iters + 1):
        q = _codes(gr, s, z, bits)
        err = _group_sq_error(gr, q, s, z)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
        if step == iters:
            break
        if symmetric:
            s = _round_scale(_refit_symmetric(gr, q, s), scale_dtype)
        else:
            s, z = _refit_asymmetric(gr, q, s, z, bits)
            s = _round_scale(s, scale_dtype)
    qw = intquant.quantize_with(w, best_s, best_z, bits, gr.group_size)
    return qw if mask is None else intquant.apply_mask(qw, mask)


def relative_error(w: torch.Tensor, approx: torch.Tensor, column_weight: torch.Tensor | None = None) -> float:
    """``||W - W'|| / ||W||`` (Frobenius), optionally weighting input channel j by ``column_weight[j]``.

    With ``column_weight = E[x_j^2]`` this is the expected relative output error of the layer
    when input channels are uncorrelated (a cheap activation-aware sensitivity).
    """
    diff = (w.double() - approx.double()) ** 2
    ref = w.double() ** 2
    if column_weight is not None:
        c = column_weight.double().reshape(1, -1)
        diff, ref = diff * c, ref * c
    return float(diff.sum().sqrt() / ref.sum().sqrt().clamp_min(_TINY))


def group_ladder(in_features: int, floor: int, divisible_only: bool = False) -> list[int]:
    """Candidate group sizes, coarsest first: per-channel (``K``), then the powers of two from
    ``K / 2`` (rounded down) halving to ``floor``. Powers of two keep the int4 kernels usable; the
    first step is at least a halving so a greedy walk never stalls on a near-identical rung.
    ``divisible_only`` keeps only sizes dividing K (no short last group: exportable to
    compressed-tensors)."""
    ladder = [in_features]
    half = in_features // 2
    if half < max(floor, 1):
        return ladder
    g = 1 << (half.bit_length() - 1)  # largest power of two <= K / 2
    while g >= max(floor, 1):
        if not divisible_only or in_features % g == 0:
            ladder.append(g)
        g //= 2
    return ladder


def meta_bits_per_weight(in_features: int, group_size: int, asymmetric: bool, scale_bits: int) -> float:
    """Bits of scales (and zero points) per weight: what a finer grid costs."""
    groups = intquant.num_groups(in_features, group_size)
    return groups * (scale_bits + (8 if asymmetric else 0)) / in_features


def walk_ladder(
    ladder: list[int],
    error_at: Callable[[int], float],
    in_features: int,
    asymmetric: bool,
    scale_bits: int,
    threshold: float,
    target_error: float = 0.0,
) -> int:
    """The granularity choice: walk ``ladder`` (coarsest first) while the next rung is
    :func:`worth_refining` and the error is still above ``target_error``; return the rung reached.

    ``error_at(group)`` gives a rung's relative error; it is called in walk order, at most once per
    rung visited, so it may fit lazily (the pass) or look recorded errors up (what-if tools).
    """
    current = ladder[0]
    err_current = error_at(current)
    for finer in ladder[1:]:
        if err_current <= target_error:
            break
        err_finer = error_at(finer)
        extra = meta_bits_per_weight(in_features, finer, asymmetric, scale_bits) - meta_bits_per_weight(
            in_features, current, asymmetric, scale_bits
        )
        if not worth_refining(err_current, err_finer, extra, threshold):
            break
        current, err_current = finer, err_finer
    return current


def worth_refining(
    err_coarse: float, err_fine: float, extra_bits: float, threshold: float
) -> bool:
    """Rate-distortion test for one step down the ladder.

    Refine when the relative squared error drops by more than ``threshold`` per extra stored bit
    per weight: ``(err_coarse**2 - err_fine**2) / extra_bits > threshold``. One global price per
    bit (a Lagrange multiplier) spends scale bits where they remove the most error, so the same
    threshold keeps int8 per-channel (its errors are tiny), refines int4 moderately and int3 hard.
    ``threshold = 0`` refines whenever the error drops at all.
    """
    gain = err_coarse**2 - err_fine**2
    if extra_bits <= 0.0:
        return gain > 0.0
    return gain / extra_bits > threshold
