"""GLUE through lm-eval on local fixture files, checked against a hand-computed log-likelihood choice.

The reference re-implements lm-eval's multiple-choice scoring independently: prompt text written
out from the GLUE task definitions, continuation " <choice>", summed float64 log-probabilities of
the continuation tokens, argmax over choices; metrics from scikit-learn.
"""

from __future__ import annotations

import copy
import json
import math
import re
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tiny_models import byte_tokenizer, tiny_llama

from llmcomp.errors import LlmcompError
from llmcomp.eval.harness import build_hf_lm, build_runtime_lm, local_task_config, run_harness, task_manager
from llmcomp.eval.tasks import TASKS

ROWS = 12
MODEL_SEED = 0
# A default-initialised (std 0.02) random model answers every prompt the same way (they all end in
# "Answer:"), which would make accuracy just the label balance; larger weights make it prompt-dependent.
MODEL_INIT_STD = 0.3
WORDS = ["the", "film", "was", "quite", "good", "bad", "plot", "actors", "boring", "fun", "not", "very"]

# Prompt templates and choices as lm-eval's GLUE task configs define them.
PROMPTS = {
    "sst2": (lambda d: f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
             ["negative", "positive"]),
    "mrpc": (lambda d: f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\n"
                       "Question: Do both sentences mean the same thing?\nAnswer:", ["no", "yes"]),
    "cola": (lambda d: f"{d['sentence']}\nQuestion: Does this sentence make sense?\nAnswer:", ["no", "yes"]),
    "rte": (lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
            ["True", "False"]),
}


def sentence(gen: torch.Generator) -> str:
    n = int(torch.randint(3, 9, (1,), generator=gen))
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=gen).tolist()) + "."


def make_rows(task: str, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for idx in range(ROWS):
        label = int(torch.randint(0, 2, (1,), generator=gen))
        if task in ("sst2", "cola"):
            rows.append({"sentence": sentence(gen), "label": label, "idx": idx})
        else:
            rows.append({"sentence1": sentence(gen), "sentence2": sentence(gen), "label": label, "idx": idx})
    return rows


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """sst2/mrpc as jsonl, cola in the hub's parquet shard layout, rte as GLUE-style tsv."""
    root = tmp_path_factory.mktemp("glue")
    data = {task: make_rows(task, seed) for seed, task in enumerate(PROMPTS, start=11)}
    for task in ("sst2", "mrpc"):
        (root / task).mkdir()
        (root / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[task]))
    (root / "cola").mkdir()
    pq.write_table(pa.Table.from_pylist(data["cola"]), root / "cola" / "validation-00000-of-00001.parquet")
    (root / "rte").mkdir()
    lines = ["idx\tsentence1\tsentence2\tlabel"] + [
        f"{r['idx']}\t{r['sentence1']}\t{r['sentence2']}\t{r['label']}" for r in data["rte"]
    ]
    (root / "rte" / "validation.tsv").write_text("\n".join(lines) + "\n")
    gen = torch.Generator().manual_seed(5)
    data["wikitext"] = [{"page": " ".join(sentence(gen) for _ in range(n))} for n in (3, 6, 9)]
    (root / "wikitext").mkdir()
    (root / "wikitext" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data["wikitext"]))
    return root, data


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=MODEL_SEED, init_std=MODEL_INIT_STD), byte_tokenizer()


def reference_predictions(model, tokenizer, task: str, rows: list[dict]) -> list[int]:
    model64 = copy.deepcopy(model).double()
    to_text, choices = PROMPTS[task]
    preds = []
    for row in rows:
        context = tokenizer(to_text(row))["input_ids"]
        scores = []
        for choice in choices:
            cont = tokenizer(" " + choice)["input_ids"]
            with torch.no_grad():
                logits = model64(input_ids=torch.tensor([context + cont[:-1]])).logits[0]
            logp = torch.log_softmax(logits, dim=-1)
            scores.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cont)))
        assert abs(scores[0] - scores[1]) > 1e-3, "near-tie: float32 vs float64 could disagree"
        preds.append(max(range(len(choices)), key=lambda i: scores[i]))
    return preds


@pytest.fixture(scope="module", params=["hf", "runtime"])
def harness_results(request, glue_dir, tiny):
    """One lm-eval run over all tasks per engine (lm-eval's HFLM, llmcomp's runtime), with every
    socket connection attempt recorded and refused."""
    root, _ = glue_dir
    model, tokenizer = tiny
    build = build_hf_lm if request.param == "hf" else build_runtime_lm
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    specs = [TASKS[t] for t in (*PROMPTS, "wikitext")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        results = run_harness(build(model, tokenizer, 4), specs, data_dir=root)
    return results, attempts


def test_no_network_calls(harness_results):
    _, attempts = harness_results
    assert attempts == []


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_accuracy_matches_hand_computed_choice(harness_results, glue_dir, tiny, task):
    results, _ = harness_results
    _, data = glue_dir
    preds = reference_predictions(*tiny, task, data[task])
    labels = [r["label"] for r in data[task]]
    assert len(set(preds)) == 2, "degenerate fixture: the model always picks one answer"
    assert results[task]["samples"] == ROWS
    assert results[task]["acc"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)


def test_mrpc_acc_and_f1_match_sklearn(harness_results, glue_dir, tiny):
    results, _ = harness_results
    _, data = glue_dir
    preds = reference_predictions(*tiny, "mrpc", data["mrpc"])
    labels = [r["label"] for r in data["mrpc"]]
    assert results["mrpc"]["acc"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert results["mrpc"]["f1"] == pytest.approx(f1_score(labels, preds), abs=1e-12)


def test_cola_mcc_matches_sklearn(harness_results, glue_dir, tiny):
    results, _ = harness_results
    _, data = glue_dir
    preds = reference_predictions(*tiny, "cola", data["cola"])
    labels = [r["label"] for r in data["cola"]]
    assert results["cola"]["mcc"] == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)


def test_lm_eval_wikitext_is_rolling_loglikelihood_per_document(harness_results, glue_dir, tiny):
    """lm-eval's wikitext: each page scored from an EOS prefix; word/byte perplexity over all pages."""
    results, _ = harness_results
    model, tokenizer = tiny
    model64 = copy.deepcopy(model).double()
    total_ll = total_words = total_bytes = 0
    for row in glue_dir[1]["wikitext"]:
        page = row["page"]
        ids = [tokenizer.eos_token_id] + tokenizer(page)["input_ids"]
        assert len(ids) < 512  # one window: no rolling split to reproduce
        with torch.no_grad():
            logp = torch.log_softmax(model64(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        total_ll += sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        total_words += len(re.split(r"\s+", page))
        total_bytes += len(page.encode("utf-8"))
    got = results["wikitext"]
    assert got["samples"] == 3
    assert got["word_perplexity"] == pytest.approx(math.exp(-total_ll / total_words), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-total_ll / total_bytes), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-4)


def test_local_config_points_at_files(glue_dir):
    root, _ = glue_dir
    cfg = local_task_config(task_manager(), TASKS["rte"], root)
    assert cfg["dataset_path"] == "csv" and cfg["dataset_name"] is None
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": [str(root / "rte" / "validation.tsv")]}
    assert cfg["dataset_kwargs"]["delimiter"] == "\t"
    assert cfg["validation_split"] == "validation" and cfg["training_split"] is None
    assert cfg["doc_to_choice"] == ["True", "False"]  # the rest is lm-eval's own task definition


def test_missing_local_file_names_expected_layout(tmp_path, tiny):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(LlmcompError, match=r"no local data for task qnli: expected .*qnli/validation\.jsonl"):
        run_harness(build_hf_lm(*tiny, batch_size=1), [TASKS["qnli"]], data_dir=tmp_path)


def test_missing_columns_are_named(tmp_path, tiny):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "validation.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n")
    with pytest.raises(LlmcompError, match="lacks column\\(s\\) sentence needed by task sst2"):
        run_harness(build_hf_lm(*tiny, batch_size=1), [TASKS["sst2"]], data_dir=tmp_path)


def test_offline_without_data_dir_gives_hint(monkeypatch, tiny):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LlmcompError, match=r"needs the hub dataset nyu-mll/glue.*--data-dir DIR holding "
                                           r"DIR/mrpc/validation\.jsonl"):
        run_harness(build_hf_lm(*tiny, batch_size=1), [TASKS["mrpc"]], data_dir=None)
