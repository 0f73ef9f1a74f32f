"""The compression-pass contract and the pass registry.

A pass is configured by a pydantic model (``extra="forbid"``: recipe typos fail loudly), runs
inside the sequential pipeline one decoder layer at a time, and returns a report per module.
The pipeline decides what data to collect from declared needs (``requires_calibration``,
``needs_hessian``), never from class names.
"""

from __future__ import annotations

import fnmatch
from abc import ABC
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llmcomp.calibration import InputStats

DEFAULT_TARGETS = ["*"]


class PassConfig(BaseModel):
    """Fields every pass accepts. Module names are full names, e.g. ``model.layers.3.mlp.up_proj``."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="glob patterns of linear layers (inside decoder layers) to compress",
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns of modules to leave untouched")
    lm_head: bool = Field(
        False,
        description=(
            "also compress the output head (kept dense by default); a head tied to the input embedding is "
            "untied, and the embedding stays dense"
        ),
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="glob pattern -> config fields that replace the defaults there"
    )


ModuleReport = dict[str, Any]


class CompressionPass(ABC):
    """Base class. Subclasses set ``name`` and ``Config`` and implement :meth:`compress_linear`
    (per linear layer) or override :meth:`process_layer` (whole decoder layer)."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires_calibration: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False
    # Whether the pass still works when a module gets no calibration statistics (the output head
    # never does): calibration then only refines what it does.
    calibration_optional: ClassVar[bool] = False

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    # -- targeting ----------------------------------------------------------------------------
    def selects(self, name: str) -> bool:
        cfg = self.config
        if any(fnmatch.fnmatchcase(name, pat) for pat in cfg.ignore):
            return False
        return any(fnmatch.fnmatchcase(name, pat) for pat in cfg.targets)

    def config_for(self, name: str) -> PassConfig:
        """The pass config with every matching override applied (later patterns win)."""
        merged: dict[str, Any] = {}
        for pattern, fields in self.config.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                merged.update(fields)
        if not merged:
            return self.config
        return self.config.model_copy(update=self.Config.model_validate(
            {**self.config.model_dump(exclude={"overrides"}), **merged}).model_dump(exclude={"overrides"}))

    def target_linears(self, layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
        """Plain ``nn.Linear`` children of ``layer`` this pass should touch, by full name."""
        found = {}
        for sub, module in layer.named_modules():
            full = full_name(prefix, sub)
            if type(module) is nn.Linear and self.selects(full):
                found[full] = module
        return found

    # -- work ---------------------------------------------------------------------------------
    def process_layer(
        self, layer: nn.Module, prefix: str, stats: dict[str, InputStats] | None
    ) -> dict[str, ModuleReport]:
        """Compress the selected linears of one decoder layer in place; return reports by name."""
        reports = {}
        for full, linear in self.target_linears(layer, prefix).items():
            replacement, report = self.compress_linear(full, linear, None if stats is None else stats.get(full))
            if replacement is not None:
                set_submodule(layer, child_name(full, prefix), replacement)
            shape = list(linear.weight.shape)
            reports[full] = {"pass": self.name, "shape": shape, "numel": shape[0] * shape[1], **report}
        return reports

    def compress_linear(
        self, name: str, linear: nn.Linear, stats: InputStats | None
    ) -> tuple[nn.Module | None, ModuleReport]:
        """Return ``(replacement or None if changed in place, report)``."""
        raise NotImplementedError(f"pass {self.name!r} must implement compress_linear or process_layer")


def full_name(prefix: str, child: str) -> str:
    """``prefix.child``; an empty prefix (modules outside the decoder layers) adds nothing."""
    return f"{prefix}.{child}" if prefix and child else prefix or child


def child_name(full: str, prefix: str) -> str:
    """Inverse of :func:`full_name`: the path of ``full`` below ``prefix``."""
    return full[len(prefix) + 1 :] if prefix else full


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


_PASSES: dict[str, type[CompressionPass]] = {}


def register_pass(cls: type[CompressionPass]) -> type[CompressionPass]:
    """Class decorator; rejects duplicate names."""
    if cls.name in _PASSES:
        raise ValueError(f"pass {cls.name!r} is already registered by {_PASSES[cls.name].__qualname__}")
    _PASSES[cls.name] = cls
    return cls


def pass_registry() -> dict[str, type[CompressionPass]]:
    import llmcomp.passes  # noqa: F401  (registers the built-in passes)

    return dict(_PASSES)


def weight_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative Frobenius error ||W - W'|| / ||W|| (a cheap, comparable per-module number)."""
    ref = reference.float()
    denom = ref.norm().clamp_min(1e-12)
    return float((ref - approx.float()).norm() / denom)

