"""Checkpoint validation errors and atomic writes (resume: tests/test_resume.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmcomp.errors import CheckpointError
from llmcomp.formats.atomic import AtomicDirectory
from llmcomp.formats.checkpoint import sha256_file, validate_checkpoint
from llmcomp.pipeline import Pipeline, compress
from llmcomp.recipes import recipe_from_dict

RTN4 = {"passes": [{"type": "rtn", "bits": 4, "group_size": 32}]}


@pytest.fixture(scope="module")
def good_ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "q4"
    compress(str(tiny_llama_dir), recipe_from_dict(RTN4), out, progress=False)
    return out


@pytest.fixture
def ckpt(good_ckpt, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(good_ckpt, copy)
    return copy


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(path: Path, fn) -> None:
    """Change the tensor file and keep the recorded size/hash consistent, to reach deeper checks."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)

    def fix(cfg):
        entry = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        cfg["quantization_config"]["files"]["model.safetensors"] = entry

    _edit_config(path, fix)


def test_valid_checkpoint_passes(good_ckpt):
    info = validate_checkpoint(good_ckpt)
    assert len(info.modules) == 3 * 7


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: size .* expected"):
        validate_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_corrupted_bytes_detected_by_hash(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        validate_checkpoint(ckpt)


def test_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight_scale'"):
        validate_checkpoint(ckpt)


def test_shape_mismatch(ckpt):
    def shrink(t):
        name = "model.layers.0.self_attn.q_proj.weight_scale"
        t[name] = t[name][:, :1].contiguous()

    _rewrite_tensors(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.weight_scale' has shape \[64, 1\]"):
        validate_checkpoint(ckpt)


def test_dtype_mismatch(ckpt):
    def to_float(t):
        t["model.layers.0.mlp.down_proj.weight_packed"] = t["model.layers.0.mlp.down_proj.weight_packed"].float()

    _rewrite_tensors(ckpt, to_float)
    with pytest.raises(CheckpointError, match=r"down_proj.weight_packed' has dtype torch.float32"):
        validate_checkpoint(ckpt)


def test_spec_mismatch_names_the_field(ckpt):
    modules = "quantization_config", "modules"
    _edit_config(ckpt, lambda c: c[modules[0]][modules[1]]["model.layers.2.mlp.gate_proj"].update(group_size=16))
    with pytest.raises(CheckpointError, match="gate_proj.weight_scale' has shape"):
        validate_checkpoint(ckpt)


def test_unknown_version_and_kind(ckpt):
    assert validate_checkpoint(ckpt).stored_version == 2
    _edit_config(ckpt, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="unsupported quantization_config.format_version 99"):
        validate_checkpoint(ckpt)
    _edit_config(ckpt, lambda c: c["quantization_config"].update(format_version=2))
    _edit_config(ckpt, lambda c: c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"].update(kind="zzz"))
    with pytest.raises(CheckpointError, match="module 'model.layers.0.mlp.up_proj' has unknown kind 'zzz'"):
        validate_checkpoint(ckpt)


def test_missing_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing tensor file model.safetensors"):
        validate_checkpoint(ckpt)


def test_interrupted_compression_leaves_no_output(tiny_llama_dir, tmp_path):
    out = tmp_path / "partial"
    pipe = Pipeline(str(tiny_llama_dir), recipe_from_dict(RTN4), progress=False)

    def interrupt(i, n):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.run(out, on_layer=interrupt)
    assert not out.exists()  # never half a checkpoint under the output name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.partial"]  # only the resumable progress


def test_overwrite_is_atomic_and_required(tiny_llama_dir, good_ckpt, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(good_ckpt, out)
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        compress(str(tiny_llama_dir), recipe_from_dict(RTN4), out, progress=False)
    pipe = Pipeline(str(tiny_llama_dir), recipe_from_dict(RTN4), progress=False)

    def interrupt(i, n):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pipe.run(out, overwrite=True, on_layer=interrupt)
    validate_checkpoint(out)  # the old checkpoint is untouched by the failed overwrite
    rtn8 = recipe_from_dict({"passes": [{"type": "rtn", "bits": 8}]})
    with pytest.raises(CheckpointError, match=r"holds an interrupted compression \(1/3 layers done\)"):
        compress(str(tiny_llama_dir), rtn8, out, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match="started with different settings \\(recipe differ"):
        compress(str(tiny_llama_dir), rtn8, out, overwrite=True, progress=False, resume=True)
    compress(str(tiny_llama_dir), recipe_from_dict(RTN4), out, overwrite=True, progress=False, resume=True)
    assert validate_checkpoint(out).modules["model.layers.0.mlp.up_proj"].bits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_sharded_checkpoint_roundtrip(tiny_llama_dir, tmp_path):
    out = compress(str(tiny_llama_dir), recipe_from_dict(RTN4), tmp_path / "s", progress=False,
                   shard_bytes=30_000).output_dir
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (out / "model.safetensors.index.json").is_file()
    single = compress(str(tiny_llama_dir), recipe_from_dict(RTN4), tmp_path / "one", progress=False).output_dir
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(single).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_atomic_directory_cleans_up_on_error(tmp_path):
    out = tmp_path / "w"
    with pytest.raises(ValueError), AtomicDirectory(out) as stage:
        (stage.path / "a.txt").write_text("half")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with AtomicDirectory(out) as stage:
        (stage.path / "a.txt").write_text("whole")
        stage.commit()
    assert (out / "a.txt").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["w"]


@pytest.mark.parametrize("order", ["llmcomp-first", "transformers-first"])
def test_import_llmcomp_registers_the_format(good_ckpt, order):
    """``import llmcomp`` stays cheap yet from_pretrained sees the format, whatever the import order."""
    import subprocess
    import sys

    imports = ["import llmcomp", "from transformers import AutoModelForCausalLM"]
    if order == "transformers-first":
        imports.reverse()
    code = "\n".join([
        "import sys",
        "import llmcomp" if order == "llmcomp-first" else "pass",
        "assert 'transformers.quantizers.auto' not in sys.modules or "
        f"{order == 'transformers-first'}, 'import llmcomp pulled in the quantizer registry'",
        *imports,
        f"m = AutoModelForCausalLM.from_pretrained({str(good_ckpt)!r})",
        "print(type(m.model.layers[0].mlp.up_proj).__name__)",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "QuantLinear"
