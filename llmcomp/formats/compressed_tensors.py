"""Export llmcomp ``int_affine`` checkpoints to compressed-tensors ``pack-quantized`` (stock vLLM).

What the format can express, and so what is exported: weight-only int4 / int8, one scale per
output channel (``strategy: channel``) or per group of columns that divides K
(``strategy: group``), symmetric or asymmetric with integer zero points. int2/3 and a short last
group are refused with a one-line reason naming the module. Every other module kind (sparse,
factorized, codebook, ...) is written **dense**: its module rebuilds the weight
(``dequantized_weight``) in the checkpoint's dtype and the layer is listed in ``ignore``. Stock vLLM
dropped its sparse formats in 2026, so dense is also what it can run.

Tensor conventions (compressed-tensors 0.17, ``compressors/pack_quantized``), all checked against
the library in tests/test_export_ct.py:

* ``weight_packed``: int32 ``[N, ceil(K / (32 // bits))]``, values stored unsigned as
  ``q + 2**(bits-1)``, lowest bits first along K. Identical to llmcomp's layout for 4 bits; our
  unpacked int8 storage is packed 4 per word for 8 bits.
* ``weight_zero_point``: signed ints packed the same way but along the **output** dimension
  (``packed_dim=0``): int32 ``[ceil(N / (32 // bits)), groups]``. Absent when symmetric.
* ``weight_scale`` ``[N, groups]`` in the model dtype, ``weight_shape`` int64 ``[2]``.
* Dequantization ``(q - z) * s``: the same as llmcomp's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcomp import intquant
from llmcomp.errors import LlmcompError
from llmcomp.formats.atomic import AtomicDirectory
from llmcomp.formats.checkpoint import copy_side_files, merge_shards, validate_checkpoint
from llmcomp.modules.registry import build_module, module_types
from llmcomp.scheme import IntAffineSpec, ModuleSpec

FORMAT = "pack-quantized"
EXPORTABLE_BITS = (4, 8)
CT_QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.17.0"  # the compressed-tensors release whose conventions this writer follows


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: everything but the targets."""

    bits: int
    strategy: str  # "channel" or "group"
    group_size: int | None
    symmetric: bool

    def weights_args(self) -> dict[str, Any]:
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "block_structure": None,
            "dynamic": False,
            "actorder": None,
            "scale_dtype": None,
            "zp_dtype": None if self.symmetric else "torch.int8",
            "observer": "minmax",
            "observer_kwargs": {},
        }


@dataclass
class ExportSummary:
    output_dir: Path
    schemes: dict[str, list[str]] = field(default_factory=dict)  # group name -> module names
    bytes: int = 0


def scheme_for(name: str, spec: ModuleSpec) -> Scheme | None:
    """The compressed-tensors scheme of one module spec; None: written dense; or a one-line refusal."""
    if not isinstance(spec, IntAffineSpec):
        if spec.kind in module_types():
            return None
        raise LlmcompError(
            f"cannot export {name!r} to compressed-tensors: module kind {spec.kind!r} has no "
            "pack-quantized equivalent and no module class to rebuild it dense"
        )
    bits, k, group = spec.bits, spec.in_features, spec.group_size
    if bits not in EXPORTABLE_BITS:
        raise LlmcompError(
            f"cannot export {name!r} to compressed-tensors: {bits}-bit weights (vLLM's pack-quantized "
            f"kernels take {' or '.join(map(str, EXPORTABLE_BITS))} bits)"
        )
    if group >= k:
        return Scheme(bits, "channel", None, spec.symmetric)
    if k % group:
        raise LlmcompError(
            f"cannot export {name!r} to compressed-tensors: group size {group} does not divide "
            f"in_features {k} (the format has no short last group); re-compress with group sizes that divide "
            f"{k} (finequant: require_divisible: true)"
        )
    return Scheme(bits, "group", group, spec.symmetric)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``q`` (int8, 2-D) into int32 words along ``dim`` (compressed-tensors layout)."""
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    return intquant.pack_words(q, bits)


def _convert_module(prefix: str, spec: IntAffineSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bits, k = spec.bits, spec.in_features
    out: dict[str, torch.Tensor] = {}
    packed = tensors[f"{prefix}.weight_packed"]
    if bits == 8:
        packed = pack_int32(intquant.unpack(packed, 8, k), 8)
    out[f"{prefix}.weight_packed"] = packed.contiguous()
    out[f"{prefix}.weight_scale"] = tensors[f"{prefix}.weight_scale"]
    out[f"{prefix}.weight_shape"] = tensors[f"{prefix}.weight_shape"].to(torch.int64)
    zp = tensors.get(f"{prefix}.weight_zero_point")
    if zp is not None:
        out[f"{prefix}.weight_zero_point"] = pack_int32(zp.to(torch.int8), bits, dim=0)
    if f"{prefix}.bias" in tensors:
        out[f"{prefix}.bias"] = tensors[f"{prefix}.bias"]
    return out


def _owner(tensor_name: str, modules: dict[str, ModuleSpec]) -> str | None:
    """The compressed module a tensor belongs to (its longest module-name prefix), or None."""
    parts = tensor_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _dense_module(prefix: str, spec: ModuleSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module of another kind, rebuilt by its own class as a dense ``weight`` (and its bias)."""
    own = {n[len(prefix) + 1 :]: t for n, t in tensors.items() if n.startswith(prefix + ".")}
    module = build_module(prefix, spec, torch.float32)
    module.load_state_dict(own, strict=True)
    dtype = next((t.dtype for t in own.values() if t.is_floating_point()), torch.float32)
    with torch.no_grad():
        out = {f"{prefix}.weight": module.dequantized_weight(dtype).contiguous()}
    if "bias" in own:
        out[f"{prefix}.bias"] = own["bias"]
    return out


def _ct_config(schemes: dict[Scheme, list[str]], ignore: list[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    groups, names = {}, {}
    for i, (scheme, targets) in enumerate(sorted(schemes.items(), key=lambda kv: str(kv[0]))):
        key = f"group_{i}"
        groups[key] = {
            "targets": sorted(targets),
            "weights": scheme.weights_args(),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
        names[key] = sorted(targets)
    config = {
        "quant_method": CT_QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": CT_VERSION,
    }
    return config, names


def _dense_linears(config: dict[str, Any], tensor_names: list[str], quantized: set[str]) -> list[str]:
    """Linear layers left dense (lm_head, skipped modules): compressed-tensors must ignore them."""
    dense = []
    for name in tensor_names:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if module in quantized or "embed" in module or "norm" in module:
            continue
        dense.append(module)
    if config.get("tie_word_embeddings") and "lm_head" not in dense:
        dense.append("lm_head")
    return sorted(dense)


def export_compressed_tensors(source: str | Path, output: str | Path, overwrite: bool = False) -> ExportSummary:
    """Convert the llmcomp checkpoint at ``source`` into a compressed-tensors directory ``output``."""
    info = validate_checkpoint(source)
    modules = info.modules
    if not modules:
        raise LlmcompError(f"{source}: the checkpoint has no compressed modules to export")
    schemes: dict[Scheme, list[str]] = {}
    dense: list[str] = []
    for name, spec in modules.items():
        scheme = scheme_for(name, spec)
        if scheme is None:
            dense.append(name)
        else:
            schemes.setdefault(scheme, []).append(name)
    out = Path(output)
    if out.exists() and not overwrite:
        raise LlmcompError(f"{out} already exists; pass --overwrite to replace it")
    ignore = sorted(set(_dense_linears(info.config, list(info.tensors), set(modules))) | set(dense))
    qconfig, names = _ct_config(schemes, ignore)
    config = {k: v for k, v in info.config.items() if k != "quantization_config"}
    if schemes:  # else every module was written dense: a plain HF checkpoint, which any engine runs
        config["quantization_config"] = qconfig

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        converted: dict[str, torch.Tensor] = {}
        owners = {name: _owner(name, modules) for name in tensors}
        for mod_name in sorted({o for o in owners.values() if o is not None}):
            if mod_name in dense:
                converted.update(_dense_module(mod_name, modules[mod_name], tensors))
            else:
                converted.update(_convert_module(mod_name, modules[mod_name], tensors))  # type: ignore[arg-type]
        for name, tensor in tensors.items():
            if owners[name] is None:
                converted[name] = tensor.contiguous()
        return converted

    with AtomicDirectory(out, overwrite) as stage:
        sources = [info.path / f for f in sorted({t.file for t in info.tensors.values()})]
        weight_map = merge_shards(stage.path, sources, convert=convert)
        copy_side_files(info.path, stage.path)
        (stage.path / "config.json").write_text(json.dumps(config, indent=2))
        total = sum((stage.path / f).stat().st_size for f in set(weight_map.values()))
        stage.commit()
    return ExportSummary(out, names, total)
