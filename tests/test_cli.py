"""The CLI: commands listed, compress/inspect work, bad input gives one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmcomp.cli.main import app

runner = CliRunner()


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("compress", "inspect", "demo", "recipes"):
        assert cmd in result.output


def test_compress_then_inspect(tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    result = runner.invoke(app, ["compress", str(tiny_llama_dir), "--recipe", "rtn-w8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "compression ratio" in result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert summary["modules"]["model.layers.0.mlp.down_proj"]["group_size"] == 160  # per-channel = K
    assert 8.0 < summary["average_bits_per_weight"] < 8.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "no/such/dir/", "--recipe", "rtn-w8", "-o", "X"], "not found"),
        (["compress", "smollm2-135m", "--recipe", "nope", "-o", "X"], "unknown recipe 'nope'"),
        (["inspect", "/nonexistent"], "is not a directory"),
        (["compress", ".", "--recipe", "rtn-w8", "-o", "X", "--shard-size", "lots"], "invalid size"),
        (["bench", "smollm2-135m", "--kernel", "cpu_w4a8,nope"], "unknown kernel 'nope'"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmcomp", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_inspect_rejects_plain_model(tiny_llama_dir):
    result = runner.invoke(app, ["inspect", str(tiny_llama_dir)])
    assert result.exit_code == 2
    assert "quant_method is not 'llmcomp'" in result.output


def test_inspect_shows_pruned_modules(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {num_samples: 4, seq_len: 32}\n"
                      "passes:\n  - {type: wanda, sparsity: 0.5, targets: ['*.mlp.*']}\n"
                      "  - {type: rtn, bits: 4, group_size: 32, targets: ['*.self_attn.*']}\n")
    out = tmp_path / "pq"
    assert runner.invoke(app, ["compress", str(tiny_llama_dir), "-r", str(recipe), "-o", str(out)]).exit_code == 0
    summary = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert summary["modules"]["model.layers.2.mlp.up_proj"]["kind"] == "dense"
    assert abs(summary["modules"]["model.layers.2.mlp.up_proj"]["sparsity"] - 0.5) < 1e-6
    assert summary["modules"]["model.layers.2.self_attn.o_proj"]["bits"] == 4
    names = list(summary["modules"])
    assert names.index("model.layers.2.mlp.down_proj") < names.index("model.layers.2.self_attn.k_proj")
