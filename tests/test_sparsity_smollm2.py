"""End to end on the embedded SmolLM2: a 60% sparse checkpoint is small, loads and serves."""

from __future__ import annotations

import json

import pytest
import torch

from llmcomp.loading import load_model
from llmcomp.pipeline import compress
from llmcomp.recipes import load_recipe
from llmcomp.runtime import ModelRunner

MAX_SIZE_RATIO = 0.70  # the bound for a 60% sparse checkpoint against the dense bf16 one


@pytest.mark.slow
def test_wanda_60_checkpoint_is_small_and_serves(smollm2_dir, tmp_path):
    recipe = load_recipe("wanda-60")
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
        update={"num_samples": 2, "seq_len": 64})})
    result = compress(str(smollm2_dir), recipe, tmp_path / "ckpt", dtype="bfloat16", progress=False)
    out = tmp_path / "ckpt"
    dense_bytes = sum(f.stat().st_size for f in smollm2_dir.glob("*.safetensors"))
    sparse_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert sparse_bytes <= MAX_SIZE_RATIO * dense_bytes
    specs = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(specs) == 30 * 7 and {s["kind"] for s in specs.values()} == {"sparse_bitmask"}
    reports = result.report["modules"]
    assert all(r["sparsity"] == pytest.approx(0.6, abs=0.002) for r in reports.values())
    model, tok = load_model(str(out), dtype="float32")
    name = next(iter(specs))
    w = model.get_submodule(name).dequantized_weight()
    rows = (w != 0).sum(1)
    assert int(rows.max()) <= w.shape[1] - int(w.shape[1] * 0.6)  # exact per-row sparsity survived
    ids = tok("The licensee may copy and distribute the Program", return_tensors="pt").input_ids[0].tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
    runner = ModelRunner(model, max_batch_size=1, max_model_len=64)
    torch.testing.assert_close(runner.prefill(0, ids, logits_for_all=True), full, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(full).all()
