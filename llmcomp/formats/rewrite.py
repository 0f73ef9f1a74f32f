"""Rewrite an existing llmcomp checkpoint with some tensors replaced, added or dropped.

Why one helper: steps that change a finished checkpoint (``llmcomp heal`` writes trained cores,
``llmcomp quantize-cores`` swaps float cores for codes) must keep every other tensor in its shard,
the side files, a consistent shard index, fresh file hashes in config.json and the report, and
write all of it atomically.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmcomp.formats.atomic import AtomicDirectory, write_file_atomic
from llmcomp.formats.checkpoint import (
    INDEX_FILE,
    REPORT_FILE,
    CheckpointInfo,
    load_tensors,
    tensor_files_meta,
)

# edit(quantization_config, report): both dicts changed in place before they are written
Edit = Callable[[dict[str, Any], dict[str, Any]], None]


def rewrite_checkpoint(info: CheckpointInfo, ckpt: Path, output: Path, overwrite: bool,
                       replaced: Mapping[str, Mapping[str, torch.Tensor]], dropped: Collection[str] = (),
                       edit: Edit | None = None) -> None:
    """Write ``output`` as a copy of ``ckpt`` (described by ``info``) in which ``replaced[shard]``
    overrides or adds tensors of that shard file and ``dropped`` tensors are left out.

    Shards keep their names, the index (if any) lists the new tensors, ``quantization_config.files``
    gets the new sizes and hashes, and ``edit`` may change the quantization config and the report.
    """
    with AtomicDirectory(output, overwrite) as stage:
        for item in ckpt.iterdir():
            if item.is_file() and item.name not in info.files and item.name not in ("config.json", INDEX_FILE):
                shutil.copy2(item, stage.path / item.name)
        weight_map: dict[str, str] = {}
        for fname in info.files:
            kept = [n for n, t in info.tensors.items() if t.file == fname and n not in dropped]
            tensors = {**load_tensors(info, kept), **replaced.get(fname, {})}
            save_file(tensors, str(stage.path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
        if (ckpt / INDEX_FILE).is_file():
            index = json.loads((ckpt / INDEX_FILE).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = sum((stage.path / f).stat().st_size for f in info.files)
            (stage.path / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config = json.loads((ckpt / "config.json").read_text())
        qc = config["quantization_config"]
        qc["files"] = tensor_files_meta(stage.path, weight_map)
        report_path = stage.path / REPORT_FILE
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if edit is not None:
            edit(qc, report)
        report_path.write_text(json.dumps(report, indent=2, default=str))
        write_file_atomic(stage.path / "config.json", json.dumps(config, indent=2))
        stage.commit()
