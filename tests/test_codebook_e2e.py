"""The codebook kind end to end: compress a tiny Llama, validate, reload in transformers, run the
native runtime; the reference is the source model with every linear replaced by the codebook
format's dequantized weight, computed independently (float64)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp import codebook as cb
from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.modules.codebook_linear import CodebookLinear
from llmcomp.pipeline import compress
from llmcomp.recipes import load_recipe
from llmcomp.runtime import ModelRunner

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.mark.parametrize("recipe", ["rf8", "fp8-e4m3", "gg4"])
def test_compress_reload_and_runtime_match_reference(tiny_llama_dir, tmp_path, recipe):
    out = compress(str(tiny_llama_dir), load_recipe(recipe), tmp_path / recipe, progress=False)
    info = validate_checkpoint(out.output_dir)
    assert {s.kind for s in info.modules.values()} == {"codebook"}
    assert {s.format for s in info.modules.values()} == {recipe}
    loaded = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    assert isinstance(loaded.model.layers[0].mlp.down_proj, CodebookLinear)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    fmt = recipe
    group = -1 if cb.FORMAT_BITS[fmt] == 8 else 64
    for layer in ref.model.layers:
        for name in LINEARS:
            lin = layer.get_submodule(name)
            codes, scale, table = cb.quantize(lin.weight.float(), fmt, group, scale_dtype=torch.float32)
            lin.weight.data = cb.decode(codes, table, scale, group, torch.float64)
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = loaded(ids).logits.double()
        want = ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    runner = ModelRunner(loaded, max_batch_size=1, max_model_len=32)
    seq = ids[0].tolist()
    runner.prefill(0, seq[:-1])
    torch.testing.assert_close(runner.decode(seq[-1:])[0].double(), got[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rf8_beats_e4m3_and_int8_on_smollm2_weights():
    """The issue's bar on the embedded model's own weights (a slice of its decoder linears)."""
    from llmcomp import intquant
    from llmcomp.loading import load_model

    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    names = [f"model.layers.{i}.{p}" for i in (0, 11, 29) for p in ("self_attn.q_proj", "mlp.down_proj")]
    err = {"rf8": 0.0, "fp8-e4m3": 0.0, "int8": 0.0}
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        for fmt in ("rf8", "fp8-e4m3"):
            codes, scale, table = cb.quantize(w, fmt, -1, scale_dtype=torch.bfloat16)
            err[fmt] += cb.mse(w, cb.decode(codes, table, scale, -1))
        err["int8"] += cb.mse(w, intquant.dequantize_qw(intquant.quantize_rtn(w, 8, -1, True, torch.bfloat16)))
    assert err["rf8"] < err["int8"] < err["fp8-e4m3"]
