"""Sparsity criteria, the SparseGPT update and the DSnoT swap against naive float64 references."""

from __future__ import annotations

import pytest
import torch

from llmcomp.calibration import InputStats
from llmcomp.passes.base import ModuleState
from llmcomp.passes.dsnot import DSnoTConfig, DSnoTPass, dsnot_refine
from llmcomp.passes.magnitude import MagnitudeConfig, MagnitudePass
from llmcomp.passes.sparsegpt import SparseGPTConfig, SparseGPTPass, sparsegpt_prune
from llmcomp.passes.sparsity_masks import holds_pattern, prune_mask
from llmcomp.passes.wanda import wanda_scores


def _data(rows: int, cols: int, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated, non-centred inputs (LLM activations have a mean and outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5 + torch.eye(cols, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    x = x * (1 + 3 * torch.rand(cols, generator=g, dtype=torch.float64)) + torch.randn(cols, generator=g,
                                                                                        dtype=torch.float64)
    return w, x


def _naive_keep(scores: torch.Tensor, prune: int, block: int | None = None) -> torch.Tensor:
    """Per row (or per block of ``block`` columns) drop the ``prune`` lowest scores, by sorting in Python."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    width = block or scores.shape[1]
    for i in range(scores.shape[0]):
        for b in range(0, scores.shape[1], width):
            vals = [(float(scores[i, j]), j) for j in range(b, b + width)]
            for _, j in sorted(vals)[:prune]:
                keep[i, j] = False
    return keep


# -- criteria -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,prune,block", [("unstructured", 14, None), ("2:4", 2, 4), ("4:8", 4, 8)])
def test_magnitude_pass_matches_naive_sort(pattern, prune, block):
    w, _ = _data(6, 24)
    linear = torch.nn.Linear(24, 6, bias=False).double()
    linear.weight.data.copy_(w)
    state = ModuleState("m", (6, 24))
    p = MagnitudePass(MagnitudeConfig(sparsity=0.6, pattern=pattern))
    _, report = p.compress_module("m", linear, state, None)
    expected = _naive_keep(w.abs(), prune, block)
    assert torch.equal(state.mask, expected)
    assert torch.equal(linear.weight.data, w * expected)
    assert report["sparsity"] == pytest.approx(prune / (block or 24))
    assert holds_pattern(state.mask, pattern)


def test_wanda_criterion_matches_naive_formula():
    w, x = _data(5, 16)
    scores = wanda_scores(w, (x**2).sum(0))
    naive = torch.tensor([[abs(float(w[i, j])) * float(x[:, j].norm()) for j in range(16)] for i in range(5)])
    torch.testing.assert_close(scores.double(), naive.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(prune_mask(naive, 0.5, "unstructured"), _naive_keep(naive, 8))


# -- SparseGPT ------------------------------------------------------------------------------------
def _ref_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, pattern: str, block: int, damp: float):
    """Column-by-column OBS with explicit inverses of the remaining Hessian (no Cholesky, no batching)."""
    w, h = w.double().clone(), h.double().clone()
    n_rows, n = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    inv_tail = [torch.linalg.inv(h[j:, j:]) for j in range(n)]  # H_F^-1 once columns < j are fixed
    keep = torch.ones(n_rows, n, dtype=torch.bool)
    total = int(n * sparsity)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    for j in range(n):
        if nm is None and j % block == 0:
            stop = min(j + block, n)
            share = round(total * stop / n) - round(total * j / n)
            scores = torch.stack([w[:, c] ** 2 / inv_tail[c][0, 0] for c in range(j, stop)], 1)
            keep[:, j:stop] = _naive_keep(scores, share)
        if nm is not None and j % nm[1] == 0:
            scores = torch.stack([w[:, c] ** 2 / inv_tail[c][0, 0] for c in range(j, j + nm[1])], 1)
            keep[:, j:j + nm[1]] = _naive_keep(scores, nm[0])
        hinv = inv_tail[j]
        err = w[:, j] * (~keep[:, j]).double()
        w[:, j:] -= (err / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
    return w * keep, keep


@pytest.mark.parametrize("pattern,block", [("unstructured", 8), ("unstructured", 128), ("2:4", 8), ("4:8", 16)])
def test_sparsegpt_matches_naive_obs(pattern, block):
    w, x = _data(7, 32, seed=1)
    x[:, 5] = 0.0  # a dead input channel
    h = 2.0 / x.shape[0] * x.T @ x
    got_w, got_keep = sparsegpt_prune(w, h, 0.6, pattern, block, 0.01)
    ref_w, ref_keep = _ref_sparsegpt(w, h, 0.6, pattern, block, 0.01)
    assert torch.equal(got_keep, ref_keep)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-9, atol=1e-9)
    assert holds_pattern(got_keep, pattern)
    if pattern == "unstructured":
        assert (got_keep.sum(1) == 32 - int(32 * 0.6)).all()  # exact per-row count


def test_sparsegpt_compensation_beats_plain_masking():
    """The OBS update lowers the output error X (W - W') against zeroing the same mask."""
    w, x = _data(16, 48, tokens=512, seed=2)
    h = 2.0 / x.shape[0] * x.T @ x
    new, keep = sparsegpt_prune(w, h, 0.5)
    err_obs = (x @ (w - new).T).norm()
    err_mask = (x @ (w - w * keep).T).norm()
    assert err_obs < 0.9 * err_mask


def test_sparsegpt_fixed_mask_and_float32_pass():
    w, x = _data(8, 32, seed=3)
    h = 2.0 / x.shape[0] * x.T @ x
    _, keep = sparsegpt_prune(w, h, 0.5, "2:4")
    again, keep2 = sparsegpt_prune(w, h, 0.5, "unstructured", fixed_keep=keep)
    assert torch.equal(keep, keep2)
    ref, _ = sparsegpt_prune(w, h, 0.5, "2:4")
    torch.testing.assert_close(again, ref)
    # The pass: float32, stats from InputStats, in place on an nn.Linear.
    stats = InputStats(32, with_hessian=True)
    stats.update(x.float())
    linear = torch.nn.Linear(32, 8, bias=False)
    linear.weight.data.copy_(w.float())
    state = ModuleState("m", (8, 32))
    _, report = SparseGPTPass(SparseGPTConfig(sparsity=0.5, pattern="2:4")).compress_module("m", linear, state, stats)
    assert torch.equal(state.mask, keep) and report["sparsity"] == 0.5
    torch.testing.assert_close(linear.weight.data.double(), ref, rtol=1e-3, atol=1e-4)


def test_sparsegpt_zero_hessian_is_a_clear_error():
    from llmcomp.errors import LlmcompError

    with pytest.raises(LlmcompError, match="layers.0.q_proj"):
        sparsegpt_prune(torch.ones(2, 4), torch.zeros(4, 4), 0.5, name="layers.0.q_proj")


# -- DSnoT ----------------------------------------------------------------------------------------
def _ref_dsnot(w, keep, mean, var, sq, pattern, cycles, threshold, power, sign_rule, offset=None):
    """The swap rule row by row, in plain Python floats (``offset``: error the kept weights carry)."""
    n_rows, n = w.shape
    keep = keep.clone()
    m = None if pattern == "unstructured" else int(pattern.split(":")[1])
    for i in range(n_rows):
        c = [float(w[i, j]) * float(mean[j]) for j in range(n)]
        grow = [c[j] / max(float(var[j]), 1e-12) ** power for j in range(n)]
        wanda = [abs(float(w[i, j])) * float(sq[j]) ** 0.5 for j in range(n)]
        eps = sum(c[j] for j in range(n) if not keep[i, j]) + (0.0 if offset is None else float(offset[i]))
        sign0 = (eps > 0) - (eps < 0)
        if abs(eps) <= threshold:
            continue
        for _ in range(cycles):
            s = (eps > 0) - (eps < 0)
            pruned = [j for j in range(n) if not keep[i, j]]
            if not pruned:
                break
            g = max(pruned, key=lambda j: (s * grow[j], -j))
            after = eps - c[g]
            cands = [k for k in range(n) if keep[i, k] and (m is None or k // m == g // m)
                     and (not sign_rule or abs(after + c[k]) < abs(after))]
            if not cands:
                break
            k = min(cands, key=lambda j: (wanda[j], j))
            keep[i, g], keep[i, k] = True, False
            eps = after + c[k]
            if not (abs(eps) > threshold and ((eps > 0) - (eps < 0)) == sign0):
                break
    return keep


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("sign_rule", [True, False])
def test_dsnot_swaps_match_naive_rows(pattern, sign_rule):
    w, x = _data(12, 32, seed=4)
    mean, var, sq = x.mean(0), x.var(0, unbiased=False), (x**2).sum(0)
    keep = prune_mask(wanda_scores(w, sq).double(), 0.6, pattern)
    got, summary = dsnot_refine(w, keep, mean, var, sq, pattern, 20, 1e-3, 1.0, sign_rule)
    ref = _ref_dsnot(w, keep, mean, var, sq, pattern, 20, 1e-3, 1.0, sign_rule)
    assert torch.equal(got, ref)
    assert not torch.equal(got, keep)  # it did swap something
    assert torch.equal(got.sum(1), keep.sum(1))  # per-row sparsity never changes
    assert holds_pattern(got, pattern)
    if sign_rule:
        assert summary["dsnot_eps_after"] < summary["dsnot_eps_before"]


def test_dsnot_pass_lowers_expected_error_and_keeps_earlier_zeros():
    w, x = _data(10, 24, tokens=400, seed=5)
    stats = InputStats(24)
    stats.update(x.float())
    linear = torch.nn.Linear(24, 10, bias=False)
    linear.weight.data.copy_(w.float())
    state = ModuleState("m", (10, 24))
    state.mask = torch.ones(10, 24, dtype=torch.bool)
    state.mask[:, 3] = False  # an earlier pass removed input 3
    cfg = DSnoTConfig(sparsity=0.5, initial="wanda", threshold=0.0)
    _, report = DSnoTPass(cfg).compress_module("m", linear, state, stats)
    assert not state.mask[:, 3].any() and (linear.weight.data[:, 3] == 0).all()
    assert (state.mask.sum(1) == 12).all()
    assert report["dsnot_eps_after"] < report["dsnot_eps_before"] and report["dsnot_swaps"] > 0
    pruned = ~state.mask
    torch.testing.assert_close(linear.weight.data[state.mask], w.float()[state.mask])
    assert (linear.weight.data[pruned] == 0).all()


def test_dsnot_on_sparsegpt_compensates_the_refined_mask():
    w, x = _data(8, 32, tokens=300, seed=6)
    stats = InputStats(32, with_hessian=True)
    stats.update(x.float())
    linear = torch.nn.Linear(32, 8, bias=False)
    linear.weight.data.copy_(w.float())
    state = ModuleState("m", (8, 32))
    p = DSnoTPass(DSnoTConfig(sparsity=0.5, pattern="2:4", initial="sparsegpt", threshold=0.0))
    assert p.needs().hessian and p.needs().sequential
    p.compress_module("m", linear, state, stats)
    expected, _ = sparsegpt_prune(w.float(), stats.hessian.float(), 0.5, "2:4", fixed_keep=state.mask)
    torch.testing.assert_close(linear.weight.data, expected)
    assert holds_pattern(state.mask, "2:4")


def _naive_output_error(dense: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> list[float]:
    """Per row: mean over tokens of the squared output difference, summed token by token in float64."""
    delta = (dense - weight).double()
    return [sum(float(delta[i] @ x[t]) ** 2 for t in range(x.shape[0])) / x.shape[0] for i in range(delta.shape[0])]


@pytest.mark.parametrize("reference", ["pruned", "compensated"])
def test_guarded_dsnot_on_sparsegpt_matches_naive_reference(reference):
    """Guard: per row the lower output error of SparseGPT and DSnoT + OBS, by a naive float64 count."""
    w, x = _data(16, 32, tokens=120, seed=8)
    stats = InputStats(32, with_hessian=True)
    stats.update(x.float())
    linear = torch.nn.Linear(32, 16, bias=False)
    linear.weight.data.copy_(w.float())
    state = ModuleState("m", (16, 32))
    cfg = DSnoTConfig(sparsity=0.6, initial="sparsegpt", threshold=0.0, max_cycles=20, guard=True,
                      error_reference=reference)
    _, report = DSnoTPass(cfg).compress_module("m", linear, state, stats)
    # Independent reference: the same steps, eps offset and guard computed naively.
    wf, h = w.float(), stats.hessian.float()
    w_sg, keep = sparsegpt_prune(wf, h, 0.6)
    mean, var, sq = stats.mean, stats.var, stats.sq_norm
    score_w, offset = wf, None
    if reference == "compensated":
        score_w = torch.where(keep, w_sg, wf)
        offset = [sum((float(wf[i, j]) - float(w_sg[i, j])) * float(mean[j]) for j in range(32) if keep[i, j])
                  for i in range(16)]
    refined = _ref_dsnot(score_w.double(), keep, mean, var, sq, "unstructured", 20, 0.0, 1.0, True, offset)
    w_ds, _ = sparsegpt_prune(wf, h, 0.6, fixed_keep=refined)
    e_sg, e_ds = _naive_output_error(w, w_sg, x), _naive_output_error(w, w_ds, x)
    worse = torch.tensor([b > a for a, b in zip(e_sg, e_ds, strict=True)])
    assert 0 < int(worse.sum()) < 16  # the guard decides both ways on this data
    assert report["dsnot_guarded_rows"] == pytest.approx(float(worse.float().mean()))
    assert torch.equal(state.mask, torch.where(worse.unsqueeze(1), keep, refined))
    expected = torch.where(worse.unsqueeze(1), w_sg, w_ds)
    torch.testing.assert_close(linear.weight.data, expected)
    got = _naive_output_error(w, linear.weight.data, x)
    assert all(g <= s * (1 + 1e-5) for g, s in zip(got, e_sg, strict=True))  # never worse than SparseGPT, row by row
    assert sum(got) < sum(e_sg)


def test_dsnot_offset_matches_naive_rows():
    w, x = _data(10, 32, seed=9)
    mean, var, sq = x.mean(0), x.var(0, unbiased=False), (x**2).sum(0)
    keep = prune_mask(wanda_scores(w, sq).double(), 0.5, "unstructured")
    offset = torch.randn(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    got, _ = dsnot_refine(w, keep, mean, var, sq, "unstructured", 20, 1e-3, 1.0, True, offset=offset)
    ref = _ref_dsnot(w, keep, mean, var, sq, "unstructured", 20, 1e-3, 1.0, True, offset)
    assert torch.equal(got, ref)
    assert not torch.equal(got, dsnot_refine(w, keep, mean, var, sq, "unstructured", 20, 1e-3, 1.0, True)[0])


def test_guard_options_need_sparsegpt():
    with pytest.raises(ValueError):
        DSnoTConfig(initial="wanda", guard=True)
    with pytest.raises(ValueError):
        DSnoTConfig(initial="sparsegpt", guard=True, compensate=False)
