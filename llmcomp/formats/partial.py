"""Progress of one compression run on disk, so ``llmcomp compress --resume`` can continue it.

``OUT.partial/`` holds one safetensors file per finished decoder layer, the calibration inputs
of the next layer (the outputs of the compressed layers so far), and ``manifest.json``: what the
run was started with (its fingerprint) and the pipeline's progress (reports, specs, pass state).
Every file is written to a temporary name and renamed; the manifest is renamed last, so after a
crash, ``kill -9`` or Ctrl-C the directory always describes a consistent prefix of the layers.
Resuming loads the saved inputs instead of recomputing them, which keeps the result bit-identical
to an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmcomp.errors import CheckpointError
from llmcomp.formats.atomic import fsync_dir, write_file_atomic

MANIFEST = "manifest.json"
LOCK = "lock"
PARTIAL_SUFFIX = ".partial"
MANIFEST_VERSION = 1


def partial_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def _inputs_file(index: int) -> str:
    return f"inputs-after-{index:05d}.pt"


class PartialRun:
    """Open (or create) ``OUT.partial`` for a run with ``fingerprint``; see the module doc."""

    def __init__(self, output: str | Path, fingerprint: dict[str, Any], resume: bool, resume_hint: str) -> None:
        self.dir = partial_dir(output)
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK, "w")  # noqa: SIM115  (held for the whole run)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CheckpointError(f"{self.dir} is in use by another llmcomp compress run") from None
        path = self.dir / MANIFEST
        self.manifest: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if self.layers_done == 0:  # nothing worth keeping: start afresh
            self.manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "layers_done": 0}
            self._drop_unrecorded()
            write_file_atomic(path, json.dumps(self.manifest, indent=1))
            self.resumed = False
            return
        done, total = self.layers_done, self.manifest.get("num_layers", "?")
        if not resume:
            self.close()
            raise CheckpointError(
                f"{self.dir} holds an interrupted compression ({done}/{total} layers done); continue it "
                f"with `{resume_hint}`, or delete it (rm -r {self.dir})"
            )
        saved = self.manifest.get("fingerprint", {})
        if saved != fingerprint:
            differs = sorted(k for k in set(fingerprint) | set(saved) if fingerprint.get(k) != saved.get(k))
            self.close()
            raise CheckpointError(
                f"{self.dir} was started with different settings ({', '.join(differs)} differ); resume with the "
                f"same model, recipe and dtype, or delete it (rm -r {self.dir})"
            )
        self._drop_unrecorded()
        self.resumed = True

    # -- reading --------------------------------------------------------------------------------
    @property
    def layers_done(self) -> int:
        return int(self.manifest.get("layers_done", 0))

    @property
    def progress(self) -> dict[str, Any]:
        """The pipeline's own progress record, as saved with the last finished layer."""
        return self.manifest.get("progress", {})

    def load_inputs(self) -> Any:
        """The calibration inputs of layer ``layers_done`` (None if the run keeps none)."""
        path = self.dir / _inputs_file(self.layers_done - 1)
        if not path.is_file():
            return None
        return torch.load(path, weights_only=True)

    def tensor_files(self) -> list[Path]:
        """Per-layer files in layer order, then the head file if written."""
        files = [self.dir / layer_file(i) for i in range(self.layers_done)]
        head = self.dir / "head.safetensors"
        return files + ([head] if head.is_file() else [])

    # -- writing --------------------------------------------------------------------------------
    def record_layer(self, index: int, num_layers: int, tensors: dict[str, torch.Tensor], inputs: Any,
                     progress: dict[str, Any]) -> None:
        """Layer ``index`` is finished: its tensors, the next layer's inputs, then the manifest."""
        if index != self.layers_done:
            raise RuntimeError(f"layer {index} recorded out of order (expected {self.layers_done})")
        self._save_tensors(layer_file(index), tensors)
        if inputs is not None and index + 1 < num_layers:
            tmp = self.dir / f".{_inputs_file(index)}.tmp"
            torch.save(inputs, tmp)
            os.replace(tmp, self.dir / _inputs_file(index))
        self.manifest.update(layers_done=index + 1, num_layers=num_layers, progress=progress)
        write_file_atomic(self.dir / MANIFEST, json.dumps(self.manifest, indent=1, default=str))
        fsync_dir(self.dir)
        old = self.dir / _inputs_file(index - 1)
        if old.exists():
            old.unlink()

    def record_head(self, tensors: dict[str, torch.Tensor]) -> None:
        self._save_tensors("head.safetensors", tensors)

    def _save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / f".{name}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / name)

    def _drop_unrecorded(self) -> None:
        """Files a crash left behind after the last manifest update."""
        keep = {MANIFEST, LOCK, _inputs_file(self.layers_done - 1)} | {layer_file(i) for i in range(self.layers_done)}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink()

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def remove(self) -> None:
        """The run is committed: the progress is no longer needed."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
