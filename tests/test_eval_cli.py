"""``llmcomp eval`` end to end on tiny saved models, offline; one-line errors; SmolLM2 (slow)."""

from __future__ import annotations

import copy
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

SEQ_LEN = 64
GLUE_ROWS = 8
WORDS = ["alpha", "beta", "gamma", "delta", "good", "bad", "news", "day"]


def float64_perplexity(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows, computed independently in float64."""
    model64 = copy.deepcopy(model).double()
    total, count = 0.0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = ids[start : start + seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model64(input_ids=torch.tensor([window])).logits[0].double(), -1)
        total -= sum(float(logp[i - 1, window[i]]) for i in range(1, seq_len))
        count += seq_len - 1
    return math.exp(total / count), count


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def app():
    from llmcomp.cli.main import app

    return app


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two saved tiny models, a wikitext-style parquet file and an sst2/mrpc data dir."""
    root = tmp_path_factory.mktemp("evalcli")
    tokenizer = byte_tokenizer()
    models = {}
    for name, seed in (("base", 0), ("other", 1)):
        model = tiny_llama(seed=seed, init_std=0.3)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        models[name] = model
    gen = torch.Generator().manual_seed(21)
    rows = [" ".join(WORDS[i] for i in torch.randint(0, 8, (12,), generator=gen).tolist()) for _ in range(40)]
    pq.write_table(pa.table({"text": rows}), root / "test-00000-of-00001.parquet")
    (root / "short.txt").write_text("just a few words.")
    for task in ("sst2", "mrpc"):
        (root / "glue" / task).mkdir(parents=True)
        records = []
        for idx in range(GLUE_ROWS):
            label = idx % 2
            if task == "sst2":
                records.append({"sentence": rows[idx], "label": label, "idx": idx})
            else:
                records.append({"sentence1": rows[idx], "sentence2": rows[idx + 1], "label": label, "idx": idx})
        (root / "glue" / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, models, tokenizer, "\n\n".join(rows)


def invoke(runner, app, args):
    return runner.invoke(app, ["eval", *map(str, args), "--no-progress"])


def test_compare_two_models_offline(runner, app, workdir, monkeypatch):
    root, models, tokenizer, text = workdir
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, report, plot = root / "r.json", root / "r.md", root / "plots" / "p.png"
    result = invoke(runner, app, [
        root / "other", "--baseline", root / "base", "--tasks", "wikitext2,sst2,mrpc",
        "--data-file", root / "test-00000-of-00001.parquet", "--data-dir", root / "glue",
        "--seq-len", SEQ_LEN, "--batch-size", 2, "-o", out, "--report", report, "--plot", plot,
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == [str(root / "base"), str(root / "other")]
    ids = tokenizer(text)["input_ids"]
    for entry in data["models"]:
        name = "base" if entry["name"].endswith("base") else "other"
        ppl, tokens = float64_perplexity(models[name], ids, SEQ_LEN)
        wt = entry["results"]["wikitext2"]
        assert wt["perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert (wt["tokens"], wt["windows"], wt["seq_len"]) == (tokens, len(ids) // SEQ_LEN, SEQ_LEN)
        assert entry["results"]["sst2"]["samples"] == GLUE_ROWS
        assert 0.0 <= entry["results"]["mrpc"]["f1"] <= 1.0
        assert entry["size"]["bits_per_weight"] == pytest.approx(32.0)
    rows = {(r["task"], r["metric"]): r for r in data["comparison"]}
    ppl_row = rows[("wikitext2", "perplexity")]
    base_v, other_v = ppl_row["values"][str(root / "base")], ppl_row["values"][str(root / "other")]
    assert ppl_row["deltas"][str(root / "other")] == pytest.approx(other_v - base_v)
    assert "from local file" in data["tasks"]["wikitext2"]["data"]
    assert "| wikitext2 | perplexity ↓ |" in report.read_text()
    assert "![trade-off plot](plots/p.png)" in report.read_text()
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "deltas vs" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "wikitext2,nope"], "unknown task 'nope'; allowed: wikitext2, c4, offline, sst2, mrpc"),
        (["--tasks", "wikitext2"], "cannot download the wikitext2 corpus (the hub is unreachable or offline "
                                   "mode is on): pass --data-file FILE"),
        (["--tasks", "sst2"], "task sst2 needs the hub dataset nyu-mll/glue, which cannot be downloaded "
                              "(offline): pass --data-dir DIR holding DIR/sst2/validation.jsonl"),
        (["--tasks", "sst2", "--data-dir", "{root}/glue-missing"], "is not a directory"),
        (["--tasks", "qnli", "--data-dir", "{root}/glue"], "no local data for task qnli: expected"),
        (["--tasks", "wikitext2,c4", "--data-file", "{root}/test-00000-of-00001.parquet"],
         "--data-file replaces exactly one hub corpus"),
        (["--tasks", "offline", "--engine", "vllm"], "--engine vllm runs lm-eval tasks only"),
        (["--tasks", "wikitext2", "--data-file", "{root}/short.txt", "--seq-len", "64"],
         "the evaluation text has only 17 tokens, fewer than seq_len=64: lower --seq-len"),
    ],
)
def test_one_line_errors(runner, app, workdir, monkeypatch, args, message):
    root = workdir[0]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = [a.format(root=root) for a in args]
    result = invoke(runner, app, [root / "base", *args])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_smollm2_wikitext_file_end_to_end(runner, app, tmp_path, monkeypatch):
    """The embedded model on a small local corpus; numbers equal an independent float64 loop."""
    from llmcomp.loading import load_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from llmcomp.calibration import offline_evaluation_text

    text = offline_evaluation_text()[0][:6000]
    (tmp_path / "wiki.txt").write_text(text)
    out = tmp_path / "r.json"
    result = invoke(runner, app, ["smollm2-135m", "--tasks", "wikitext2", "--data-file", tmp_path / "wiki.txt",
                                  "--seq-len", 256, "--dtype", "float32", "-o", out])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())["models"][0]["results"]["wikitext2"]
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    ids = tokenizer(text)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 255, 256):
            window = torch.tensor([ids[start : start + 256]])
            logp = torch.log_softmax(model(input_ids=window).logits[0].double(), -1)
            total -= float(logp[:-1].gather(1, window[0, 1:, None]).sum())
            count += 255
    assert got["tokens"] == count and got["windows"] == len(ids) // 256
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 5 < got["perplexity"] < 100  # an instruction-tuned 135M model on English prose
