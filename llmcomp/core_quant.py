"""Quantize the float MPO cores of an existing llmcomp checkpoint (``llmcomp quantize-cores``).

Why a separate step: the paper heals and then quantizes, and int cores do not train, so a healed
checkpoint needs its cores quantized afterwards. Each float-core ``mpo`` module is rebuilt from
its spec, its cores quantized exactly as the ``tensornet`` pass's ``core_bits`` option does
(:func:`llmcomp.passes.tensornet.quantize_cores`), and its tensors replaced by codes, scales and
zero points in the same shard; every other tensor is copied unchanged. Written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmcomp.errors import LlmcompError
from llmcomp.formats.checkpoint import load_tensors, validate_checkpoint
from llmcomp.formats.rewrite import rewrite_checkpoint
from llmcomp.modules.mpo_linear import CORE_BITS, DEFAULT_CORE_GROUP, MPOLinear, MPOSpec
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.base import weight_error
from llmcomp.passes.tensornet import quantize_cores
from llmcomp.scheme import FORMAT_VERSION


def quantize_checkpoint_cores(ckpt: str | Path, output: str | Path, bits: int, group_size: int = DEFAULT_CORE_GROUP,
                              symmetric: bool = False, fit_iters: int = fit.DEFAULT_FIT_ITERS,
                              overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Write ``output``: ``ckpt`` with every float-core MPO's cores quantized to ``bits``.

    Returns the per-module report (``rel_error`` of the dense weight against the float cores,
    ``bits_per_weight`` of the stored cores), also added to the checkpoint report.
    """
    if bits not in CORE_BITS:
        raise LlmcompError(f"core bits must be one of {CORE_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise LlmcompError(f"core group size must be positive or -1 (whole rows), got {group_size}")
    if fit_iters < 0:
        raise LlmcompError(f"fit iterations must be non-negative, got {fit_iters}")
    ckpt, output = Path(ckpt), Path(output)
    info = validate_checkpoint(ckpt)
    mpos = {n: s for n, s in info.modules.items() if isinstance(s, MPOSpec)}
    targets = {n: s for n, s in mpos.items() if s.core_bits is None}
    if not targets:
        raise LlmcompError(f"{ckpt} has no float-core MPO modules: nothing to quantize"
                           + (" (its cores are quantized already)" if mpos else " (compress with tensornet first)"))
    if output.exists() and output.resolve() == ckpt.resolve():
        raise LlmcompError("the output must differ from the input checkpoint")

    replaced: dict[str, dict[str, torch.Tensor]] = {}  # shard -> new tensors
    dropped: set[str] = set()
    specs = dict(info.modules)
    report: dict[str, dict[str, Any]] = {}
    for name, spec in targets.items():
        own = [t for t in info.tensors if t.startswith(f"{name}.")]
        tensors = load_tensors(info, own)
        dtype = tensors[f"{name}.core_0"].dtype
        module = MPOLinear.from_spec(spec, dtype)
        module.load_state_dict({t[len(name) + 1:]: v for t, v in tensors.items()}, strict=True)
        qmod = quantize_cores(module, bits, group_size, symmetric, fit_iters)
        shard = info.tensors[f"{name}.core_0"].file
        replaced.setdefault(shard, {}).update({f"{name}.{t}": v.contiguous() for t, v in qmod.state_dict().items()})
        dropped.update(own)
        specs[name] = qmod.spec()
        w = module.dequantized_weight(torch.float64)
        report[name] = {"rel_error": weight_error(w, qmod.dequantized_weight(torch.float64)),
                        "bits_per_weight": qmod.storage_bytes * 8 / w.numel()}

    def edit(qc: dict[str, Any], full: dict[str, Any]) -> None:
        qc["format_version"] = FORMAT_VERSION  # the specs below are the parsed (upgraded) ones
        qc["modules"] = {n: s.model_dump(mode="json") for n, s in specs.items()}
        full["core_quantization"] = {"bits": bits, "group_size": group_size, "symmetric": symmetric,
                                     "fit_iters": fit_iters, "modules": report}
        _update_sizes(full, report, bits, sum(f["bytes"] for f in qc["files"].values()))

    rewrite_checkpoint(info, ckpt, output, overwrite, replaced, dropped, edit)
    return report



def _update_sizes(full: dict[str, Any], report: dict[str, dict[str, Any]], bits: int, tensor_bytes: int) -> None:
    """Keep the report's size fields true (``llmcomp eval`` and ``inspect`` read them): per-module
    bits, the numel-weighted average, and the checkpoint's bytes and ratio."""
    modules = full.get("modules")
    if isinstance(modules, dict):
        for name, entry in report.items():
            if isinstance(modules.get(name), dict):
                modules[name].update(bits_per_weight=entry["bits_per_weight"], core_bits=bits)
        bpw = [(m["bits_per_weight"], m.get("numel", 0)) for m in modules.values()
               if isinstance(m, dict) and "bits_per_weight" in m]
        total = sum(n for _, n in bpw)
        if total:
            full["average_bits_per_weight"] = sum(b * n for b, n in bpw) / total
    if "compressed_bytes" in full:
        full["compressed_bytes"] = tensor_bytes
        if full.get("original_bytes"):
            full["compression_ratio"] = full["original_bytes"] / max(tensor_bytes, 1)
