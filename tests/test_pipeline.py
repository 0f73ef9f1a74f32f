"""The layer-by-layer pipeline against whole-model references."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcomp import intquant
from llmcomp.calibration import calibration_batches, collect_input_stats, offline_calibration_text
from llmcomp.modules import QuantLinear
from llmcomp.passes.wanda import wanda_mask, wanda_scores
from llmcomp.pipeline import CALIBRATION_BATCH, compress
from llmcomp.recipes import recipe_from_dict

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_calibration_pass_matches_whole_model_reference(tiny_llama_dir, tmp_path):
    """Wanda needs each layer's inputs *after* the previous layers were pruned; the pipeline builds
    one layer at a time, the reference prunes the full in-memory model layer by layer."""
    recipe = recipe_from_dict({"calibration": {"num_samples": 10, "seq_len": 48},
                               "passes": [{"type": "wanda", "sparsity": 0.5}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "out", progress=False)

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = calibration_batches(tok, offline_calibration_text(), 10, 48, seed=0)
    for i, layer in enumerate(ref.model.layers):
        targets = {f"model.layers.{i}.{n}": layer.get_submodule(n) for n in LINEARS}
        with collect_input_stats(targets) as stats, torch.inference_mode():
            for s in range(0, ids.shape[0], CALIBRATION_BATCH):
                ref(input_ids=ids[s : s + CALIBRATION_BATCH], use_cache=False)
        for name, lin in targets.items():
            keep = wanda_mask(wanda_scores(lin.weight, stats[name].sq_norm), 0.5, "unstructured")
            lin.weight.data.mul_(keep)

    got = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    for i in range(len(ref.model.layers)):
        for n in LINEARS:
            a = ref.model.layers[i].get_submodule(n).weight
            b = got.model.layers[i].get_submodule(n).weight
            assert torch.equal(a == 0, b == 0), f"mask differs in layer {i} {n}"
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert abs(out.report["modules"]["model.layers.1.mlp.up_proj"]["sparsity"] - 0.5) < 1e-6


def test_rtn_checkpoint_is_bit_identical_to_direct_quantization(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict({"passes": [{"type": "rtn", "bits": 4, "group_size": 32, "symmetric": False}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "q", progress=False)
    src = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = AutoModelForCausalLM.from_pretrained(out.output_dir)
    for i in range(len(src.model.layers)):
        for n in LINEARS:
            w = src.model.layers[i].get_submodule(n).weight.detach()
            qw = intquant.quantize_rtn(w, 4, 32, symmetric=False)
            mod = loaded.model.layers[i].get_submodule(n)
            assert isinstance(mod, QuantLinear)
            assert torch.equal(mod.weight_packed, intquant.pack(qw.q, 4))
            assert torch.equal(mod.weight_zero_point, qw.zero)
            assert torch.equal(mod.weight_scale, qw.scale.to(mod.weight_scale.dtype))
    # Untouched tensors (embeddings, norms) survive bit for bit.
    assert torch.equal(src.model.embed_tokens.weight, loaded.model.embed_tokens.weight)
    assert torch.equal(src.model.norm.weight, loaded.model.norm.weight)


def test_loaded_model_logits_match_dequantized_reference(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict({"passes": [{"type": "rtn", "bits": 8, "group_size": -1}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "q8", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    for i in range(len(ref.model.layers)):
        for n in LINEARS:
            w = ref.model.layers[i].get_submodule(n).weight
            w.data = intquant.dequantize_qw(intquant.quantize_rtn(w.float(), 8, -1, True), torch.float64)
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = loaded(ids).logits.double()
        want = ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_model_calibrates_in_float32(tiny_llama_factory, tmp_path):
    """A bf16 checkpoint is calibrated in float32 (several times faster on CPUs without bf16 units);
    the first layer's activation-aware fit equals one computed from a float32 reference's statistics."""
    from llmcomp.passes import finequant_fit as fit

    src = tmp_path / "bf16"
    tiny_llama_factory(src, seed=5, dtype=torch.bfloat16)
    recipe = recipe_from_dict({"calibration": {"num_samples": 6, "seq_len": 32},
                               "passes": [{"type": "finequant", "bits": 4, "activation_aware": True,
                                           "min_group_size": 32, "max_group_size": 32, "tie_fused": False}]})
    out = compress(str(src), recipe, tmp_path / "out", progress=False)
    assert out.report["modules"]["model.layers.0.self_attn.q_proj"]["activation_weighted"] is True
    assert out.report["calibration"]["dtype"] == "float32"

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_batches(tok, offline_calibration_text(), 6, 32, seed=0)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # inputs independent of rotary
    targets = {n: ref.model.layers[0].get_submodule(n) for n in names}
    with collect_input_stats(targets) as stats, torch.inference_mode():
        for s in range(0, ids.shape[0], CALIBRATION_BATCH):
            ref(input_ids=ids[s : s + CALIBRATION_BATCH], use_cache=False)
    got = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    for n in names:
        w = targets[n].weight.detach().to(torch.bfloat16)
        expected = fit.fit_quantize(w, 4, 32, False, scale_dtype=torch.bfloat16, column_weight=stats[n].sum_sq)
        module = got.model.layers[0].get_submodule(n)
        assert isinstance(module, QuantLinear)
        torch.testing.assert_close(module.dequantized_weight(torch.float64),
                                   intquant.dequantize_qw(expected, torch.float64), rtol=0, atol=0)


def test_lm_head_can_be_compressed_and_is_untied(tiny_llama_dir, tmp_path):
    """``lm_head: true`` quantizes the (tied) head from a copy; the embedding stays exact and dense,
    and the loaded model's logits equal a reference whose head is the independently quantized one."""
    recipe = recipe_from_dict({"passes": [{"type": "rtn", "bits": 8, "group_size": -1, "symmetric": True,
                                           "targets": ["lm_head"], "lm_head": True}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "out", progress=False)
    assert set(out.report["modules"]) == {"lm_head"}

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert ref.config.tie_word_embeddings
    got = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    assert isinstance(got.lm_head, QuantLinear) and got.config.tie_word_embeddings is False
    torch.testing.assert_close(got.model.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)

    w = ref.lm_head.weight.detach().clone()
    expected = intquant.dequantize_qw(intquant.quantize_rtn(w, 8, -1, symmetric=True, scale_dtype=w.dtype))
    ref.config.tie_word_embeddings = False
    ref.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    ref.lm_head.weight.data.copy_(expected)
    ids = torch.randint(0, w.shape[0], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits)


def test_lm_head_refusals_are_one_line(tiny_llama_dir, tmp_path):
    import pytest

    from llmcomp.errors import LlmcompError

    wanda = recipe_from_dict({"calibration": {"num_samples": 2, "seq_len": 16},
                              "passes": [{"type": "wanda", "sparsity": 0.5, "lm_head": True}]})
    with pytest.raises(LlmcompError, match="needs calibration statistics"):
        compress(str(tiny_llama_dir), wanda, tmp_path / "a", progress=False)
    unselected = recipe_from_dict({"passes": [{"type": "rtn", "bits": 8, "targets": ["*.mlp.*"], "lm_head": True}]})
    with pytest.raises(LlmcompError, match="no pass targets select 'lm_head'"):
        compress(str(tiny_llama_dir), unselected, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_activation_aware_finequant_compresses_the_head_unweighted(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict({"calibration": {"num_samples": 2, "seq_len": 16},
                               "passes": [{"type": "finequant", "bits": 4, "activation_aware": True,
                                           "lm_head": True}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "out", progress=False)
    modules = out.report["modules"]
    assert modules["lm_head"]["activation_weighted"] is False
    assert modules["model.layers.0.mlp.up_proj"]["activation_weighted"] is True
    got = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    assert isinstance(got.lm_head, QuantLinear) and got.lm_head.bits == 4
