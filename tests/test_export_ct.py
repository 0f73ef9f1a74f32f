"""compressed-tensors export: tensor conventions vs the library itself, refusals, and a real load
in stock transformers (with the compressed-tensors package) matching llmcomp's logits."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import helpers as ct_helpers
from spec_kinds import DUMMY_KIND
from typer.testing import CliRunner

from llmcomp.errors import LlmcompError
from llmcomp.formats.compressed_tensors import export_compressed_tensors, pack_int32, scheme_for
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict
from llmcomp.scheme import IntAffineSpec, parse_module_spec

runner = CliRunner()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int32_matches_compressed_tensors(bits: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(bits + dim)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (13, 21), generator=gen, dtype=torch.int8)  # odd sizes: padding
    ours = pack_int32(q, bits, dim)
    ref = ct_helpers.pack_to_int32(q, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, ref)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, q.shape, packed_dim=dim), q)


def _spec(bits: int = 4, group: int = 32, k: int = 160):
    return IntAffineSpec(in_features=k, out_features=64, bits=bits, group_size=group, symmetric=False)


def test_scheme_mapping_and_refusals() -> None:
    assert scheme_for("m", _spec(group=160)).strategy == "channel"
    s = scheme_for("m", _spec(group=32))
    assert (s.strategy, s.group_size, s.bits) == ("group", 32, 4)
    with pytest.raises(LlmcompError, match="3-bit"):
        scheme_for("m", _spec(bits=3))
    with pytest.raises(LlmcompError, match="does not divide"):
        scheme_for("m", _spec(group=64))
    with pytest.raises(LlmcompError, match=f"kind .{DUMMY_KIND}. has no pack-quantized equivalent and no module class"):
        scheme_for("m", parse_module_spec("m", {"kind": DUMMY_KIND, "in_features": 8, "out_features": 8}))


def _checkpoint(tiny_llama_dir, out, **pass_cfg):
    recipe = recipe_from_dict({"name": "t", "passes": [{"type": "finequant", "fit_iters": 2, **pass_cfg}]})
    compress(str(tiny_llama_dir), recipe, out, progress=False)
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        {"bits": 4, "symmetric": False, "min_group_size": 32, "max_group_size": 32},
        {"bits": 4, "symmetric": True, "min_group_size": 32, "max_group_size": 32},
        {"bits": 8, "symmetric": True, "min_group_size": 1 << 20},  # per-channel
        {"bits": 8, "symmetric": False, "min_group_size": 1 << 20},
    ],
)
def test_export_loads_in_transformers_and_matches_llmcomp(tiny_llama_dir, tmp_path, cfg) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    from llmcomp.loading import load_model

    ck = _checkpoint(tiny_llama_dir, tmp_path / "ck", **cfg)
    summary = export_compressed_tensors(ck, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the library accepts our config
    assert parsed.format == "pack-quantized" and "lm_head" in qc["ignore"]
    assert sum(len(v) for v in summary.schemes.values()) == 3 * 7

    ours, tok = load_model(str(ck), dtype="float32")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = tok(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        a, b, c = ours(ids).logits, stock(ids).logits, dense(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert float((a - c).abs().max()) > 1e-5  # the weights really are quantized


def test_export_refuses_unrepresentable_scheme_via_cli(tiny_llama_dir, tmp_path) -> None:
    from llmcomp.cli.main import app

    ck = _checkpoint(tiny_llama_dir, tmp_path / "ck", bits=3, min_group_size=32, max_group_size=32)
    result = runner.invoke(app, ["export", str(ck), "--format", "compressed-tensors", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "3-bit" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_export_cli_success_and_overwrite_guard(tiny_llama_dir, tmp_path) -> None:
    from llmcomp.cli.main import app

    ck = _checkpoint(tiny_llama_dir, tmp_path / "ck", bits=4, min_group_size=32, max_group_size=32)
    args = ["export", str(ck), "-o", str(tmp_path / "o")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "tokenizer.json").is_file()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already exists" in result.output


def test_export_of_a_quantized_head_loads_in_transformers(tiny_llama_dir, tmp_path) -> None:
    """``lm_head: true`` checkpoints are untied; the export quantizes the head too."""
    from transformers import AutoModelForCausalLM

    from llmcomp.loading import load_model

    ck = _checkpoint(tiny_llama_dir, tmp_path / "ck", bits=8, symmetric=True, min_group_size=1 << 20, lm_head=True)
    export_compressed_tensors(ck, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]
    ours, tok = load_model(str(ck), dtype="float32")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = tok(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
