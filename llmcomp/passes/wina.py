"""The ``wina`` pass: store what activation sparsity needs at inference, computed offline.

Per linear layer of the decoder layers it writes an ``activation_sparse`` module
(:class:`~llmcomp.modules.activation_sparse.ActivationSparseLinear`) around the layer as it is
(dense, or int_affine when a quantization pass ran before): the column norms ``||W[:, i]||_2``
(WINA's criterion), and, with ``allocate``, per target sparsity of ``grid`` the greedy per-matrix
allocation and the calibrated score thresholds (:mod:`llmcomp.passes.wina_alloc`). With
``transform`` (dense layers only) the layer is first made output-preservingly column-orthogonal
(:mod:`llmcomp.passes.wina_transform`).

The allocation needs whole decoder layers on real hidden states, so ``begin_model`` loads the
model once (float32), calibrates every layer on its dense inputs and keeps the plan (JSON, saved
for ``--resume``); ``process_layer`` then only writes tables into the wrappers. No weight changes
(except the transform's folding and rotation); the runtime chooses the active sparsity at load
time (``--activation-sparsity``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from llmcomp.modules.activation_sparse import MAX_SPARSITY, ActivationSparseLinear
from llmcomp.modules.registry import DENSE_KIND
from llmcomp.passes.base import CompressionPass, LayerWork, PassConfig, child_name, register_pass
from llmcomp.passes.wina_alloc import LAYER_GROUPS, calibrate_layers
from llmcomp.passes.wina_transform import transform_layer

DEFAULT_GRID = [0.25, 0.4, 0.5, 0.65, 0.7]
TEAL_STEP = 0.05  # the default greedy step (TEAL's)
WINA_STEP = 0.025  # WINA's paper: set `step: 0.025` in a recipe to reproduce it (twice the calibration time)
DEFAULT_ALLOC_SAMPLES = 8
DEFAULT_ALLOC_TOKENS = 256


class WinaConfig(PassConfig):
    criterion: Literal["teal", "wina"] = Field("wina", description="the criterion the tables are calibrated for "
                                                                   "(the runtime may still pick the other one)")
    allocate: bool = Field(True, description="greedy per-matrix allocation and thresholds per grid target "
                                             "(False: column norms only)")
    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID),
                              description="target sparsities (size-weighted per decoder layer) with a table")
    step: float = Field(TEAL_STEP, gt=0.0, le=0.25, description="greedy step of a group's sparsity (TEAL 0.05, "
                                                                   "WINA's paper 0.025)")
    alloc_samples: int = Field(DEFAULT_ALLOC_SAMPLES, gt=0, description="calibration windows used by the greedy")
    alloc_tokens: int = Field(DEFAULT_ALLOC_TOKENS, gt=1, description="positions per window used by the greedy")
    transform: bool = Field(False, description="output-preserving SVD transform of the k/gate input groups first")

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < s <= MAX_SPARSITY for s in value) or value != sorted(set(value)):
            raise ValueError(f"grid must be increasing sparsities in (0, {MAX_SPARSITY}]")
        return value


def layer_key(prefix: str, child: str) -> str:
    return f"{prefix}.{child}"


@register_pass
class WinaPass(CompressionPass):
    name = "wina"
    Config = WinaConfig
    accepts = frozenset({DENSE_KIND, "int_affine"})

    def __init__(self, config: PassConfig) -> None:
        super().__init__(config)
        self.plan: dict[str, dict[str, list[float]]] = {}

    @property
    def cfg(self) -> WinaConfig:
        return self.config  # type: ignore[return-value]

    # -- model level: calibrate on whole decoder layers ----------------------------------------
    def begin_model(self, model: Any) -> None:
        if not self.cfg.allocate:
            return
        full = model.load_model(torch.float32)
        layers = list(full.get_submodule(model.layer_prefix))
        if self.cfg.transform:
            for layer in layers:
                prepare_layer(layer, self.cfg.criterion, (), True)
        ids = model.calibration_ids()[: self.cfg.alloc_samples, : self.cfg.alloc_tokens]
        plans = calibrate_layers(full, layers, ids, self.cfg.grid, self.cfg.step, self.cfg.criterion)
        for i, plan in enumerate(plans):
            for child, entry in plan.items():
                self.plan[layer_key(f"{model.layer_prefix}.{i}", child)] = entry
        del full

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = dict(state.get("plan", {}))

    def end_model(self, model: Any) -> dict[str, Any] | None:
        if not self.plan:
            return {"criterion": self.cfg.criterion, "allocated": False}
        return {"criterion": self.cfg.criterion, "allocated": True, "grid": self.cfg.grid, "step": self.cfg.step,
                "transform": self.cfg.transform}

    # -- per layer: wrap and fill the tables ---------------------------------------------------
    def process_layer(self, work: LayerWork) -> None:
        grid = tuple(self.cfg.grid) if self.plan else ()
        children = {child_name(n, work.prefix): n for n in work.targets}
        wrapped = prepare_layer(work.layer, self.cfg.criterion, grid, self.cfg.transform, children)
        for child, full in children.items():
            module = wrapped[child]
            entry = self.plan.get(full)
            if grid:
                if entry is None:
                    raise RuntimeError(f"wina: no calibrated allocation for {full}")
                with torch.no_grad():
                    module.sparsity_table.copy_(torch.tensor(entry["sparsity"]))
                    module.threshold_table.copy_(torch.tensor(entry["threshold"]))
            work.replace(full, module)
            report: dict[str, Any] = {"pass": self.name, "criterion": self.cfg.criterion,
                                      "transform": module.input_rotation is not None,
                                      "col_norm_mean": float(module.col_norms.mean())}
            if entry is not None:
                report["allocation"] = dict(zip(map(str, self.cfg.grid), entry["sparsity"], strict=True))
            work.states[full].passes.append(report)


def prepare_layer(layer: torch.nn.Module, criterion: str, grid: tuple[float, ...], transform: bool,
                  children: dict[str, str] | None = None) -> dict[str, ActivationSparseLinear]:
    """Optionally transform the layer, then wrap its linears (all of LAYER_GROUPS, or ``children``)."""
    names = list(children) if children is not None else [n for g in LAYER_GROUPS for n in g]
    rotations = transform_layer(layer) if transform else {}
    if transform and children is not None and set(rotations) - set(names):
        missing = sorted(set(rotations) - set(names))
        raise ValueError(f"wina transform rotates whole input groups; the targets leave out {missing}")
    wrapped = {}
    for name in names:
        base = layer.get_submodule(name)
        module = ActivationSparseLinear.wrap(base, criterion, grid=grid, rotation=rotations.get(name))
        parent, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr, module)
        wrapped[name] = module
    return wrapped


def calibrate_in_memory(model: torch.nn.Module, ids: torch.Tensor, grid: list[float], step: float = TEAL_STEP,
                        criterion: str = "wina", transform: bool = False, allocate: bool = True) -> None:
    """What the pass stores, applied to a loaded model in place (benchmarks, notebooks): transform,
    wrap every decoder linear with ``grid`` tables, calibrate them on ``ids`` (dense hidden states)."""
    layers = list(model.model.layers)  # type: ignore[union-attr]
    for layer in layers:
        prepare_layer(layer, criterion, tuple(grid), transform)
    plans = calibrate_layers(model, layers, ids, grid, step, criterion, allocate)
    for layer, plan in zip(layers, plans, strict=True):
        for child, entry in plan.items():
            module = layer.get_submodule(child)
            with torch.no_grad():
                module.sparsity_table.copy_(torch.tensor(entry["sparsity"]))
                module.threshold_table.copy_(torch.tensor(entry["threshold"]))
