"""vLLM linear method for every module kind without a dedicated vLLM kernel (sparse, factorized,
codebook, activation-sparse, ...): each checkpoint shard is rebuilt as its llmcomp module and
materialized to a dense weight once, after loading.

Why materialize: it serves any kind that implements the module contract (``dequantized_weight``)
through one code path, with vLLM's own fused layers, tensor-parallel sharding and compilation (a
plain ``F.linear``). The price is dense memory and dense compute inside vLLM; the native runtime
runs the compressed form. A shard module may also define ``transform_input(x)`` (activation
sparsity: which inputs it keeps), which is then applied per shard before its matmul.

How loading works: vLLM's model loader maps ``q_proj.<tensor>`` onto the fused ``qkv_proj`` layer and
calls ``param.weight_loader(param, tensor, shard_id)``. Each tensor name of any shard is an empty
placeholder parameter whose loader keeps the tensor for its shard; nothing is interpreted until
:meth:`LlmcompModuleMethod.process_weights_after_loading`, when every shard is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs

from llmcomp.activation_sparsity import configure_from_env
from llmcomp.modules.registry import build_module
from llmcomp.serve.vllm_spec import ShardedModuleSpec

QKV_SHARD_IDS = {"q": 0, "k": 1, "v": 2}
DENSE_TENSORS = ("weight",)  # what a shard left dense in the checkpoint holds


def shard_index(shard_id: int | str | None) -> int:
    """vLLM's shard id (``'q'/'k'/'v'`` for q/k/v, ``0, 1`` for gate/up, None when unfused) as a position."""
    if shard_id is None:
        return 0
    return QKV_SHARD_IDS[shard_id] if isinstance(shard_id, str) else int(shard_id)


def _tensor_names(spec: ShardedModuleSpec, dtype: torch.dtype) -> list[str]:
    """Every tensor name any shard of the layer has in the checkpoint (bias is vLLM's own parameter)."""
    names: set[str] = set()
    for name, module_spec in zip(spec.names, spec.specs, strict=True):
        if module_spec is None:
            names.update(DENSE_TENSORS)
        else:
            names.update(k for k in build_module(name, module_spec, dtype).state_dict() if k != "bias")
    return sorted(names)


class LlmcompModuleMethod(LinearMethodBase):
    """Any llmcomp module kind, each shard materialized to a dense weight after loading."""

    def __init__(self, spec: ShardedModuleSpec, prefix: str = "") -> None:
        self.spec = spec
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        extra_weight_attrs.pop("weight_loader", None)  # ours keeps whole shards; the layer's would slice them
        if len(output_partition_sizes) != len(self.spec.names):
            raise ValueError(f"{self.prefix}: vLLM builds {len(output_partition_sizes)} shards, the checkpoint "
                             f"has {len(self.spec.names)} ({', '.join(self.spec.names)})")
        layer.llmcomp_loaded = [{} for _ in self.spec.names]
        layer.llmcomp_partitions = (list(output_partition_sizes), input_size_per_partition, input_size)
        layer.llmcomp_act_dtype = params_dtype
        layer.llmcomp_containers = []
        for name in _tensor_names(self.spec, params_dtype):
            param = nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": _keeper(layer, name)})
            owner, leaf = _container(layer, name)
            owner.register_parameter(leaf, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        dtype = layer.llmcomp_act_dtype
        weights, transforms = [], []
        for i, (name, module_spec) in enumerate(zip(self.spec.names, self.spec.specs, strict=True)):
            tensors = layer.llmcomp_loaded[i]
            weight, transform = _materialize(name, module_spec, tensors, dtype)
            weights.append(_local_part(layer, i, weight).to(dtype).contiguous())
            transforms.append(transform)
        for name in list(layer._parameters):
            if name != "bias":
                delattr(layer, name)  # the placeholders; the shards' tensors are freed with them
        for name in layer.llmcomp_containers:
            delattr(layer, name)
        del layer.llmcomp_containers
        del layer.llmcomp_loaded
        if any(t is not None for t in transforms):
            if getattr(layer, "tp_size", 1) > 1:
                raise ValueError(f"{self.prefix}: activation-sparse modules run in vLLM with tensor_parallel_size 1")
            layer.llmcomp_shards = list(zip(weights, transforms, strict=True))
        else:
            layer.register_buffer("llmcomp_weight", torch.cat(weights), persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shards = getattr(layer, "llmcomp_shards", None)
        if shards is None:
            return F.linear(x, layer.llmcomp_weight, bias)
        out = torch.cat([F.linear(x if t is None else t(x), w) for w, t in shards], dim=-1)
        return out if bias is None else out + bias


def _container(layer: torch.nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    """Where a (possibly nested, e.g. ``base.weight_packed``) placeholder lives on the vLLM layer, so
    vLLM's ``named_parameters`` has exactly the checkpoint's name for it."""
    *path, leaf = tensor_name.split(".")
    owner = layer
    for depth, part in enumerate(path):
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise ValueError(f"checkpoint tensor {tensor_name!r} clashes with vLLM layer attribute {part!r}")
            child = nn.Module()
            owner.add_module(part, child)
            if depth == 0:
                layer.llmcomp_containers.append(part)
        owner = child
    return owner, leaf


def _keeper(layer: torch.nn.Module, tensor_name: str) -> Callable[..., None]:
    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        layer.llmcomp_loaded[shard_index(shard_id)][tensor_name] = loaded.detach().to(param.device).clone()

    return load


def _materialize(
    name: str, spec: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The dense weight of one shard (and its input transform, if the module has one)."""
    if spec is None:
        if "weight" not in tensors:
            raise ValueError(f"{name}: the checkpoint has no weight for this dense shard")
        return tensors["weight"], None
    module = build_module(name, spec, dtype)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "bias"]
    if missing or unexpected:
        raise ValueError(f"{name} ({spec.kind}): checkpoint tensors do not match the module "
                         f"(missing {missing}, unexpected {unexpected})")
    module.to(tensors[next(iter(tensors))].device)
    configure_from_env(name, module)  # --activation-sparsity reaches activation-sparse modules this way
    with torch.no_grad():
        weight = module.dequantized_weight(torch.float32)
    return weight, getattr(module, "transform_input", None)


def _local_part(layer: torch.nn.Module, shard: int, weight: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's rows (column-parallel) or columns (row-parallel) of a full shard."""
    partitions, k_local, k_full = layer.llmcomp_partitions
    rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    n_full, n_local = weight.shape[0], partitions[shard]
    if n_local != n_full:
        copies = n_full // n_local  # distinct row blocks; fewer than ranks when kv heads are replicated
        block = rank * copies // size
        weight = weight[block * n_local : (block + 1) * n_local]
    if k_local != k_full:
        weight = weight[:, rank * k_local : (rank + 1) * k_local]
    return weight
