"""``llmcomp quantize-cores``: int cores for a healed MPO checkpoint. Stored codes against the
tensornet quantizer, a float64 reference forward from naively dequantized codes, every other tensor
unchanged, loading in transformers and the runtime, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_tensornet_quant import naive_core
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp.cli.main import app
from llmcomp.healing import HealConfig, heal
from llmcomp.modules.mpo_linear import MPOLinear, MPOSpec, mpo_to_matrix
from llmcomp.passes.tensornet import quantize_cores
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict
from llmcomp.runtime import ModelRunner

BITS, GROUP = 4, 16


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def healed(tiny_llama_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("qcli")
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.5, "num_cores": 2,
                                           "dense_first_blocks": 1}]})
    mpo = compress(str(tiny_llama_dir), recipe, base / "mpo", progress=False).output_dir
    cfg = HealConfig(steps=2, lr=1e-3, batch_size=2, seq_len=16, num_samples=4, lm_weight=0.0)
    heal(mpo, str(tiny_llama_dir), base / "healed", cfg, progress=False)
    return base / "healed"


@pytest.fixture(scope="module")
def quantized(healed, tmp_path_factory):
    out = tmp_path_factory.mktemp("qcli-out") / "int4"
    res = CliRunner().invoke(app, ["quantize-cores", str(healed), "-o", str(out), "--bits", str(BITS),
                                   "--group-size", str(GROUP)])
    assert res.exit_code == 0, res.output
    assert "quantized the cores of" in res.output
    return out


def test_codes_are_the_tensornet_quantizers_and_the_rest_is_untouched(healed, quantized) -> None:
    before, after = tensors(healed), tensors(quantized)
    specs = json.loads((quantized / "config.json").read_text())["quantization_config"]["modules"]
    mpo_names = [n for n, s in specs.items() if s["kind"] == "mpo"]
    bits: dict[str, float] = {}
    assert mpo_names and all(specs[n]["core_bits"] == BITS and specs[n]["core_group_size"] == GROUP
                             for n in mpo_names)
    for name in mpo_names:
        spec = MPOSpec.model_validate(specs[name])
        module = MPOLinear.from_spec(spec.model_copy(update={"core_bits": None}), torch.float32)
        module.load_state_dict({k: before[f"{name}.{k}"] for k in module.state_dict()})
        expected = quantize_cores(module, BITS, GROUP).state_dict()
        assert set(expected) == {k[len(name) + 1:] for k in after if k.startswith(name + ".")}
        for k, v in expected.items():
            assert after[f"{name}.{k}"].dtype == v.dtype and torch.equal(after[f"{name}.{k}"], v), (name, k)
        assert f"{name}.core_0" not in after
        stored_bits = 8 * sum(v.numel() * v.element_size() for k, v in expected.items() if k != "bias")
        bits[name] = stored_bits / (spec.in_features * spec.out_features)
    others = {n for n in before if not any(n.startswith(m + ".") for m in mpo_names)}
    assert others and all(torch.equal(before[n], after[n]) for n in others)
    report = json.loads((quantized / "llmcomp_report.json").read_text())
    assert "healing" in report and set(report["core_quantization"]["modules"]) == set(mpo_names)
    old_report = json.loads((healed / "llmcomp_report.json").read_text())
    for name in mpo_names:  # the size fields eval / inspect read are updated
        assert report["modules"][name]["bits_per_weight"] == pytest.approx(bits[name])
        assert bits[name] < old_report["modules"][name]["bits_per_weight"] / 3
    assert report["average_bits_per_weight"] < old_report["average_bits_per_weight"]
    assert report["compressed_bytes"] == (quantized / "model.safetensors").stat().st_size


def test_logits_match_a_float64_reference_and_the_runtime(quantized, tiny_llama_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(quantized).eval()
    buffers = dict(model.named_buffers())
    for name, tensor in tensors(quantized).items():
        if ".core_" in name:
            assert torch.equal(buffers[name], tensor), name  # exact round trip through transformers
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    mpos = {n: m for n, m in model.named_modules() if isinstance(m, MPOLinear)}
    assert mpos and all(m.core_bits == BITS for m in mpos.values())
    for name, module in mpos.items():  # dense float64 weights from codes dequantized by explicit loops
        cores = [naive_core(module, k) for k in range(len(module.core_shapes))]
        ref.get_submodule(name).weight.data.copy_(mpo_to_matrix(cores))
    ids = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(ids).logits[0]
        torch.testing.assert_close(got.double(), ref(ids).logits[0], rtol=1e-4, atol=1e-4)
    runner = ModelRunner(model, max_batch_size=1, max_model_len=32, prefill_chunk=4)
    assert runner.backend.startswith("lean")
    tokens = ids[0].tolist()
    torch.testing.assert_close(runner.prefill(0, tokens[:8], logits_for_all=True), got[:8], rtol=1e-4, atol=1e-4)
    for t in range(8, 11):
        torch.testing.assert_close(runner.decode([tokens[t]])[0], got[t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "5"], "core bits must be one of"),
    (["--group-size", "0"], "group size must be positive"),
    (["--fit-iters", "-1"], "non-negative"),
])
def test_bad_options_fail_with_one_line(healed, tmp_path, args, message) -> None:
    res = CliRunner().invoke(app, ["quantize-cores", str(healed), "-o", str(tmp_path / "q"), *args])
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "q").exists()
    assert len(res.output.strip().splitlines()) == 1


def test_bad_inputs_fail_with_one_line(quantized, healed, tiny_llama_dir, tmp_path) -> None:
    cases = [
        ([str(quantized), "-o", str(tmp_path / "q")], "quantized already"),
        ([str(tiny_llama_dir), "-o", str(tmp_path / "q")], "error:"),  # not an llmcomp checkpoint
        ([str(healed), "-o", str(quantized)], "already exists"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(app, ["quantize-cores", *args])
        assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "q").exists()
