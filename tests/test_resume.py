"""Interrupted compressions resume from ``OUT.partial`` and give bit-identical checkpoints.

Interruptions: a KeyboardInterrupt from the layer callback (in process), Ctrl-C (SIGINT) to the CLI,
and ``kill -9`` of the CLI on the embedded SmolLM2 (slow test).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from llmcomp.errors import CheckpointError
from llmcomp.formats.checkpoint import load_tensors, validate_checkpoint
from llmcomp.formats.partial import MANIFEST, layer_file, partial_dir
from llmcomp.pipeline import Pipeline, compress
from llmcomp.recipes import recipe_from_dict

# Calibration-dependent on purpose: a resumed run must reload the saved inputs of the next layer,
# not recompute them from the uncompressed model.
RECIPE = {"calibration": {"num_samples": 4, "seq_len": 32},
          "passes": [{"type": "wanda", "sparsity": 0.5}, {"type": "finequant", "bits": 4, "activation_aware": True}]}


def _interrupt_at(index: int):
    def on_layer(i: int, n: int) -> None:
        if i == index:
            raise KeyboardInterrupt

    return on_layer


def _manifest(out: Path) -> dict:
    return json.loads((partial_dir(out) / MANIFEST).read_text())


def assert_bit_identical(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bits), same module specs, same per-module reports."""
    ta, tb = load_tensors(validate_checkpoint(a)), load_tensors(validate_checkpoint(b))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    qa, qb = (json.loads((p / "config.json").read_text())["quantization_config"] for p in (a, b))
    assert qa["modules"] == qb["modules"]
    ra, rb = (json.loads((p / "llmcomp_report.json").read_text()) for p in (a, b))
    assert ra["modules"] == rb["modules"] and ra["calibration"] == rb["calibration"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    compress(str(tiny_llama_dir), recipe_from_dict(RECIPE), out, progress=False)
    return out


@pytest.fixture
def interrupted(tiny_llama_dir, tmp_path) -> Path:
    """A run stopped by Ctrl-C after layer 1 of 3 was recorded."""
    out = tmp_path / "out"
    pipe = Pipeline(str(tiny_llama_dir), recipe_from_dict(RECIPE), progress=False)
    with pytest.raises(KeyboardInterrupt):
        pipe.run(out, on_layer=_interrupt_at(1))
    return out


def test_interrupted_run_resumes_bit_identically(tiny_llama_dir, interrupted, uninterrupted):
    out = interrupted
    assert not out.exists()
    manifest = _manifest(out)
    assert manifest["layers_done"] == 2 and manifest["num_layers"] == 3
    assert sorted(p.name for p in partial_dir(out).glob("layer-*")) == [layer_file(0), layer_file(1)]

    with pytest.raises(CheckpointError, match=r"holds an interrupted compression \(2/3 layers done\)") as err:
        compress(str(tiny_llama_dir), recipe_from_dict(RECIPE), out, progress=False)
    assert "\n" not in str(err.value) and "--resume" in str(err.value)
    assert _manifest(out) == manifest  # refusing did not touch the progress

    layers_run: list[int] = []
    pipe = Pipeline(str(tiny_llama_dir), recipe_from_dict(RECIPE), progress=False)
    result = pipe.run(out, resume=True, on_layer=lambda i, n: layers_run.append(i))
    assert layers_run == [2]  # only the unrecorded layer was compressed again
    assert result.report["resumed"] is True
    assert json.loads((out / "llmcomp_report.json").read_text())["resumed"] is True
    assert not partial_dir(out).exists()
    assert_bit_identical(out, uninterrupted)
    assert json.loads((uninterrupted / "llmcomp_report.json").read_text())["resumed"] is False


def test_resume_with_other_settings_names_what_differs(tiny_llama_dir, interrupted):
    out = interrupted
    manifest = _manifest(out)
    other = {**RECIPE, "passes": [{"type": "wanda", "sparsity": 0.6}, RECIPE["passes"][1]]}
    cases = [
        ({"recipe": recipe_from_dict(other)}, r"\(recipe differ\)"),
        ({"dtype": "bfloat16"}, r"\(dtype differ\)"),
        ({"calibration_text": "some other text " * 100}, r"\(calibration_text_sha256 differ\)"),
    ]
    for kwargs, differs in cases:
        recipe = kwargs.pop("recipe", recipe_from_dict(RECIPE))
        with pytest.raises(CheckpointError, match=r"was started with different settings " + differs) as err:
            compress(str(tiny_llama_dir), recipe, out, progress=False, resume=True, **kwargs)
        assert "\n" not in str(err.value)
        assert _manifest(out) == manifest and not out.exists()
    with pytest.raises(CheckpointError, match=r"\(dtype, recipe differ\)"):
        compress(str(tiny_llama_dir), recipe_from_dict(other), out, progress=False, resume=True, dtype="bfloat16")


# -- the CLI ----------------------------------------------------------------------------------------
def _wait_for_layers(proc: subprocess.Popen, out: Path, layers: int, log: Path, timeout: float = 300) -> None:
    """Poll ``OUT.partial/manifest.json`` until ``layers`` are recorded (the run must still be going)."""
    manifest = partial_dir(out) / MANIFEST
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"compress exited early ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if json.loads(manifest.read_text()).get("layers_done", 0) >= layers:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {layers} layers recorded after {timeout}s")


def _llmcomp(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmcomp", *args]


LAYERS = 16


def test_ctrl_c_prints_the_resume_command_which_completes(tiny_llama_factory, tmp_path):
    """SIGINT mid-run: exit 130, one message naming the resume command, no traceback; running that
    command finishes the checkpoint."""
    src = tmp_path / "src"
    tiny_llama_factory(src, seed=1, num_hidden_layers=LAYERS)  # layers left to run when the signal comes
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "calibration": {"num_samples": 16, "seq_len": 64}}))
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err, open(tmp_path / "stdout.txt", "w") as stdout:
        # SIGINT back to its default in the child: a test run started in the background (nohup, `&`)
        # inherits it ignored, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(_llmcomp("compress", str(src), "--recipe", str(recipe), "-o", str(out)),
                                stdout=stdout, stderr=err, cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            _wait_for_layers(proc, out, 1, log)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    done = _manifest(out)["layers_done"]
    assert 1 <= done < LAYERS, "the run finished before the interrupt arrived"
    assert f"{done}/{LAYERS} layers are saved in {partial_dir(out)}" in stderr
    assert "resume with: llmcomp compress" in stderr
    command = shlex.split(stderr.split("resume with: ", 1)[1].splitlines()[0])
    assert command[:2] == ["llmcomp", "compress"] and command[-1] == "--resume"

    proc2 = subprocess.run(_llmcomp(*command[1:]), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    info = validate_checkpoint(out)
    assert len(info.modules) == LAYERS * 7
    assert info.report()["resumed"] is True
    assert not partial_dir(out).exists()


@pytest.mark.slow
def test_kill_9_on_smollm2_resumes_bit_identically(tmp_path):
    """``kill -9`` of the CLI on the 30-layer SmolLM2, then ``--resume``: every tensor equals an
    uninterrupted run's."""
    recipe_data = {"calibration": {"num_samples": 8, "seq_len": 128},
                   "passes": [{"type": "wanda", "sparsity": 0.5}, {"type": "rtn", "bits": 4, "group_size": 64}]}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data))
    out = tmp_path / "out"
    args = ["compress", "smollm2-135m", "--recipe", str(recipe), "-o", str(out)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(_llmcomp(*args), stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
        try:
            _wait_for_layers(proc, out, 5, log)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not out.exists()
    done = _manifest(out)["layers_done"]
    assert 5 <= done < 30

    resumed = subprocess.run(_llmcomp(*args, "--resume"), capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial_dir(out).exists()
    report = json.loads((out / "llmcomp_report.json").read_text())
    assert report["resumed"] is True and len(report["layer_seconds"]) == 30

    reference = compress("smollm2-135m", recipe_from_dict(recipe_data), tmp_path / "reference", progress=False)
    assert reference.report["resumed"] is False
    assert_bit_identical(out, reference.output_dir)
