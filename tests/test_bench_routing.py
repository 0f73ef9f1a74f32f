"""bench/routing.py: the routed-minus-random gain and its clustered standard error."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from bench_modules import load_bench

from llmcomp.route_calibrate import Example


@pytest.fixture(scope="module")
def routing_bench():
    return load_bench("routing")


def examples(n: int, seed: int) -> tuple[list[Example], list[bool]]:
    rng = random.Random(seed)
    report = [Example("t", i, rng.gauss(0, 1), rng.random() < 0.5, rng.random() < 0.6) for i in range(n)]
    return report, [rng.random() < 0.3 for _ in range(n)]


def test_gain_is_routed_accuracy_minus_the_random_expectation(routing_bench):
    report, deferred = examples(400, seed=0)
    f = sum(deferred) / len(report)
    routed = statistics.fmean(e.super_correct if d else e.swift_correct for e, d in zip(report, deferred, strict=True))
    swift = statistics.fmean(e.swift_correct for e in report)
    super_ = statistics.fmean(e.super_correct for e in report)
    gain, se = routing_bench.gain_over_random(report, deferred, block=1)
    assert gain == pytest.approx(routed - ((1 - f) * swift + f * super_), abs=1e-12)
    terms = [(d - f) * (e.super_correct - e.swift_correct) for e, d in zip(report, deferred, strict=True)]
    assert se == pytest.approx(statistics.pstdev(terms) / math.sqrt(len(terms)), rel=1e-9)


def test_blocks_add_the_correlation_of_neighbours(routing_bench):
    """Repeating every example 8 times: with blocks of 8 the error is that of the distinct examples."""
    report, deferred = examples(120, seed=1)
    _, se_distinct = routing_bench.gain_over_random(report, deferred, block=1)
    repeated = [e for e in report for _ in range(8)]
    rep_deferred = [d for d in deferred for _ in range(8)]
    _, se_naive = routing_bench.gain_over_random(repeated, rep_deferred, block=1)
    _, se_blocked = routing_bench.gain_over_random(repeated, rep_deferred, block=8)
    assert se_blocked == pytest.approx(se_distinct, rel=1e-9)
    assert se_naive < se_blocked / 2
