"""`llmcomp profile`: per-layer costs against a direct recomputation, a usable plan, a heat map."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmcomp  # noqa: F401
from llmcomp.cli.main import app
from llmcomp.modules.mpo_linear import MPOLinear
from llmcomp.passes.tensornet import TensorNetConfig, decompose_for
from llmcomp.pipeline import compress
from llmcomp.profiling import (
    LAYER_TYPES,
    decoder_blocks,
    mean_nll,
    mean_nll_from,
    profile_model,
    record_block_inputs,
)
from llmcomp.recipes import load_recipe


def test_profile_cost_matches_a_direct_measurement(tiny_llama_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 2000, (3, 20), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    prof = profile_model(model, ids, "tensornet", {"ratio": 0.3}, batch_size=2)
    assert len(prof.costs) == 3 * len(LAYER_TYPES)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # restored
    # Independent: compress block 1's up_proj by hand and measure the NLL of the whole model.
    twin = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    layer = twin.model.layers[1].mlp
    cores, _ = decompose_for(layer.up_proj.weight.detach(), TensorNetConfig(ratio=0.3))
    layer.up_proj = MPOLinear.from_cores(cores, None, torch.float32)
    with torch.no_grad():
        ref = float(twin(ids, labels=ids).loss) - float(model(ids, labels=ids).loss)
    got = next(c for c in prof.costs if c.name == "model.layers.1.mlp.up_proj")
    assert got.delta_nll == pytest.approx(ref, abs=1e-5)
    assert prof.base_nll == pytest.approx(mean_nll(model, ids, 3), abs=1e-6)


def test_replaying_recorded_block_inputs_gives_the_full_forward(tiny_llama_dir) -> None:
    """Skipping blocks 0..i-1 (their output replayed) changes nothing, for every i; blocks restored."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 2000, (3, 12), generator=torch.Generator().manual_seed(1))
    _, blocks = decoder_blocks(model)
    originals = list(blocks)
    base, inputs, as_tuple = record_block_inputs(model, blocks, ids, 2)
    assert base == pytest.approx(mean_nll(model, ids, 2), abs=1e-6) and len(inputs[0]) == 2
    with torch.no_grad():  # perturb the last block so a replay that skipped it would be caught
        blocks[-1].mlp.up_proj.weight.mul_(1.5)
    ref = mean_nll(model, ids, 2)
    for i in range(len(blocks)):
        assert mean_nll_from(model, blocks, i, inputs[i], as_tuple, ids, 2) == pytest.approx(ref, abs=1e-5)
    assert all(a is b for a, b in zip(blocks, originals, strict=True))


def test_cli_writes_plan_json_and_heatmap_and_the_plan_compresses(tiny_llama_dir, tmp_path) -> None:
    out = tmp_path / "prof"
    res = CliRunner().invoke(app, ["profile", str(tiny_llama_dir), "--pass", "tensornet", "-o", str(out),
                                   "--ratio", "0.4", "--samples", "2", "--seq-len", "16", "--dense-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "profile.json").read_text())
    assert len(data["layers"]) == 21 and (out / "heatmap.png").stat().st_size > 1000
    ranked = sorted(data["layers"], key=lambda c: c["cost_per_param"], reverse=True)
    expected_dense = {c["name"] for c in ranked[:5]}  # round(0.25 * 21)
    recipe = load_recipe(str(out / "plan.yaml"))
    result = compress(str(tiny_llama_dir), recipe, tmp_path / "c", progress=False)
    compressed = set(result.report["modules"])
    assert compressed == {c["name"] for c in data["layers"]} - expected_dense


def test_cli_rejects_other_passes(tiny_llama_dir, tmp_path) -> None:
    res = CliRunner().invoke(app, ["profile", str(tiny_llama_dir), "--pass", "rtn", "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and "tensornet or lowrank" in res.output
    assert not (tmp_path / "p").exists()
