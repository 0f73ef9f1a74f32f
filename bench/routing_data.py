"""Synthetic GLUE-format data with real labels for the routing benchmark (no GLUE download here).

Real GLUE cannot be fetched on this machine, and the offline sst2-shaped file of docs/EVAL.md has
alternating labels that no model can predict, so routing on it would measure noise. These files
are generated from templates with labels that follow from the sentence:

* ``sst2`` (``sentence,label``): movie-review sentences; easy ones (one sentiment word), harder
  ones (negation, "X but Y" contrasts, intensifiers, mixed clauses).
* ``rte`` (``sentence1,sentence2,label``; 0 = entailment, 1 = not, as GLUE): a premise about
  people, places and objects; the hypothesis restates it, swaps a name, negates it or states a
  different fact.

``train`` and ``validation`` are drawn with different seeds and share no sentence. They are
*synthetic and small*: numbers on them show how routing behaves, not GLUE accuracy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "charming", "gripping", "heartfelt", "funny",
            "beautiful", "superb", "engaging", "clever", "touching", "thrilling", "memorable", "warm", "smart",
            "inventive", "lovely", "powerful"]
NEGATIVE = ["dull", "tedious", "boring", "clumsy", "lifeless", "awful", "bland", "incoherent", "pointless",
            "forgettable", "painful", "shallow", "messy", "lazy", "stale", "grating", "hollow", "sloppy", "flat",
            "tiresome"]
SUBJECTS = ["the film", "this movie", "the script", "the acting", "the director 's latest", "the soundtrack",
            "the plot", "the cast", "the ending", "the story", "the second half", "the dialogue"]
ADVERBS = ["very", "truly", "remarkably", "utterly", "often", "rather", "consistently", "surprisingly"]
NAMES = ["anna", "ben", "carla", "david", "elena", "farid", "grace", "hiro", "ines", "jonas", "kemal", "lucia"]
PLACES = [("paris", "france"), ("rome", "italy"), ("madrid", "spain"), ("berlin", "germany"), ("tokyo", "japan"),
          ("lima", "peru"), ("cairo", "egypt"), ("oslo", "norway"), ("dublin", "ireland"), ("lisbon", "portugal")]
OBJECTS = ["a red bicycle", "an old piano", "a small boat", "a blue car", "a wooden table", "a new laptop",
           "a black dog", "a large garden"]
JOBS = ["a doctor", "a teacher", "a pilot", "a chef", "an engineer", "a lawyer", "a farmer", "a nurse"]


def _sentiment(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    word, other = (good, bad) if label else (bad, good)
    subject = rng.choice(SUBJECTS)
    kind = rng.randrange(6)
    if kind == 0:
        text = f"{subject} is {word} ."
    elif kind == 1:
        text = f"{subject} is {rng.choice(ADVERBS)} {word} ."
    elif kind == 2:
        text = f"{subject} is not {other} ."
    elif kind == 3:
        text = f"{subject} is {other} at times , but ultimately {word} ."
    elif kind == 4:
        text = f"a {word} and {rng.choice(POSITIVE if label else NEGATIVE)} piece of work ."
    else:
        text = f"despite a {other} opening , {subject} turns out to be {word} ."
    return text, label


def _entailment(rng: random.Random) -> tuple[str, str, int]:
    name, other = rng.sample(NAMES, 2)
    kind = rng.randrange(3)
    if kind == 0:
        (city, country), (_, wrong) = rng.sample(PLACES, 2)
        premise = f"{name} has lived in {city} for many years ."
        options = [(f"{name} lives in {country} .", 0), (f"{name} lives in {wrong} .", 1),
                   (f"{other} lives in {country} .", 1), (f"{name} has never been to {city} .", 1)]
    elif kind == 1:
        thing = rng.choice(OBJECTS)
        premise = f"{name} bought {thing} last week and uses it every day ."
        options = [(f"{name} owns {thing} .", 0), (f"{other} owns {thing} .", 1),
                   (f"{name} does not own {thing} .", 1), (f"{name} uses {thing} .", 0)]
    else:
        job, wrong = rng.sample(JOBS, 2)
        premise = f"{name} works as {job} at the hospital near the station ."
        options = [(f"{name} is {job} .", 0), (f"{name} is {wrong} .", 1), (f"{name} has a job .", 0),
                   (f"{name} is unemployed .", 1)]
    hypothesis, label = rng.choice(options)
    return premise, hypothesis, label


def _rows(task: str, n: int, seed: int, exclude: set[str]) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        if task == "sst2":
            text, label = _sentiment(rng)
            row = {"sentence": text, "label": label}
        else:
            premise, hypothesis, label = _entailment(rng)
            text = f"{premise} || {hypothesis}"
            row = {"sentence1": premise, "sentence2": hypothesis, "label": label}
        if text not in seen:
            seen.add(text)
            rows.append(row)
    return rows


def _key(task: str, row: dict) -> str:
    return row["sentence"] if task == "sst2" else f"{row['sentence1']} || {row['sentence2']}"


def write_task_data(root: Path, task: str, n_train: int, n_validation: int, seed: int = 0) -> dict[str, int]:
    """``root/<task>/train.jsonl`` and ``validation.jsonl``; disjoint sentences; returns the sizes."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    train = _rows(task, n_train, seed, set())
    validation = _rows(task, n_validation, seed + 1, {_key(task, r) for r in train})
    for name, rows in (("train", train), ("validation", validation)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": len(train), "validation": len(validation)}
