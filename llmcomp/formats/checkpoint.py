"""Write and validate llmcomp checkpoints (docs/FORMAT.md).

Writing is streaming and atomic: tensors go to shards in ``OUT.tmp-<pid>`` as the pipeline
produces them, ``config.json`` is written last, and the directory is renamed into place only when
complete. Validation reads only safetensors headers plus file hashes, and every failure is one
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

FORMAT_VERSION = 1
QUANT_METHOD = "llmcomp"
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Streams tensors into shards inside a temporary directory; ``commit`` makes it visible.

    Use as a context manager: leaving the block with an exception (Ctrl-C included) deletes the
    temporary directory, so no partial checkpoint is ever left under the output name.
    """

    def __init__(self, output_dir: str | Path, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.output_dir = Path(output_dir)
        if self.output_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.output_dir} already exists; pass --overwrite to replace it")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise CheckpointError(f"{self.output_dir} exists and is not a directory")
        self.overwrite = overwrite
        self.shard_bytes = shard_bytes
        self.tmp_dir = self.output_dir.with_name(f"{self.output_dir.name}.tmp-{os.getpid()}")
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self._names: set[str] = set()
        self.committed = False

    def __enter__(self) -> CheckpointWriter:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._names:
                raise CheckpointError(f"tensor {name!r} written twice")
            self._names.add(name)
            t = tensor.detach().to("cpu").contiguous()
            self._pending[name] = t
            self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.tmp_dir / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def commit(self, config: dict[str, Any], side_files: dict[str, str | bytes] | None = None,
               copy_from: Path | None = None) -> Path:
        """Finish shards, write side files and ``config.json`` (last), then rename into place."""
        self._flush()
        total = len(self._shards)
        weight_map, files = {}, {}
        for i, (tmp_name, names) in enumerate(self._shards):
            final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.tmp_dir / tmp_name, self.tmp_dir / final)
            files[final] = {"bytes": (self.tmp_dir / final).stat().st_size, "sha256": sha256_file(self.tmp_dir / final)}
            weight_map.update({n: final for n in names})
        if total > 1:
            total_size = sum(f["bytes"] for f in files.values())
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if copy_from is not None:
            for fname in SIDE_FILES:
                if (copy_from / fname).is_file():
                    shutil.copy2(copy_from / fname, self.tmp_dir / fname)
        for fname, content in (side_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.tmp_dir / fname, mode) as fh:
                fh.write(content)
        config = dict(config)
        config["quantization_config"] = {**config["quantization_config"], "files": files}
        (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False))
        for path in self.tmp_dir.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(self.tmp_dir)
        self._swap_into_place()
        self.committed = True
        return self.output_dir

    def _swap_into_place(self) -> None:
        old = None
        if self.output_dir.exists():
            old = self.output_dir.with_name(f"{self.output_dir.name}.old-{os.getpid()}")
            os.replace(self.output_dir, old)
        os.replace(self.tmp_dir, self.output_dir)
        _fsync_dir(self.output_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def quantization_config(modules: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    from llmcomp import __version__

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmcomp_version": __version__,
        "modules": modules,
        **extra,
    }


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
    quant_config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.quant_config.get("modules", {})

    def report(self) -> dict[str, Any] | None:
        path = self.path / REPORT_FILE
        return json.loads(path.read_text()) if path.is_file() else None


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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path.name}: truncated ({size} bytes, header needs {8 + header_len + end})")
    return header


def _load_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a model directory, or an interrupted write)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from None


def validate_checkpoint(path: str | Path, verify_hashes: bool = True) -> CheckpointInfo:
    """Check config, files, hashes and every tensor each module spec expects (names, shapes, dtypes)."""
    from llmcomp.modules.registry import build_module

    path = Path(path)
    config = _load_config(path)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}/config.json: quantization_config.quant_method is not {QUANT_METHOD!r}")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}/config.json: unsupported quantization_config.format_version {version!r} "
            f"(this llmcomp reads version {FORMAT_VERSION})"
        )
    if not isinstance(qc.get("modules"), dict):
        raise CheckpointError(f"{path}/config.json: quantization_config.modules is missing or not a mapping")
    files = qc.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}/config.json: quantization_config.files is missing")
    info = CheckpointInfo(path, config, qc)
    for fname, meta in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{path}: missing tensor file {fname}")
        size = fpath.stat().st_size
        if size != meta.get("bytes"):
            raise CheckpointError(f"{fname}: size {size} bytes, expected {meta.get('bytes')} (truncated or replaced)")
        header = _read_header(fpath)
        if verify_hashes and sha256_file(fpath) != meta.get("sha256"):
            raise CheckpointError(f"{fname}: SHA-256 mismatch (file corrupted or replaced)")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in info.tensors:
                raise CheckpointError(f"{fname}: tensor {name!r} also appears in {info.tensors[name].file}")
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{fname}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            info.tensors[name] = TensorInfo(fname, dtype, tuple(entry["shape"]))
    for name, spec in info.modules.items():
        with torch.device("meta"):
            module = build_module(name, spec, torch.float32)
        for tname, expected in module.state_dict().items():
            full = f"{name}.{tname}"
            found = info.tensors.get(full)
            if found is None:
                raise CheckpointError(
                    f"{path.name}: missing tensor {full!r} required by module spec {spec.get('type')}"
                )
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
