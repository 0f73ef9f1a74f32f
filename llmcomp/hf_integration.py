"""Register the llmcomp checkpoint format with transformers (HfQuantizer + config class).

After ``import llmcomp`` (or this module), ``AutoModelForCausalLM.from_pretrained(dir)`` on an
llmcomp checkpoint validates it, swaps each listed module for its compressed class on the meta
device, and lets transformers load the tensors straight into those modules' buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.modules.registry import build_module
from llmcomp.passes.base import set_submodule
from llmcomp.scheme import FORMAT_VERSION, QUANT_METHOD, parse_quantization_config


class LlmcompConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an llmcomp checkpoint (see docs/FORMAT.md)."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = modules or {}
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class LlmcompHfQuantizer(HfQuantizer):
    """Loads pre-compressed llmcomp checkpoints; it never quantizes on the fly."""

    requires_calibration = True
    quantization_config: LlmcompConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("llmcomp checkpoints are produced by `llmcomp compress`, not on the fly")

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        source = Path(str(getattr(model.config, "_name_or_path", "")))
        if (source / "config.json").is_file():
            validate_checkpoint(source, verify_hashes=False)
        dtype = kwargs.get("dtype") or model.dtype
        if not isinstance(dtype, torch.dtype):
            dtype = torch.float32
        specs = parse_quantization_config(self.quantization_config.to_dict()).modules  # v1 specs upgraded
        for name, spec in specs.items():
            with torch.device("meta"):
                module = build_module(name, spec, dtype)
            set_submodule(model, name, module)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LlmcompConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LlmcompHfQuantizer)


_register()
