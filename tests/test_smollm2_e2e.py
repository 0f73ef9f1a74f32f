"""End-to-end on the embedded SmolLM2-135M: the demo, compress -> from_pretrained -> generate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from llmcomp.cli.main import app
from llmcomp.modules import QuantLinear

pytestmark = pytest.mark.slow


def test_demo_offline_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--recipe", "rtn-w8", "--offline", "-o", str(out),
                                      "--seq-len", "256", "--max-eval-tokens", "1024"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_report.json").read_text())
    assert "license texts" in summary["eval_text"]
    base, comp = summary["baseline"]["perplexity"], summary["compressed"]["perplexity"]
    assert 1.0 < base < 100.0
    assert abs(comp / base - 1.0) < 0.01  # int8 per-channel costs well under 1% perplexity
    assert 8.0 < summary["compressed"]["bits_per_weight"] < 8.1
    assert (out / "demo_report.md").read_text().startswith("# llmcomp demo")

    ckpt = out / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(gen[0, ids.input_ids.shape[1]:]).strip().startswith("Paris")
