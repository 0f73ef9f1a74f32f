"""Sensitivity profile of a factorizing pass: what compressing one layer alone costs.

For every decoder block and layer type (q/k/v/o, gate/up/down) the layer is replaced by its
``tensornet`` (or ``lowrank``) version on its own, the mean next-token NLL on calibration text is
measured, and the layer is restored. CompactifAI reports that the first blocks and the MLP output
projection are the sensitive ones; this measures it per model. The result is a table, a heat map
(block x layer type) and a plan: a recipe whose ``overrides`` keep the most expensive layers dense
(cost per parameter saved) and compress the rest.

Cost: one forward per layer, but a layer of block ``i`` cannot change what enters block ``i``, so
the inputs of every block are recorded once and each measurement runs only blocks ``i`` onwards
(the earlier blocks are swapped for stand-ins that replay the recorded input): the same numbers
for about 60% of the compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from llmcomp.errors import LlmcompError
from llmcomp.passes.base import ModuleState, pass_registry, set_submodule
from llmcomp.passes.lowrank import FactorizedConfig

PROFILE_PASSES = ("tensornet", "lowrank")
LAYER_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_DENSE_FRACTION = 0.2
HEATMAP_DPI = 120


@dataclass
class LayerCost:
    name: str
    block: int
    layer_type: str
    delta_nll: float
    params_saved: int
    rel_error: float

    @property
    def cost_per_param(self) -> float:
        return self.delta_nll / max(self.params_saved, 1)


@dataclass
class Profile:
    pass_type: str
    pass_config: dict[str, Any]
    base_nll: float
    tokens: int
    costs: list[LayerCost] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.pass_type, "pass_config": self.pass_config, "base_nll": self.base_nll,
                "base_perplexity": math.exp(self.base_nll), "tokens": self.tokens,
                "layers": [{**c.__dict__, "cost_per_param": c.cost_per_param} for c in self.costs]}


def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL over all windows (every window scores the same number of tokens)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size]
            total += float(model(batch, labels=batch).loss) * batch.shape[0]
    return total / ids.shape[0]


def build_pass(pass_type: str, config: dict[str, Any]):
    if pass_type not in PROFILE_PASSES:
        raise LlmcompError(f"profile supports --pass {' or '.join(PROFILE_PASSES)}, got {pass_type!r}")
    cls = pass_registry()[pass_type]
    return cls(cls.Config.model_validate(config))


class _Replay(nn.Module):
    """Stands in for block 0 while block ``i`` is measured: returns block ``i``'s recorded input for
    the current batch (``batch`` is set by the caller), in the structure the real blocks return."""

    def __init__(self, inputs: list[torch.Tensor], as_tuple: bool) -> None:
        super().__init__()
        self.inputs, self.as_tuple, self.batch = inputs, as_tuple, 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.inputs[self.batch]
        return (out,) if self.as_tuple else out


class _Skip(nn.Module):
    """Stands in for blocks 1..i-1: passes the replayed hidden state through."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[start:start + batch_size] for start in range(0, ids.shape[0], batch_size)]


def record_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                        batch_size: int) -> tuple[float, list[list[torch.Tensor]], bool]:
    """One forward: the mean NLL, every block's input hidden state per batch, and whether blocks
    return tuples (older transformers) or tensors."""
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    as_tuple = [False]

    def pre_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    def out_hook(module: nn.Module, args: tuple, output: Any) -> None:
        as_tuple[0] = isinstance(output, tuple)

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[0].register_forward_hook(out_hook))
    try:
        nll = mean_nll(model, ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    return nll, inputs, as_tuple[0]


def mean_nll_from(model: nn.Module, blocks: nn.ModuleList, start: int, inputs: list[torch.Tensor], as_tuple: bool,
                  ids: torch.Tensor, batch_size: int) -> float:
    """:func:`mean_nll` computing only blocks ``start`` onwards from their recorded ``inputs``."""
    if start == 0:
        return mean_nll(model, ids, batch_size)
    saved = [blocks[j] for j in range(start)]
    replay = _Replay(inputs, as_tuple)
    blocks[0] = replay
    for j in range(1, start):
        blocks[j] = _Skip(as_tuple)
    total = 0.0
    try:
        with torch.no_grad():
            for b, batch in enumerate(_batches(ids, batch_size)):
                replay.batch = b
                total += float(model(batch, labels=batch, use_cache=False).loss) * batch.shape[0]
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block
    return total / ids.shape[0]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from llmcomp.pipeline import find_decoder_layers

    handle = find_decoder_layers(model, model.config.num_hidden_layers)
    return handle.prefix, model.get_submodule(handle.prefix)


def profile_model(model: nn.Module, ids: torch.Tensor, pass_type: str, config: dict[str, Any],
                  batch_size: int = 4, on_layer: Any = None) -> Profile:
    """Cost of compressing each (block, layer type) alone; ``model`` is restored afterwards."""
    p = build_pass(pass_type, config)
    prefix, blocks = decoder_blocks(model)
    base, inputs, as_tuple = record_block_inputs(model, blocks, ids, batch_size)
    profile = Profile(pass_type, config, base, int(ids.numel() - ids.shape[0]))
    for i, block in enumerate(blocks):
        for layer_type in LAYER_TYPES:
            linear = block.get_submodule(layer_type)
            name = f"{prefix}.{i}.{layer_type}"
            state = ModuleState(name, (linear.out_features, linear.in_features))
            replacement, report = p.compress_module(name, linear, state, None)
            set_submodule(block, layer_type, replacement)
            try:
                delta = mean_nll_from(model, blocks, i, inputs[i], as_tuple, ids, batch_size) - base
            finally:
                set_submodule(block, layer_type, linear)
            profile.costs.append(LayerCost(name, i, layer_type, delta, linear.weight.numel() - report["params"],
                                           float(report["rel_error"])))
            if on_layer is not None:
                on_layer(name)
    return profile


def plan_recipe(profile: Profile, dense_fraction: float) -> dict[str, Any]:
    """A recipe: the pass with its profiled settings, the costliest ``dense_fraction`` of layers
    (by NLL increase per parameter saved) kept dense, the sensitivity defaults switched off."""
    ranked = sorted(profile.costs, key=lambda c: c.cost_per_param, reverse=True)
    dense = sorted(c.name for c in ranked[: round(dense_fraction * len(ranked))])
    entry = {"type": profile.pass_type, **profile.pass_config, "dense_first_blocks": 0, "dense_modules": [],
             "overrides": {name: {"keep_dense": True} for name in dense}}
    return {"name": f"{profile.pass_type}-profiled",
            "description": (f"{profile.pass_type} with the {len(dense)} most sensitive of {len(ranked)} layers kept "
                            f"dense (llmcomp profile, cost per parameter saved)"),
            "passes": [entry]}


def cost_matrix(profile: Profile) -> list[list[float]]:
    blocks = max(c.block for c in profile.costs) + 1
    grid = [[math.nan] * len(LAYER_TYPES) for _ in range(blocks)]
    for c in profile.costs:
        grid[c.block][LAYER_TYPES.index(c.layer_type)] = c.delta_nll
    return grid


def plot_heatmap(profile: Profile, path: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise LlmcompError("the heat map needs matplotlib: pip install 'llmcomp[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = cost_matrix(profile)
    fig, ax = plt.subplots(figsize=(6.0, max(3.0, 0.25 * len(grid) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(LAYER_TYPES)), [t.split(".")[-1] for t in LAYER_TYPES], rotation=45, ha="right")
    ax.set_ylabel("decoder block")
    ax.set_title(f"NLL increase, one layer {profile.pass_type} at a time (base ppl {math.exp(profile.base_nll):.2f})",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="delta NLL (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=HEATMAP_DPI)
    plt.close(fig)
    return path


def write_outputs(profile: Profile, stage: Path, dense_fraction: float) -> None:
    import json

    (stage / "profile.json").write_text(json.dumps(profile.to_json(), indent=2))
    (stage / "plan.yaml").write_text(yaml.safe_dump(plan_recipe(profile, dense_fraction), sort_keys=False))
    plot_heatmap(profile, stage / "heatmap.png")


def pass_settings(ratio: float | None, chi: int | None, energy: float | None, num_cores: int,
                  pass_type: str) -> dict[str, Any]:
    """The pass config the profile measures (and the plan reuses)."""
    cfg: dict[str, Any] = {}
    for key, value in (("ratio", ratio), ("chi", chi), ("energy", energy)):
        if value is not None:
            cfg[key] = value
    if pass_type == "tensornet":
        cfg["num_cores"] = num_cores
    FactorizedConfig.model_validate({k: v for k, v in cfg.items() if k != "num_cores"})
    return cfg
