"""Model size for comparisons and plots: bytes on disk and average bits per weight.

Bits per weight is averaged over the *decoder-layer linear weights* (what compression touches),
so a bf16 baseline reads 16.0 and a 4-bit group-64 checkpoint about 4.25, whatever the
embeddings cost. Sources, in order: ``llmcomp_report.json``'s ``average_bits_per_weight``; else
the safetensors headers (packed weights + scales + zero points over the logical ``weight_shape``);
else nothing (a hub id that is not a local directory).
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT_FILE = "llmcomp_report.json"
REPORT_BITS_KEY = "average_bits_per_weight"
WEIGHT_FILE_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
HEADER_LEN_BYTES = 8
DECODER_LAYER_MARK = ".layers."
STORAGE_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point")  # what the weights cost
AUX_SUFFIXES = (*STORAGE_SUFFIXES, "weight_shape")
BITS_PER_BYTE = 8


@dataclass(frozen=True)
class ModelSize:
    """``disk_bytes`` of weight files; ``bits_per_weight`` over decoder linears; how it was found."""

    disk_bytes: int | None
    bits_per_weight: float | None
    parameters: int | None
    bits_source: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def disk_mb(self) -> float | None:
        return None if self.disk_bytes is None else self.disk_bytes / 2**20


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor entries (dtype, shape, data_offsets) of one safetensors file, without loading data."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(HEADER_LEN_BYTES))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def _report_bits(directory: Path) -> float | None:
    path = directory / REPORT_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get(REPORT_BITS_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _weight_shape(directory: Path, file: str, name: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(directory / file), framework="pt") as fh:
        return [int(v) for v in fh.get_tensor(name).tolist()]


def header_bits(directory: Path) -> tuple[float | None, int]:
    """(bits per decoder-linear weight, logical parameter count) from safetensors headers."""
    modules: dict[str, dict[str, tuple[str, dict]]] = defaultdict(dict)
    for file in sorted(directory.glob("*.safetensors")):
        for name, entry in read_safetensors_header(file).items():
            prefix, _, leaf = name.rpartition(".")
            modules[prefix][leaf] = (file.name, entry)
    linear_bytes = linear_params = parameters = 0
    for prefix, tensors in modules.items():
        nbytes = {leaf: e["data_offsets"][1] - e["data_offsets"][0] for leaf, (_, e) in tensors.items()}
        if "weight_shape" in tensors:
            file, _ = tensors["weight_shape"]
            numel = math.prod(_weight_shape(directory, file, f"{prefix}.weight_shape"))
            weight_bytes = sum(nbytes[leaf] for leaf in STORAGE_SUFFIXES if leaf in nbytes)
            parameters += numel + sum(math.prod(e["shape"]) for leaf, (_, e) in tensors.items()
                                      if leaf not in AUX_SUFFIXES)
        else:
            parameters += sum(math.prod(e["shape"]) for _, e in tensors.values())
            entry = tensors.get("weight", (None, None))[1]
            if entry is None or len(entry["shape"]) != 2:
                continue
            numel, weight_bytes = math.prod(entry["shape"]), nbytes["weight"]
        if DECODER_LAYER_MARK in f".{prefix}.":
            linear_bytes += weight_bytes
            linear_params += numel
    bits = BITS_PER_BYTE * linear_bytes / linear_params if linear_params else None
    return bits, parameters


def measure_model_size(location: str | Path) -> ModelSize:
    """Size of the model at ``location`` (a local directory); all fields None when unknown."""
    directory = Path(location)
    if not directory.is_dir():
        return ModelSize(None, None, None, "unknown (not a local directory)")
    files = {p for pattern in WEIGHT_FILE_GLOBS for p in directory.glob(pattern)}
    disk = sum(p.stat().st_size for p in files) if files else None
    try:
        bits, parameters = header_bits(directory)
    except (OSError, ValueError, KeyError, struct.error):
        bits, parameters = None, 0
    report = _report_bits(directory)
    if report is not None:
        return ModelSize(disk, report, parameters or None, REPORT_FILE)
    source = "safetensors headers" if bits is not None else "unknown (no safetensors weights)"
    return ModelSize(disk, bits, parameters or None, source)
