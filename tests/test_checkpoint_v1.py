"""Format version 1 checkpoints keep working: the committed fixture (tests/data/README.md) validates,
loads and gives the logits recorded when it was written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp.cli.inspect_cmd import describe
from llmcomp.errors import CheckpointError
from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.modules import QuantLinear
from llmcomp.serve.vllm_spec import parse_modules

DATA = Path(__file__).parent / "data"
V1 = DATA / "v1_checkpoint"
EXPECTED = DATA / "v1_checkpoint_expected.json"
NUM_MODULES = 2 * 7 + 1  # two decoder layers and the untied head


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture
def v1_copy(tmp_path) -> Path:
    out = tmp_path / "v1"
    shutil.copytree(V1, out)
    return out


def test_fixture_is_stored_as_version_1():
    """Guards the fixture itself: a rewritten fixture would test nothing."""
    quant = _config(V1)["quantization_config"]
    assert quant["format_version"] == 1
    assert all(spec["type"] == "quant_linear" and "kind" not in spec for spec in quant["modules"].values())


def test_v1_checkpoint_validates_and_is_upgraded():
    info = validate_checkpoint(V1)
    assert info.stored_version == 1
    assert info.quant.format_version == 2
    assert len(info.modules) == NUM_MODULES
    assert {spec.kind for spec in info.modules.values()} == {"int_affine"}
    down1 = info.modules["model.layers.1.mlp.down_proj"]  # the recipe's int4 override
    assert (down1.bits, down1.group_size, down1.in_features) == (4, 64, 64)
    assert info.modules["model.layers.0.self_attn.q_proj"].group_size == 16
    assert info.modules["lm_head"].bits == 8


def test_v1_checkpoint_logits_match_recorded_ones():
    expected = json.loads(EXPECTED.read_text())
    model = AutoModelForCausalLM.from_pretrained(V1, dtype=torch.float32).eval()
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    ids = torch.tensor(expected["input_ids"])
    with torch.inference_mode():
        logits = model(ids).logits[0].double()
    want = torch.tensor(expected["logits"], dtype=torch.float64)
    assert logits.shape == want.shape == (ids.shape[1], 128)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)


def test_inspect_describes_v1_checkpoint():
    summary = describe(V1)
    assert summary["format_version"] == 1 and summary["recipe"] == "v1-fixture"
    assert len(summary["modules"]) == NUM_MODULES
    q = summary["modules"]["model.layers.0.self_attn.q_proj"]
    assert (q["kind"], q["bits"], q["group_size"]) == ("int_affine", 4, 16)
    # v1 reports name only the last pass; describe() turns that into a one-entry history.
    assert [p["pass"] for p in q["passes"]] == ["rtn"]
    assert [p["pass"] for p in summary["modules"]["lm_head"]["passes"]] == ["finequant"]


def test_vllm_spec_accepts_v1_quantization_config():
    modules = parse_modules(_config(V1)["quantization_config"])
    assert len(modules) == NUM_MODULES
    assert modules["model.layers.0.mlp.gate_proj"].kind == "int_affine"
    assert modules["model.layers.0.mlp.gate_proj"].bits == 8


def test_v1_per_channel_group_size_is_upgraded(v1_copy):
    """Version 1 wrote ``group_size: -1`` for one scale per output channel; version 2 stores K."""
    cfg = _config(v1_copy)
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.gate_proj"]["group_size"] = -1
    (v1_copy / "config.json").write_text(json.dumps(cfg))
    assert validate_checkpoint(v1_copy).modules["model.layers.0.mlp.gate_proj"].group_size == 32


def test_unknown_future_version_is_a_one_line_error(v1_copy):
    cfg = _config(v1_copy)
    cfg["quantization_config"]["format_version"] = 3
    (v1_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(v1_copy)
    message = str(err.value)
    assert "\n" not in message
    assert "unsupported quantization_config.format_version 3" in message and "reads versions 1, 2" in message
    with pytest.raises(CheckpointError, match="format_version 3"):
        AutoModelForCausalLM.from_pretrained(v1_copy)
