"""vLLM plugin: registers the ``llmcomp`` quantization method with vLLM.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in the API server, the
engine core and every worker. The method follows vLLM's Config -> LinearMethod -> kernel shape:
:class:`LlmcompConfig` parses ``quantization_config``; :class:`LlmcompLinearMethod` declares the
checkpoint tensors as vLLM parameters (so vLLM's own loaders handle fused q/k/v and gate/up
layers and tensor-parallel sharding), then hands them to :func:`llmcomp.kernels.dispatch.select_kernel`
once loading is done. The same code serves CPU builds (torch kernels) and CUDA builds (Triton).
Layers with any other module kind go to :class:`~llmcomp.serve.vllm_modules.LlmcompModuleMethod`,
which materializes each shard to a dense weight after loading.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.utils import set_weight_attrs

from llmcomp import intquant
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, select_kernel
from llmcomp.scheme import ModuleSpec
from llmcomp.serve.vllm_modules import LlmcompModuleMethod
from llmcomp.serve.vllm_spec import (
    QUANT_METHOD,
    LinearQuantSpec,
    ShardedModuleSpec,
    layer_spec,
    parse_modules,
    vocab_layer_message,
)

MIN_CUDA_CAPABILITY = 70  # Triton kernels need Volta or newer; vLLM ignores this on CPU


class LlmcompConfig(QuantizationConfig):
    """The ``quantization_config`` of an llmcomp checkpoint (docs/FORMAT.md)."""

    def __init__(self, modules: dict[str, ModuleSpec]) -> None:
        super().__init__()
        self.modules = modules

    def __repr__(self) -> str:
        return f"LlmcompConfig({len(self.modules)} quantized modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return MIN_CUDA_CAPABILITY

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlmcompConfig:
        return cls(parse_modules(config))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Follow vLLM's renaming of HF module paths (a no-op for Llama)."""
        renamed = {}
        for name, spec in self.modules.items():
            new = hf_to_vllm_mapper._map_name(name)
            if new is not None:
                renamed[new] = spec
        self.modules = renamed

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            spec = layer_spec(prefix, self.modules, self.packed_modules_mapping)
            if spec is None:
                return UnquantizedLinearMethod()
            if isinstance(spec, ShardedModuleSpec):
                return LlmcompModuleMethod(spec, prefix)
            return LlmcompLinearMethod(spec, prefix)
        if isinstance(layer, VocabParallelEmbedding) and prefix in self.modules:
            raise ValueError(vocab_layer_message(prefix))
        return None


@register_weight_loader_v2_supported_method
class LlmcompLinearMethod(LinearMethodBase):
    """Weight-only int2/3/4/8 linear layers with group-wise scales and optional zero points."""

    def __init__(self, spec: LinearQuantSpec, prefix: str = "") -> None:
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
        spec = self.spec
        weight_loader = extra_weight_attrs.pop("weight_loader")
        n, k = sum(output_partition_sizes), input_size_per_partition
        vpw = intquant.values_per_word(spec.bits)
        # Row-parallel shard whose edges fall inside a packed word (3-bit: 10 values per word): load
        # the whole input width and cut this rank's columns out after loading.
        straddles = k != input_size and k % vpw != 0
        if k != input_size and not spec.per_channel and k % spec.group_size:
            raise ValueError(
                f"{self.prefix}: the per-rank input size {k} must be a multiple of group_size "
                f"{spec.group_size}; use fewer tensor-parallel ranks"
            )
        layer.llmcomp_columns = (layer.tp_rank * k, k, input_size) if straddles else None
        if straddles:
            packed: BasevLLMParameter = ChannelQuantScaleParameter(
                data=torch.empty(n, math.ceil(input_size / vpw), dtype=torch.int32), output_dim=0,
                weight_loader=weight_loader,
            )
        elif spec.bits == 8:
            packed = ModelWeightParameter(
                data=torch.empty(n, k, dtype=torch.int8), input_dim=1, output_dim=0,
                weight_loader=weight_loader,
            )
        else:
            packed = PackedvLLMParameter(
                data=torch.empty(n, math.ceil(k / vpw), dtype=torch.int32), input_dim=1, output_dim=0,
                packed_dim=1, packed_factor=vpw, weight_loader=weight_loader,
            )
        scale = self._group_param(n, k, params_dtype, weight_loader)
        shape = BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        layer.register_parameter("weight_packed", packed)
        layer.register_parameter("weight_scale", scale)
        layer.register_parameter("weight_shape", shape)
        params = [packed, scale, shape]
        if not spec.symmetric:
            zero = self._group_param(n, k, torch.int8, weight_loader)
            layer.register_parameter("weight_zero_point", zero)
            params.append(zero)
        for param in params:
            set_weight_attrs(param, extra_weight_attrs)
        group = k if spec.per_channel else spec.group_size
        layer.llmcomp_layout = QuantLayout(n, k, spec.bits, group, spec.symmetric)
        layer.llmcomp_act_dtype = params_dtype

    def _group_param(self, n: int, k: int, dtype: torch.dtype, weight_loader: Any) -> BasevLLMParameter:
        """Scales / zero points: one column per group; per-channel ones are replicated across ranks."""
        if self.spec.per_channel:
            return ChannelQuantScaleParameter(
                data=torch.empty(n, 1, dtype=dtype), output_dim=0, weight_loader=weight_loader
            )
        groups = intquant.num_groups(k, self.spec.group_size)
        return GroupQuantScaleParameter(
            data=torch.empty(n, groups, dtype=dtype), output_dim=0, input_dim=1, weight_loader=weight_loader
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Pick a kernel for this device and let it repack the loaded tensors once."""
        layout: QuantLayout = layer.llmcomp_layout
        device = layer.weight_packed.device
        dtype = layer.llmcomp_act_dtype
        zero = layer.weight_zero_point.data if not layout.symmetric else None
        packed = layer.weight_packed.data
        if layer.llmcomp_columns is not None:
            start, width, full = layer.llmcomp_columns
            q = intquant.unpack(packed, layout.bits, full)[:, start : start + width]
            packed = intquant.pack(q, layout.bits).to(packed.device)
            layer.weight_packed.data = packed
        tensors = QuantTensors(packed, layer.weight_scale.data, zero)
        kernel = select_kernel(layout, device, dtype)
        layer.llmcomp_kernel = kernel
        layer.llmcomp_state = kernel.prepare(layout, tensors, dtype)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return layer.llmcomp_kernel.apply(x, layer.llmcomp_layout, layer.llmcomp_state, bias)


def register() -> None:
    """Entry point: make ``quant_method: "llmcomp"`` known to vLLM (safe to call repeatedly)."""
    register_quantization_config(QUANT_METHOD)(LlmcompConfig)
