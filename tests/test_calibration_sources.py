"""Where calibration text comes from: a hub corpus's *train* split (never an evaluation split),
and windows capped by the model's context."""

from __future__ import annotations

import pytest

from llmcomp.calibration import calibration_corpus, calibration_text, context_length
from llmcomp.errors import LlmcompError, RecipeError
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict

WANDA = [{"type": "wanda", "sparsity": 0.5}]


def test_windows_longer_than_the_context_are_capped_and_reported(tiny_llama_factory, tmp_path):
    src = tmp_path / "short-context"
    tiny_llama_factory(src, seed=2, max_position_embeddings=48)
    recipe = recipe_from_dict({"calibration": {"num_samples": 3, "seq_len": 2048}, "passes": WANDA})
    out = compress(str(src), recipe, tmp_path / "out", progress=False)
    info = out.report["calibration"]
    assert (info["seq_len"], info["seq_len_capped_from"]) == (48, 2048)
    assert context_length({"n_positions": 1024}) == 1024 and context_length({}) is None


@pytest.mark.parametrize("name", ["c4", "wikitext2"])
def test_hub_calibration_reads_the_train_split(monkeypatch, name):
    """The real hub loader is called with the corpus's train split; its rows are joined in order."""
    from llmcomp.eval import data

    asked = []

    def fake_hub_rows(spec):
        asked.append(spec)
        return ["first document", "", "second document"]

    monkeypatch.setattr(data, "hub_rows", fake_hub_rows)
    text, where = calibration_text(None, dataset=name)
    assert asked[0].split == "train" and asked[0].split not in ("test", "validation")
    assert text == calibration_corpus(name).separator.join(["first document", "second document"])
    assert asked[0].hub_path in where


def test_hub_calibration_offline_is_one_line_and_both_sources_are_refused(monkeypatch):
    from llmcomp.eval import data

    def offline(spec):
        raise LlmcompError("no network")

    monkeypatch.setattr(data, "hub_rows", offline)
    with pytest.raises(LlmcompError, match="calibration dataset 'c4' .* could not be loaded .*data_file"):
        calibration_text(None, dataset="c4")
    with pytest.raises(RecipeError, match="data_file or calibration.dataset, not both"):
        recipe_from_dict({"calibration": {"data_file": "x.txt", "dataset": "c4"}, "passes": WANDA})
    with pytest.raises(RecipeError, match="dataset"):
        recipe_from_dict({"calibration": {"dataset": "wikitext2-test"}, "passes": WANDA})
