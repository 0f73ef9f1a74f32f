"""Router calibration: the accuracy vs super-fraction curve against a brute-force reference, the
tau pick for a target, and the `route calibrate` -> `eval --router` round trip on tiny models."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

from llmcomp.errors import LlmcompError
from llmcomp.route_calibrate import (
    RESAMPLE_BATCH,
    Example,
    bootstrap_blocks,
    gap_bounds,
    lower_gaps,
    pick_point,
    pick_within,
    routing_curve,
)


def routing_curve_of(calibration: dict) -> list:
    from llmcomp.routing import CurvePoint

    return [CurvePoint(**p) for p in calibration["curve"]]


def examples(n: int, seed: int, ties: bool = False) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        e = float(rng.randrange(6)) if ties else rng.gauss(0.0, 3.0)
        out.append(Example("t", i, e, rng.random() < 0.5, rng.random() < 0.7, rng.uniform(0.1, 5.0),
                           rng.uniform(0.1, 4.0)))
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_curve_matches_brute_force_threshold_rule(ties):
    data = examples(57, seed=3, ties=ties)
    curve = routing_curve(data)
    n = len(data)
    swift_acc = sum(e.swift_correct for e in data) / n
    super_acc = sum(e.super_correct for e in data) / n
    assert len(curve) == len({e.energy for e in data}) + 1  # every reachable operating point, once
    for point in curve:
        deferred = [e.energy > point.tau for e in data]
        acc = sum(e.super_correct if d else e.swift_correct for e, d in zip(data, deferred, strict=True)) / n
        nll = sum(e.super_nll if d else e.swift_nll for e, d in zip(data, deferred, strict=True)) / n
        assert point.super_fraction == pytest.approx(sum(deferred) / n)
        assert point.acc == pytest.approx(acc)
        assert point.ppl == pytest.approx(math.exp(nll))
        f = point.super_fraction
        assert point.random_acc == pytest.approx((1 - f) * swift_acc + f * super_acc)
    assert (curve[0].super_fraction, curve[0].acc) == (0.0, pytest.approx(swift_acc))
    assert (curve[-1].super_fraction, curve[-1].acc) == (1.0, pytest.approx(super_acc))


def test_pick_point_for_targets():
    curve = routing_curve(examples(40, seed=5))
    point = pick_point(curve, super_fraction=0.3)
    assert point.super_fraction <= 0.3
    assert not [p for p in curve if point.super_fraction < p.super_fraction <= 0.3]
    target = curve[-1].acc - 0.05
    point = pick_point(curve, acc=target)
    assert point.acc >= target
    assert all(p.acc < target for p in curve if p.super_fraction < point.super_fraction)
    best = pick_point(curve, acc=2.0)  # unreachable: the most accurate point
    assert best.acc == max(p.acc for p in curve)
    with pytest.raises(LlmcompError):
        pick_point(curve)
    with pytest.raises(LlmcompError):
        pick_point(curve, super_fraction=1.5)


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_gaps_match_a_weighted_brute_force(ties):
    """Each resample's gap at each operating point equals applying that tau to the weighted examples."""
    data = examples(41, seed=8, ties=ties)
    curve = routing_curve(data)
    rng = random.Random(2)
    weights = [[rng.randrange(4) for _ in data] for _ in range(5)]
    gaps = gap_bounds(data, weights)
    for r, w in enumerate(weights):
        total = sum(w)
        for point in curve:
            routed = sum(wi * (e.super_correct if e.energy > point.tau else e.swift_correct)
                         for wi, e in zip(w, data, strict=True))
            super_ = sum(wi * e.super_correct for wi, e in zip(w, data, strict=True))
            k = round(point.super_fraction * len(data))
            assert gaps[r, k] == pytest.approx((routed - super_) / total)


def test_lower_gaps_are_a_block_bootstrap_quantile():
    """Against a naive loop over the same draws: blocks of consecutive positions share a weight."""
    import numpy as np

    data = [Example("text", 3 * i + 1, e.energy, e.swift_correct, e.super_correct) for i, e in
            enumerate(examples(60, seed=11))]
    assert bootstrap_blocks(data, 12) == [(3 * i + 1) // 12 for i in range(60)]
    assert bootstrap_blocks([Example("a", 0, 0.0, True, True), Example("b", 0, 0.0, True, True)], 1) == [0, 1]
    got = lower_gaps(data, 0.9, block=12, resamples=2 * RESAMPLE_BATCH, seed=5)
    rng = np.random.default_rng(5)
    blocks = [(3 * i + 1) // 12 for i in range(60)]
    count = max(blocks) + 1
    per_k = [[] for _ in range(61)]
    ranked = sorted(range(60), key=lambda i: -data[i].energy)
    for _ in range(2):
        for row in rng.multinomial(count, [1 / count] * count, size=RESAMPLE_BATCH):
            w = [row[b] for b in blocks]
            for k in range(61):
                deferred = set(ranked[:k])
                routed = sum(w[i] * (data[i].super_correct if i in deferred else data[i].swift_correct)
                             for i in range(60))
                per_k[k].append((routed - sum(w[i] * data[i].super_correct for i in range(60))) / sum(w))
    assert got == pytest.approx([float(np.quantile(v, 0.1)) for v in per_k])
    assert got == lower_gaps(data, 0.9, block=12, resamples=2 * RESAMPLE_BATCH, seed=5)  # reproducible
    with pytest.raises(LlmcompError):
        lower_gaps(data, 1.0)


def test_pick_within_a_drop_with_and_without_confidence():
    data = examples(200, seed=13)
    curve = routing_curve(data)
    drop = 0.03
    point = pick_within(curve, len(data), drop)
    assert point == pick_point(curve, acc=curve[-1].acc - drop)  # the curve's own estimate
    lower = lower_gaps(data, 0.95)
    safe = pick_within(curve, len(data), drop, lower)
    k = round(safe.super_fraction * len(data))
    assert lower[k] >= -drop
    assert all(lower[round(p.super_fraction * len(data))] < -drop for p in curve
               if p.super_fraction < safe.super_fraction)
    assert safe.super_fraction > point.super_fraction  # the bound asks for more super calls here
    assert pick_within(curve, len(data), drop, [-1.0] * (len(data) + 1)) == curve[-1]  # never within: all super


def test_calibrate_then_routed_eval_reproduces_the_curve(tmp_path, monkeypatch):
    """`route calibrate` on a split, then `eval --router` on the same rows: the routed acc and
    super fraction are the calibration curve's at the chosen tau (two independent code paths)."""
    from llmcomp.cli.main import app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, seed in (("swift", 0), ("super", 3)):
        tiny_llama(seed=seed, init_std=0.3).save_pretrained(tmp_path / name)
        byte_tokenizer().save_pretrained(tmp_path / name)
    words = ["the", "film", "was", "good", "bad", "plot", "not", "fun"]
    gen = torch.Generator().manual_seed(4)
    lengths = torch.randint(3, 10, (30,), generator=gen)
    rows = [{"sentence": " ".join(words[i] for i in torch.randint(0, 8, (int(n),), generator=gen).tolist()),
             "label": int(torch.randint(0, 2, (1,), generator=gen))} for n in lengths]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for split in ("train", "validation"):
        (tmp_path / "data" / "sst2").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "sst2" / f"{split}.jsonl").write_text(text)
    router = tmp_path / "router.json"
    runner = CliRunner()
    result = runner.invoke(app, ["route", "calibrate", "--swift", str(tmp_path / "swift"), "--super",
                                 str(tmp_path / "super"), "--tasks", "sst2", "--data-dir", str(tmp_path / "data"),
                                 "-o", str(router), "--plot", str(tmp_path / "curve.png"), "--target-fraction",
                                 "0.5", "--no-progress", "--slots", "4"])
    assert result.exit_code == 0, result.output
    config = json.loads(router.read_text())
    curve = config["calibration"]["curve"]
    chosen = next(p for p in curve if p["tau"] == config["tau"])
    assert 0.0 < chosen["super_fraction"] <= 0.5
    assert (tmp_path / "curve.png").stat().st_size > 1000
    # the default target: within --max-drop of super, at the bootstrap confidence (0: the estimate)
    picks = {}
    for confidence in ("0.95", "0"):
        path = tmp_path / f"router-{confidence}.json"
        result = runner.invoke(app, ["route", "calibrate", "--swift", str(tmp_path / "swift"), "--super",
                                     str(tmp_path / "super"), "--tasks", "sst2", "--data-dir", str(tmp_path / "data"),
                                     "-o", str(path), "--max-drop", "0.02", "--confidence", confidence,
                                     "--no-progress", "--slots", "4"])
        assert result.exit_code == 0, result.output
        picks[confidence] = json.loads(path.read_text())
    estimate = picks["0"]["calibration"]
    assert picks["0"]["tau"] == pick_within(routing_curve_of(estimate), estimate["examples"], 0.02).tau
    assert "confidence" in picks["0.95"]["calibration"]["target"] and "confidence" not in estimate["target"]
    fraction = {c: next(p["super_fraction"] for p in r["calibration"]["curve"] if p["tau"] == r["tau"])
                for c, r in picks.items()}
    assert fraction["0.95"] >= fraction["0"]
    out = tmp_path / "routed.json"
    result = runner.invoke(app, ["eval", "--router", str(router), "--tasks", "sst2", "--data-dir",
                                 str(tmp_path / "data"), "--no-progress", "--slots", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())["models"][0]["results"]["sst2"]
    assert got["acc"] == pytest.approx(chosen["acc"])
    assert got["super_fraction"] == pytest.approx(chosen["super_fraction"])
    assert got["samples"] == got["routed_examples"] == len(rows)
    # calibrating on the evaluation split is refused
    result = runner.invoke(app, ["route", "calibrate", "--swift", str(tmp_path / "swift"), "--super",
                                 str(tmp_path / "super"), "--data-dir", str(tmp_path / "data"), "--split",
                                 "validation"])
    assert result.exit_code == 2 and "evaluation split" in result.output
