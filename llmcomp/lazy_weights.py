"""Read individual tensors from a (sharded) safetensors checkpoint without loading the rest.

This is what lets the pipeline hold one decoder layer in memory at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmcomp.errors import LlmcompError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LazyWeights:
    """Name -> file index over ``model.safetensors`` or ``model.safetensors.index.json``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as fh:
                self._file_of = {name: single for name in fh.keys()}
        else:
            raise LlmcompError(
                f"{self.model_dir}: no model.safetensors or model.safetensors.index.json "
                "(llmcomp compresses safetensors checkpoints)"
            )

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load the given tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise LlmcompError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint")
            by_file.setdefault(self._file_of[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as fh:
                for name in group:
                    out[name] = fh.get_tensor(name)
        return out

    def shape_dtype(self, name: str) -> tuple[list[int], torch.dtype]:
        """Shape and dtype of one tensor, from the file header (nothing is read)."""
        with safe_open(str(self._file_of[name]), framework="pt") as fh:
            sl = fh.get_slice(name)
            return list(sl.get_shape()), _DTYPES[sl.get_dtype()]

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._file_of if n.startswith(prefix)]
