"""Parse an llmcomp ``quantization_config`` for vLLM (no vLLM import): :mod:`llmcomp.scheme`'s
spec, plus what the vLLM path can run.

Two paths (serve/vllm_plugin.py): ``int_affine`` layers run on llmcomp's int kernels; every other
kind (sparse, factorized, codebook, activation-sparse, ...) is rebuilt per shard and materialized
to a dense weight (serve/vllm_modules.py). vLLM fuses Llama's q/k/v and gate/up projections into
one layer, so an int-kernel layer needs all its shards quantized with one shared ``bits /
group_size / symmetric``; a layer with any other kind takes the materialized path, shard by shard.
Anything the vLLM path cannot run is refused here with one error naming the modules, before any
weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcomp import intquant
from llmcomp.errors import CheckpointError
from llmcomp.modules.registry import module_types
from llmcomp.scheme import FUSED_PROJECTIONS, QUANT_METHOD, ModuleSpec, parse_quantization_config

KERNEL_KINDS = ("int_affine",)  # run by llmcomp's own kernels inside vLLM; other kinds are materialized
# How vLLM fuses HF projections in Llama-style models (Mistral, Qwen2, ...): used to check a
# checkpoint before vLLM starts; at load time the model's own packed_modules_mapping is used.
COMMON_FUSIONS = {fused: list(members) for fused, members in FUSED_PROJECTIONS.items()}
__all__ = ["QUANT_METHOD", "LinearQuantSpec", "ShardedModuleSpec", "parse_modules", "layer_spec", "check_checkpoint"]


@dataclass(frozen=True)
class LinearQuantSpec:
    """The settings shared by every shard of one (possibly fused) vLLM linear layer."""

    bits: int
    group_size: int  # effective group length along K of the *full* layer
    symmetric: bool
    in_features: int

    @property
    def per_channel(self) -> bool:
        return self.group_size >= self.in_features


@dataclass(frozen=True)
class ShardedModuleSpec:
    """A (possibly fused) layer with a kind the int kernels do not run: each shard's spec, in vLLM's
    shard order; ``None`` for a shard the checkpoint keeps as a plain dense weight."""

    names: tuple[str, ...]
    specs: tuple[ModuleSpec | None, ...]


def parse_modules(config: dict[str, Any]) -> dict[str, ModuleSpec]:
    """Validate the ``quantization_config`` (format version 1 or 2) and return its module specs."""
    try:
        modules: dict[str, ModuleSpec] = parse_quantization_config(config, where="quantization_config").modules
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    runnable = module_types()
    unsupported = sorted(n for n, s in modules.items() if s.kind not in runnable)
    if unsupported:
        kinds = sorted({modules[n].kind for n in unsupported})
        raise ValueError(
            f"no module class runs kind {', '.join(kinds)} ({len(unsupported)} modules, e.g. {unsupported[0]}), "
            "so neither vLLM nor `llmcomp serve --engine native` can serve this checkpoint; upgrade llmcomp"
        )
    return modules


def shard_names(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """Checkpoint module names behind vLLM layer ``prefix`` (``...qkv_proj`` -> q/k/v_proj)."""
    parent, _, leaf = prefix.rpartition(".")
    shards = packed_modules_mapping.get(leaf)
    if not shards:
        return [prefix]
    return [f"{parent}.{s}" if parent else s for s in shards]


def layer_spec(
    prefix: str, modules: dict[str, ModuleSpec], packed_modules_mapping: dict[str, list[str]]
) -> LinearQuantSpec | ShardedModuleSpec | None:
    """How vLLM runs layer ``prefix``: int kernels, materialized modules, or ``None`` (plain dense)."""
    names = shard_names(prefix, packed_modules_mapping)
    specs = [modules.get(n) for n in names]
    if all(s is None for s in specs):
        return None
    if any(s is not None and s.kind not in KERNEL_KINDS for s in specs):
        return ShardedModuleSpec(tuple(names), tuple(specs))
    if any(s is None for s in specs):
        missing = [n for n, s in zip(names, specs, strict=True) if s is None]
        raise ValueError(
            f"vLLM fuses {', '.join(names)} into {prefix}, but {', '.join(missing)} is not quantized; "
            "quantize all shards of a fused layer or none"
        )
    keys = {(s.bits, s.group_size, s.symmetric, s.in_features) for s in specs}  # type: ignore[union-attr]
    if len(keys) > 1:
        detail = "; ".join(
            f"{n}: bits={s.bits} group_size={s.group_size} symmetric={s.symmetric}"  # type: ignore[union-attr]
            for n, s in zip(names, specs, strict=True)
        )
        raise ValueError(
            f"vLLM fuses {', '.join(names)} into one layer ({prefix}), so they must share bits, "
            f"group_size and symmetric, but they differ ({detail}); recompress with tied settings"
        )
    bits, group_size, symmetric, in_features = keys.pop()
    group = intquant.effective_group_size(group_size, in_features)
    return LinearQuantSpec(bits, group, symmetric, in_features)


# Modules vLLM builds as vocab-parallel embeddings/heads, not linear layers: the plugin cannot quantize them.
VOCAB_LAYERS = ("lm_head", "embed_tokens")


def vocab_layer_message(name: str) -> str:
    return (f"{name} is quantized, but the vLLM plugin runs quantized linear layers only (vLLM's output head "
            "and embeddings are vocab-parallel layers): serve it with --engine native, or compress without "
            "lm_head: true for vLLM")


def check_checkpoint(config: dict[str, Any], fusions: dict[str, list[str]] | None = None) -> int:
    """Validate a checkpoint's ``quantization_config`` for vLLM; returns the quantized module count.

    Raises the same one-line ``ValueError`` vLLM would hit while loading, but before it starts.
    """
    fusions = COMMON_FUSIONS if fusions is None else fusions
    modules = parse_modules(config)
    for name in modules:
        if name.rpartition(".")[2] in VOCAB_LAYERS:
            raise ValueError(vocab_layer_message(name))
    shard_to_fused = {shard: fused for fused, shards in fusions.items() for shard in shards}
    seen = set()
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        fused = shard_to_fused.get(leaf)
        prefix = f"{parent}.{fused}" if fused and parent else (fused or name)
        if prefix not in seen:
            seen.add(prefix)
            layer_spec(prefix, modules, fusions)
    return len(modules)
