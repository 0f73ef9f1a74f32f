"""Write and validate llmcomp checkpoints (docs/FORMAT.md).

Writing: the pipeline records finished layers in ``OUT.partial`` (:mod:`llmcomp.formats.partial`);
:func:`write_checkpoint` then merges them into model shards inside an
:class:`~llmcomp.formats.atomic.AtomicDirectory`, writes ``config.json`` last, and the directory
is swapped into place only when complete. Validation reads only safetensors headers plus file
hashes, parses ``quantization_config`` through :mod:`llmcomp.scheme`, and every failure is one
line naming the file, tensor or field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmcomp.errors import CheckpointError
from llmcomp.scheme import FORMAT_VERSION, QUANT_METHOD, ModuleSpec, QuantizationConfig, parse_quantization_config

DEFAULT_SHARD_BYTES = 1024**3  # also bounds the writer's memory: one shard is buffered before it is written
INDEX_FILE = "model.safetensors.index.json"
RECIPE_FILE = "llmcomp_recipe.yaml"
REPORT_FILE = "llmcomp_report.json"
# Files of the source model copied verbatim (tokenizer, chat template, generation defaults).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "added_tokens.json",
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "write_checkpoint", "validate_checkpoint", "load_tensors"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(index: int, total: int) -> str:
    return "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def merge_shards(stage: Path, sources: list[Path], shard_bytes: int = DEFAULT_SHARD_BYTES,
                 convert: Any = None) -> dict[str, str]:
    """Stream the tensors of ``sources`` (in order) into model shards of about ``shard_bytes`` in
    ``stage``; returns tensor name -> shard file. ``convert(tensors) -> tensors`` may rewrite each
    source's tensors on the way (exporters). One shard is buffered in memory at a time."""
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    shards: list[list[str]] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(stage / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    seen: set[str] = set()
    for source in sources:
        with safe_open(str(source), framework="pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        if convert is not None:
            tensors = convert(tensors)
        for name, tensor in tensors.items():
            if name in seen:
                raise CheckpointError(f"tensor {name!r} written twice")
            seen.add(name)
            pending[name] = tensor.contiguous()
            pending_bytes += tensor.numel() * tensor.element_size()
        if pending_bytes >= shard_bytes:
            flush()
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = shard_name(i, len(shards))
        os.replace(stage / f"shard-{i:05d}.tmp", stage / final)
        weight_map.update({n: final for n in names})
    if len(shards) > 1:
        total = sum((stage / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return weight_map


def tensor_files_meta(stage: Path, weight_map: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{file: {bytes, sha256}}`` of the shards, for ``quantization_config.files``."""
    return {f: {"bytes": (stage / f).stat().st_size, "sha256": sha256_file(stage / f)}
            for f in sorted(set(weight_map.values()))}


def copy_side_files(source_dir: Path, stage: Path) -> None:
    for fname in SIDE_FILES:
        if (source_dir / fname).is_file():
            shutil.copy2(source_dir / fname, stage / fname)


def quantization_config(modules: dict[str, ModuleSpec], files: dict[str, dict[str, Any]] | None = None,
                        **extra: Any) -> dict[str, Any]:
    """The ``quantization_config`` of a new (version 2) checkpoint."""
    from llmcomp import __version__

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmcomp_version": __version__,
        "modules": {name: spec.model_dump(mode="json") for name, spec in modules.items()},
        **({"files": files} if files is not None else {}),
        **extra,
    }


def write_checkpoint(stage: Path, sources: list[Path], config: dict[str, Any], modules: dict[str, ModuleSpec],
                     side_files: Any = None, shard_bytes: int = DEFAULT_SHARD_BYTES, copy_from: Path | None = None,
                     **quant_extra: Any) -> int:
    """Write a whole checkpoint into ``stage`` (an AtomicDirectory's path); returns its tensor bytes.

    Shards first, then the source model's side files, then ``side_files(tensor_bytes)`` (name ->
    content, e.g. the report, which states the final size), and ``config.json`` last.
    """
    weight_map = merge_shards(stage, sources, shard_bytes)
    files = tensor_files_meta(stage, weight_map)
    tensor_bytes = sum(f["bytes"] for f in files.values())
    if copy_from is not None:
        copy_side_files(copy_from, stage)
    for fname, content in (side_files(tensor_bytes) if side_files else {}).items():
        with open(stage / fname, "wb" if isinstance(content, bytes) else "w") as fh:
            fh.write(content)
    config = dict(config)
    config["quantization_config"] = quantization_config(modules, files, **quant_extra)
    (stage / "config.json").write_text(json.dumps(config, indent=2))
    return tensor_bytes


# -- validation ----------------------------------------------------------------------------------
@dataclass
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    quant: QuantizationConfig  # parsed and upgraded to the current version
    stored_version: int  # the format_version the checkpoint was written with
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, ModuleSpec]:
        return self.quant.modules

    @property
    def files(self) -> dict[str, int]:
        return {name: entry.bytes for name, entry in self.quant.files.items()}

    def report(self) -> dict[str, Any] | None:
        path = self.path / REPORT_FILE
        return json.loads(path.read_text()) if path.is_file() else None


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_entry(fname: str, name: str, entry: Any) -> TensorInfo:
    """One tensor of a safetensors header: dtype, shape and byte range must agree."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{fname}: header entry {name!r} is not a mapping")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{fname}: tensor {name!r} has unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{fname}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{fname}: tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _ITEMSIZE[dtype_name]:
        raise CheckpointError(f"{fname}: tensor {name!r}: data_offsets do not match its shape and dtype")
    return TensorInfo(fname, _SAFETENSORS_DTYPES[dtype_name], tuple(shape))


def _read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header; a truncated or garbled file gives a one-line error."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: truncated (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path.name}: truncated or corrupt header")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8, integers too long to parse
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a mapping)")
    entries = {k: _check_entry(path.name, k, v) for k, v in header.items() if k != "__metadata__"}
    end = max((header[k]["data_offsets"][1] for k in entries), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path.name}: truncated ({size} bytes, header needs {8 + header_len + end})")
    return entries


def _load_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a model directory, or an interrupted write)")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8, integers too long to parse
        raise CheckpointError(f"{cfg_path}: invalid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    return config


def validate_checkpoint(path: str | Path, verify_hashes: bool = True) -> CheckpointInfo:
    """Check config, files, hashes and every tensor each module spec expects (names, shapes, dtypes)."""
    from llmcomp.modules.registry import build_module

    path = Path(path)
    config = _load_config(path)
    raw = config.get("quantization_config")
    quant = parse_quantization_config(raw, where=f"{path}/config.json")
    if not quant.files:
        raise CheckpointError(f"{path}/config.json: quantization_config.files is missing")
    info = CheckpointInfo(path, config, quant, int(raw["format_version"]))
    for fname, meta in quant.files.items():
        fpath = path / fname
        if Path(fname).name != fname or not fpath.is_file():
            raise CheckpointError(f"{path}: missing tensor file {fname}")
        size = fpath.stat().st_size
        if size != meta.bytes:
            raise CheckpointError(f"{fname}: size {size} bytes, expected {meta.bytes} (truncated or replaced)")
        header = _read_header(fpath)
        if verify_hashes and sha256_file(fpath) != meta.sha256:
            raise CheckpointError(f"{fname}: SHA-256 mismatch (file corrupted or replaced)")
        for name, tensor in header.items():
            if name in info.tensors:
                raise CheckpointError(f"{fname}: tensor {name!r} also appears in {info.tensors[name].file}")
            info.tensors[name] = tensor
    for name, spec in info.modules.items():
        with torch.device("meta"):
            module = build_module(name, spec, torch.float32)
        for tname, expected in module.state_dict().items():
            full = f"{name}.{tname}"
            found = info.tensors.get(full)
            if found is None:
                raise CheckpointError(f"{path.name}: missing tensor {full!r} required by module spec {spec.kind}")
            if found.shape != tuple(expected.shape):
                raise CheckpointError(
                    f"{found.file}: tensor {full!r} has shape {list(found.shape)}, spec expects {list(expected.shape)}"
                )
            if (expected.dtype.is_floating_point != found.dtype.is_floating_point) or (
                not expected.dtype.is_floating_point and expected.dtype != found.dtype
            ):
                raise CheckpointError(
                    f"{found.file}: tensor {full!r} has dtype {found.dtype}, expected {expected.dtype}"
                )
    return info


def load_tensors(info: CheckpointInfo, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``names``) from a validated checkpoint."""
    wanted = list(info.tensors) if names is None else names
    by_file: dict[str, list[str]] = {}
    for n in wanted:
        by_file.setdefault(info.tensors[n].file, []).append(n)
    out = {}
    for fname, tnames in by_file.items():
        with safe_open(str(info.path / fname), framework="pt") as fh:
            for n in tnames:
                out[n] = fh.get_tensor(n)
    return out
