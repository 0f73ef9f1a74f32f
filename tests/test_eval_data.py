"""Perplexity corpora: local files in every supported format, joining rules, offline errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmcomp.errors import LlmcompError
from llmcomp.eval.data import C4_DOCS, C4_WINDOWS, load_eval_text, read_text_rows
from llmcomp.eval.tasks import TASKS, parse_tasks

ROWS = [" = Title = \n", "", " First paragraph , with @-@ tokens .\n", " Second one .\n"]


def test_txt_is_one_row(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("line one\n\nline two\n")
    assert read_text_rows(path) == ["line one\n\nline two\n"]


def test_jsonl_gz_and_parquet_rows(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(ROWS)))
    gz = tmp_path / "rows.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(jsonl.read_text())
    parquet = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": ROWS}), parquet)
    assert read_text_rows(jsonl) == read_text_rows(gz) == read_text_rows(parquet) == ROWS


def test_wikitext2_joins_rows_like_gptq(tmp_path):
    parquet = tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": ROWS}), parquet)
    text = load_eval_text("wikitext2", parquet)
    assert text.text == ROWS[0] + "\n\n" + ROWS[1] + "\n\n" + ROWS[2] + "\n\n" + ROWS[3]
    assert "wikitext-2-raw-v1" in text.label and str(parquet) in text.label
    assert text.max_windows is None


def test_c4_keeps_first_docs_joined_with_space(tmp_path):
    docs = [f"document {i}." for i in range(C4_DOCS + 5)]
    path = tmp_path / "c4-validation.00000-of-00008.json"
    path.write_text("".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs))
    text = load_eval_text("c4", path)
    assert text.text == " ".join(docs[:C4_DOCS])
    assert text.max_windows == C4_WINDOWS


def test_offline_corpus_is_labelled():
    text = load_eval_text("offline")
    assert len(text.text) > 10_000
    assert text.label.startswith("offline:") and "not a standard benchmark" in text.label


def test_offline_without_data_file_names_the_flag(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LlmcompError, match=r"cannot download the wikitext2 corpus.*pass --data-file FILE"):
        load_eval_text("wikitext2")


@pytest.mark.parametrize(
    "content,name,message",
    [
        ('{"txt": "x"}\n', "a.jsonl", "record 1 has no 'text' field"),
        ("x", "a.csv", "unsupported --data-file type"),
    ],
)
def test_bad_data_files(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LlmcompError, match=message):
        read_text_rows(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(LlmcompError, match="does not exist"):
        read_text_rows(tmp_path / "nope.txt")


def test_parse_tasks_expands_glue_and_rejects_unknown():
    specs = parse_tasks("wikitext2, glue,sst2")
    assert [s.name for s in specs][:3] == ["wikitext2", "sst2", "mrpc"]
    assert len(specs) == 1 + 9 and specs[-1].name == "wnli"
    assert TASKS["cola"].primary_metric == "mcc" and TASKS["qqp"].metrics == ("acc", "f1")
    with pytest.raises(LlmcompError, match=r"unknown task 'sst3'; allowed: wikitext2, c4, offline, sst2"):
        parse_tasks("sst2,sst3")
