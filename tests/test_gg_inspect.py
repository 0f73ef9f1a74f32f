"""``llmcomp inspect --gg`` / ``--plot``: shapes match a fit of the loaded model's weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmcomp  # noqa: F401
from llmcomp import gg
from llmcomp.cli.main import app
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mixed_checkpoint(tiny_llama_factory, tmp_path_factory):
    """fp8 codebook q/k/v, the rest dense: both kinds of module in one checkpoint (one layer: plots are slow)."""
    src = tmp_path_factory.mktemp("gg-src")
    tiny_llama_factory(src, num_hidden_layers=1)
    recipe = recipe_from_dict({"passes": [{"type": "codebook", "format": "fp8-e4m3", "targets": ["*.self_attn.*_proj"],
                                           "ignore": ["*.o_proj"]}]})
    out = tmp_path_factory.mktemp("gg") / "ckpt"
    return compress(str(src), recipe, out, progress=False).output_dir


def test_inspect_gg_json_matches_fits_of_loaded_weights(mixed_checkpoint):
    result = runner.invoke(app, ["inspect", str(mixed_checkpoint), "--gg", "--json"])
    assert result.exit_code == 0, result.output
    shapes = json.loads(result.output)["gg"]
    model = AutoModelForCausalLM.from_pretrained(mixed_checkpoint)
    kinds = set()
    for name, fit in shapes.items():
        mod = model.get_submodule(name)
        w = mod.dequantized_weight() if hasattr(mod, "dequantized_weight") else mod.weight.detach().float()
        assert fit["shape"] == pytest.approx(gg.fit(w).shape, rel=1e-6)
        kinds.add(fit["kind"])
    assert kinds == {"codebook", "dense"}
    n_linear = sum(isinstance(m, torch.nn.Linear) or hasattr(m, "dequantized_weight")
                   for n, m in model.model.layers.named_modules() if n.count(".") == 2)
    assert len(shapes) == n_linear


def test_inspect_plot_writes_pngs(mixed_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    result = runner.invoke(app, ["inspect", str(mixed_checkpoint), "--gg", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert "GG shape nu" in result.output
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert not list(out.glob(".*.tmp"))
    assert (out / "model.layers.0.self_attn.q_proj.png").is_file()
