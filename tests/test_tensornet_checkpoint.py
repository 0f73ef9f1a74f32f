"""The tensornet / lowrank passes through the pipeline: targets, exact core round trip, loading in
transformers and in the native runtime, chaining with FineQuant."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp.modules.lowrank_linear import LowRankLinear
from llmcomp.modules.mpo_linear import MPOLinear
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.pipeline import compress
from llmcomp.recipes import load_recipe, recipe_from_dict
from llmcomp.runtime import ModelRunner

LAYER_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def kinds(model) -> dict[str, type]:
    return {f"{i}.{part}": type(layer.get_submodule(part)) for i, layer in enumerate(model.model.layers)
            for part in LAYER_KINDS}


def dense_twin(model, source_dir):
    """A plain model whose linear weights are the compressed modules' dense weights (the reference)."""
    twin = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    for name, module in model.named_modules():
        if hasattr(module, "dequantized_weight"):
            twin.get_submodule(name).weight.data.copy_(module.dequantized_weight(torch.float32))
    return twin


@pytest.fixture(scope="module")
def mpo_ckpt(tiny_llama_dir, tmp_path_factory):
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.5, "num_cores": 3,
                                           "dense_first_blocks": 1}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path_factory.mktemp("mpo") / "out", progress=False)
    return out.output_dir


def test_sensitivity_defaults_choose_the_targets(mpo_ckpt) -> None:
    model = AutoModelForCausalLM.from_pretrained(mpo_ckpt).eval()
    got = kinds(model)
    for name, cls in got.items():
        block = int(name.split(".")[0])
        dense = block < 1 or name.endswith("down_proj")
        assert (cls is torch.nn.Linear) == dense, name
        assert dense or cls is MPOLinear


def test_cores_round_trip_exactly_and_logits_match(mpo_ckpt, tiny_llama_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(mpo_ckpt).eval()
    with safe_open(str(mpo_ckpt / "model.safetensors"), framework="pt") as fh:
        stored = {n: fh.get_tensor(n) for n in fh.keys() if ".core_" in n}  # noqa: SIM118
    assert stored
    params = dict(model.named_parameters())
    for name, tensor in stored.items():
        assert torch.equal(params[name], tensor), name
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        ref = dense_twin(model, tiny_llama_dir)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_native_runtime_runs_the_mpo_model(mpo_ckpt) -> None:
    model = AutoModelForCausalLM.from_pretrained(mpo_ckpt).eval()
    ids = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = ModelRunner(model, max_batch_size=2, max_model_len=32, prefill_chunk=4, lean=True)
    assert runner.backend.startswith("lean")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(runner.prefill(0, ids[:8], logits_for_all=True), ref[:8], rtol=1e-4, atol=1e-4)
    for t in range(8, 11):
        torch.testing.assert_close(runner.decode([ids[t]])[0], ref[t], rtol=1e-4, atol=1e-4)


def test_lowrank_builtin_has_the_same_targets_and_about_the_same_parameters(tiny_llama_dir, tmp_path) -> None:
    mpo = compress(str(tiny_llama_dir), load_recipe("tensornet-50"), tmp_path / "t", progress=False)
    low = compress(str(tiny_llama_dir), load_recipe("lowrank-50"), tmp_path / "l", progress=False)
    mods_t, mods_l = mpo.report["modules"], low.report["modules"]
    assert set(mods_t) == set(mods_l) and mods_t
    for name in mods_t:
        assert 0.4 < mods_t[name]["param_ratio"] <= 0.5 and 0.4 < mods_l[name]["param_ratio"] <= 0.5
    model = AutoModelForCausalLM.from_pretrained(low.output_dir).eval()
    assert any(cls is LowRankLinear for cls in kinds(model).values())
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_twin(model, tiny_llama_dir)(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_overrides_force_a_module_either_way(tiny_llama_dir, tmp_path) -> None:
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "chi": 4, "overrides": {
        "model.layers.0.self_attn.q_proj": {"keep_dense": False},
        "model.layers.2.mlp.gate_proj": {"keep_dense": True},
        "model.layers.2.self_attn.o_proj": {"chi": 2},
    }}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "o", progress=False)
    mods = out.report["modules"]
    assert "model.layers.0.self_attn.q_proj" in mods and "model.layers.0.self_attn.k_proj" not in mods
    assert "model.layers.2.mlp.gate_proj" not in mods
    assert mods["model.layers.2.self_attn.o_proj"]["ranks"] == [2]
    assert mods["model.layers.2.self_attn.q_proj"]["ranks"] == [4]


def test_chained_recipe_quantizes_what_stays_dense(tiny_llama_dir, tmp_path) -> None:
    out = compress(str(tiny_llama_dir), load_recipe("tensornet-50-fq4"), tmp_path / "c", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    for name, cls in kinds(model).items():
        block = int(name.split(".")[0])
        expected = QuantLinear if block < 2 or name.endswith("down_proj") else MPOLinear
        assert cls is expected, name


def test_vllm_spec_accepts_the_mpo_checkpoint(mpo_ckpt) -> None:
    """The vLLM plugin's pre-load check (no vLLM import): MPO layers take its materialized path."""
    import json

    from llmcomp.serve.vllm_spec import check_checkpoint

    qc = json.loads((mpo_ckpt / "config.json").read_text())["quantization_config"]
    assert check_checkpoint(qc) == len(qc["modules"]) > 0


def test_balanced_cores_give_the_same_weights_with_other_cores(mpo_ckpt, tiny_llama_dir, tmp_path) -> None:
    """Float cores are balanced by default (``mpo_ckpt``); ``balance_cores: false`` keeps TT-SVD's."""
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.5, "num_cores": 3,
                                           "dense_first_blocks": 1, "balance_cores": False}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "b", progress=False)
    assert not any(m["balanced_cores"] for m in out.report["modules"].values())
    ckpt_report = json.loads((mpo_ckpt / "llmcomp_report.json").read_text())["modules"]
    assert ckpt_report and all(m["balanced_cores"] for m in ckpt_report.values())
    plain = dict(AutoModelForCausalLM.from_pretrained(out.output_dir).named_modules())
    balanced = {n: m for n, m in AutoModelForCausalLM.from_pretrained(mpo_ckpt).named_modules()
                if isinstance(m, MPOLinear)}
    assert balanced
    for name, module in balanced.items():
        ref = plain[name]
        assert module.ranks == ref.ranks and not torch.equal(module.core_0, ref.core_0)
        w, w_ref = module.dequantized_weight(torch.float64), ref.dequantized_weight(torch.float64)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-5 * w_ref.abs().max().item())  # float32 cores
        norms = [c.norm().item() for c in module.cores]  # the scale is shared, not all in the last core
        ref_norms = [c.norm().item() for c in ref.cores]
        assert max(norms) / min(norms) < max(ref_norms) / min(ref_norms)
