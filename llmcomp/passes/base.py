"""The compression-pass contract: lifecycle, declared needs, per-module state, the pass registry.

A pass is configured by a pydantic model (``extra="forbid"``: recipe typos fail loudly) and runs
inside the sequential pipeline:

* :meth:`CompressionPass.begin_model` once before the first decoder layer (a global budget is
  planned here), :meth:`~CompressionPass.process_layer` per decoder layer,
  :meth:`~CompressionPass.end_model` once after the last (its summary goes into the report);
* :meth:`~CompressionPass.needs` declares what calibration data it wants (:class:`Needs`); the
  pipeline collects exactly that, never judging by class names;
* every compressible module carries a :class:`ModuleState` from pass to pass (the sparsity mask,
  the reports of every pass applied, in order), so a later pass can honour an earlier one;
* targets are chosen by capability: a pass lists the module kinds it can rewrite (``accepts``); a
  selected module of another kind is a one-line error naming the pass and the module.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.errors import RecipeError
from llmcomp.modules.registry import DENSE_KIND, module_kind

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


@dataclass(frozen=True)
class Needs:
    """What a pass wants from calibration, so the pipeline collects exactly that.

    Statistics are per *input group*: modules that read the same input tensor (q/k/v, gate/up)
    share one :class:`~llmcomp.calibration.InputStats`, hence one Hessian.
    """

    moments: bool = False  # count, sum, sum of squares per input channel (E[x], Var[x], ||X_j||)
    hessian: bool = False  # X^T X per input group
    quantiles: bool = False  # a fixed-seed sample of |x| per input group (thresholds at a quantile)
    # Statistics of each input group are collected after the groups before it in the layer were
    # compressed (o_proj sees the compressed q/k/v, down_proj the compressed gate/up): GPTQ and
    # SparseGPT-style error feedback inside a layer. ``process_layer`` is then called per group.
    sequential: bool = False

    @property
    def calibration(self) -> bool:
        return self.moments or self.hessian or self.quantiles

    def union(self, other: Needs) -> Needs:
        return Needs(*(getattr(self, f) or getattr(other, f) for f in ("moments", "hessian", "quantiles",
                                                                         "sequential")))


NO_NEEDS = Needs()


@dataclass
class ModuleState:
    """What is known about one compressible module, carried from pass to pass.

    The module itself holds the tensors (dense weight, codes/scales, factors); the state holds what
    must survive a rewrite: the keep-mask of a sparsity pass (``True`` = kept), and the report of
    every pass applied, in order.
    """

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    kind: str = DENSE_KIND
    mask: torch.Tensor | None = None
    passes: list[ModuleReport] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def summary(self) -> ModuleReport:
        """The flat per-module report: later passes' fields win, plus ``passes`` (all, in order)."""
        merged: ModuleReport = {"shape": list(self.shape), "numel": self.numel}
        for report in self.passes:
            merged.update(report)
        merged["pass"] = "+".join(r["pass"] for r in self.passes)
        merged["passes"] = [dict(r) for r in self.passes]
        return merged


class LayerWork:
    """One decoder layer as a pass sees it: its targets, their states and statistics.

    ``stats`` maps each target to the :class:`InputStats` of its input group (shared objects),
    or is None when the pass needs no calibration. A sequential pass gets one ``LayerWork`` per
    input group, in forward order.
    """

    def __init__(self, layer: nn.Module, prefix: str, targets: dict[str, nn.Module],
                 states: dict[str, ModuleState], stats: dict[str, InputStats] | None) -> None:
        self.layer, self.prefix, self.targets, self.states, self.stats = layer, prefix, targets, states, stats

    def replace(self, name: str, module: nn.Module) -> None:
        set_submodule(self.layer, child_name(name, self.prefix), module)
        self.targets[name] = module
        kind = module_kind(module)
        if kind is not None:
            self.states[name].kind = kind


class CompressionPass:
    """Base class. Subclasses set ``name`` and ``Config`` and implement :meth:`compress_module` (one
    module at a time) or override :meth:`process_layer` (e.g. to tie fused siblings)."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    # Module kinds this pass can rewrite (``dense`` = an nn.Linear, pruned or not).
    accepts: ClassVar[frozenset[str]] = frozenset({DENSE_KIND})
    base_needs: ClassVar[Needs] = NO_NEEDS
    # Whether the pass still works when a module gets no calibration statistics (the output head
    # never does): calibration then only refines what it does.
    calibration_optional: ClassVar[bool] = False

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    # -- declared needs and lifecycle ---------------------------------------------------------
    def needs(self) -> Needs:
        """What to collect for this pass (instances may depend on their config)."""
        return self.base_needs

    def begin_model(self, model: Any) -> None:
        """Before the first layer; ``model`` is a :class:`llmcomp.pipeline.ModelInfo`."""

    def end_model(self, model: Any) -> dict[str, Any] | None:
        """After the last layer (and the head); a summary for the report, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Model-level state (a plan, a budget) as JSON, saved so an interrupted run can resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume, instead of :meth:`begin_model`."""

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

    def select_targets(self, modules: dict[str, nn.Module], states: dict[str, ModuleState]) -> dict[str, nn.Module]:
        """The modules (by full name) this pass rewrites; a selected module it cannot rewrite is an error."""
        found = {}
        for full, module in modules.items():
            if not self.selects(full):
                continue
            kind = module_kind(module)
            if kind in self.accepts:
                found[full] = module
                continue
            history = ", ".join(r["pass"] for r in states[full].passes) if full in states else "?"
            raise RecipeError(
                f"pass {self.name!r} cannot rewrite {full}: it is already a {kind} module (after {history}), "
                f"and {self.name} runs on {'/'.join(sorted(self.accepts))} modules; reorder the recipe or add "
                f"the module to this pass's ignore list"
            )
        return found

    # -- work ---------------------------------------------------------------------------------
    def process_layer(self, work: LayerWork) -> None:
        """Rewrite the targets of one decoder layer (or of one input group, for sequential passes)."""
        for name, module in list(work.targets.items()):
            stats = None if work.stats is None else work.stats.get(name)
            replacement, report = self.compress_module(name, module, work.states[name], stats)
            if replacement is not None:
                work.replace(name, replacement)
            work.states[name].passes.append({"pass": self.name, **report})

    def compress_module(
        self, name: str, module: nn.Module, state: ModuleState, stats: InputStats | None
    ) -> tuple[nn.Module | None, ModuleReport]:
        """Return ``(replacement, or None if changed in place; report)``."""
        raise NotImplementedError(f"pass {self.name!r} must implement compress_module or process_layer")


def compressible_modules(root: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Linear layers and compressed modules under ``root`` by full name (not inside compressed ones)."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for sub, module in root.named_modules():
        if any(sub.startswith(p + ".") for p in inside):
            continue
        kind = module_kind(module)
        if kind is None:
            continue
        found[full_name(prefix, sub)] = module
        if kind != DENSE_KIND:
            inside.append(sub)
    return found


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


def scale_bits(dtype: torch.dtype) -> int:
    """Bits one stored scale costs: scales are kept in the model's float dtype."""
    return torch.finfo(dtype).bits if dtype.is_floating_point else 32


def apply_to_layer(p: CompressionPass, layer: nn.Module, prefix: str,
                   stats: dict[str, InputStats] | None = None) -> dict[str, ModuleReport]:
    """Run one pass on one decoder layer outside the pipeline (tests, tools); each target's report."""
    modules = compressible_modules(layer, prefix)
    states = {n: ModuleState(n, (m.out_features, m.in_features)) for n, m in modules.items()}
    targets = p.select_targets(modules, states)
    p.process_layer(LayerWork(layer, prefix, targets, states, stats))
    return {n: states[n].passes[-1] for n in targets if states[n].passes}
