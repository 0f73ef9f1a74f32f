"""Per-matrix sparsity allocation (TEAL's greedy) and thresholds for the ``wina`` pass.

Why greedy per block: matrices differ in how much output error dropping inputs costs them (an
MLP down projection reads a heavy-tailed input, a key projection a flat one). Starting from 0,
the group whose next step (``step``) adds the least block-output error is raised, until the
size-weighted average sparsity of the block reaches each target of the grid in turn; one
trajectory serves every target. Groups are the modules reading one input (q/k/v, o, gate/up,
down), as in TEAL's code. The error is the squared L2 of the decoder layer's output against the
dense layer's on the last ``TAIL`` of each calibration window (positions with context).

Thresholds (TEAL's runtime mode): per matrix and target, the quantile at the allocated sparsity
of its score distribution (``|x|`` or ``|x| * ||W[:, i]||``) over the dense model's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmcomp.modules.activation_sparse import ActivationSparseLinear, scores

TAIL = 0.25  # error measured on the last quarter of each window (TEAL)
MAX_GROUP_SPARSITY = 0.95  # no group is raised beyond this
QUANTILE_MAX_VALUES = 1 << 22  # torch.quantile's input limit is 16M; subsample beyond this
LAYER_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

Call = tuple[tuple[Any, ...], dict[str, Any]]


def capture_layer_calls(model: nn.Module, layers: list[nn.Module], ids: torch.Tensor) -> list[list[Call]]:
    """The (args, kwargs) every decoder layer is called with in a dense forward of each window of ``ids``."""
    calls: list[list[Call]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, _i: int = i) -> None:
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            calls[_i].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kw))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            for row in ids:
                model(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _run(layer: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for args, kwargs in calls:
            out = layer(*args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _tail(t: torch.Tensor) -> torch.Tensor:
    """The last ``TAIL`` of the positions (dim -2)."""
    steps = t.shape[-2]
    return t[..., steps - max(1, int(round(steps * TAIL))):, :]


def wrapped_linears(layer: nn.Module, criterion: str) -> dict[str, ActivationSparseLinear]:
    """The layer's linears as ActivationSparseLinear (wrapping dense/int ones in place), by child name."""
    found = {}
    for group in LAYER_GROUPS:
        for name in group:
            mod = layer.get_submodule(name)
            if not isinstance(mod, ActivationSparseLinear):
                mod = ActivationSparseLinear.wrap(mod, criterion)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, mod)
            mod.use_kernel = False  # calibration runs many tokens per call anyway
            found[name] = mod
    return found


def attention_half(layer: nn.Module, call: Call) -> torch.Tensor:
    """``x + self_attn(input_layernorm(x))`` of a Llama-family decoder layer (its first residual half)."""
    args, kwargs = call
    x = args[0] if args else kwargs["hidden_states"]
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    out = layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)
    return x + (out[0] if isinstance(out, tuple) else out)


def mlp_half(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``h + mlp(post_attention_layernorm(h))``: per token, so it can run on the tail alone."""
    return h + layer.mlp(layer.post_attention_layernorm(h))


def greedy_allocation(layer: nn.Module, calls: list[Call], grid: list[float], step: float, criterion: str,
                      on_step: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Per child linear, its sparsity at each target of ``grid`` (increasing), by TEAL's greedy.

    The error of a candidate is the layer output's on the tail positions. Both halves are exact
    there: an attention candidate reruns the attention on every position and the MLP on the tail;
    an MLP candidate (per-token computation) reruns only the MLP on the cached tail inputs. An
    attention candidate's attention output depends only on the attention levels, so it is kept
    until an attention group is raised (and the winner's becomes the new current one).
    """
    mods = wrapped_linears(layer, criterion)
    sizes = [sum(mods[n].in_features * mods[n].out_features for n in g) for g in LAYER_GROUPS]
    total = float(sum(sizes))
    attention_groups = {g for g, names in enumerate(LAYER_GROUPS) if names[0].startswith("self_attn.")}

    def set_levels(levels: list[float]) -> None:
        for group, level in zip(LAYER_GROUPS, levels, strict=True):
            for name in group:
                mods[name].configure(level, criterion, "topk", allocated=False)

    def heads() -> list[torch.Tensor]:  # tail of the attention half, at the current levels
        with torch.inference_mode():
            return [_tail(attention_half(layer, c)) for c in calls]

    def tails_error(h1: list[torch.Tensor]) -> float:
        with torch.inference_mode():
            return float(sum(((mlp_half(layer, h).double() - d) ** 2).sum() for h, d in zip(h1, dense, strict=True)))

    levels = [0.0] * len(LAYER_GROUPS)
    set_levels(levels)
    h1 = heads()
    with torch.inference_mode():
        dense = [mlp_half(layer, h).double() for h in h1]
    table: dict[str, list[float]] = {n: [] for g in LAYER_GROUPS for n in g}
    candidate_heads: dict[int, list[torch.Tensor]] = {}  # attention group -> heads with it raised
    for target in grid:
        while sum(s * n for s, n in zip(levels, sizes, strict=True)) / total < target - 1e-9:
            best, best_err = None, float("inf")
            for g in range(len(LAYER_GROUPS)):
                if levels[g] + step > MAX_GROUP_SPARSITY + 1e-9:
                    continue
                trial = list(levels)
                trial[g] = round(trial[g] + step, 6)
                set_levels(trial)
                if g in attention_groups and g not in candidate_heads:
                    candidate_heads[g] = heads()
                err = tails_error(candidate_heads[g] if g in attention_groups else h1)
                if err < best_err:
                    best, best_err = g, err
            if best is None:
                break
            levels[best] = round(levels[best] + step, 6)
            set_levels(levels)
            if best in attention_groups:
                h1 = candidate_heads[best]
                candidate_heads.clear()
            if on_step is not None:
                on_step()
        for group, level in zip(LAYER_GROUPS, levels, strict=True):
            for name in group:
                table[name].append(level)
    set_levels([0.0] * len(LAYER_GROUPS))
    return table


def score_thresholds(layer: nn.Module, calls: list[Call], table: dict[str, list[float]],
                     criterion: str) -> dict[str, list[float]]:
    """Per child linear and target: the score quantile at its allocated sparsity (dense inputs)."""
    mods = wrapped_linears(layer, criterion)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    handles = []
    for name, mod in mods.items():
        mod.configure(0.0, criterion, "topk", allocated=False)
        norms = mod.col_norms if criterion == "wina" else None

        def hook(m: nn.Module, args: tuple, _n: str = name, _norms: torch.Tensor | None = norms) -> None:
            x = m.rotate(args[0]).reshape(-1, m.in_features)
            seen[_n].append(scores(x, _norms).reshape(-1))

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        _run(layer, calls)
    finally:
        for h in handles:
            h.remove()
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, chunks in seen.items():
        values = torch.cat(chunks)
        if values.numel() > QUANTILE_MAX_VALUES:
            values = values[torch.randperm(values.numel(), generator=gen)[:QUANTILE_MAX_VALUES]]
        qs = torch.tensor(table[name], dtype=torch.float32).clamp(0.0, 1.0)
        out[name] = [float(v) for v in torch.quantile(values.float(), qs)]
    return out


def calibrate_layers(model: nn.Module, layers: list[nn.Module], ids: torch.Tensor, grid: list[float], step: float,
                     criterion: str, allocate: bool = True,
                     on_layer: Callable[[int], None] | None = None) -> list[dict[str, dict[str, list[float]]]]:
    """Per decoder layer ``{child: {"sparsity": [...], "threshold": [...]}}`` for every target of ``grid``.

    Layers are calibrated on the dense model's hidden states (one capture). Without ``allocate``
    every matrix gets the target itself (uniform) and only thresholds are calibrated.
    """
    calls = capture_layer_calls(model, layers, ids)
    plans = []
    for i, layer in enumerate(layers):
        if allocate:
            table = greedy_allocation(layer, calls[i], grid, step, criterion)
        else:
            table = {n: list(grid) for g in LAYER_GROUPS for n in g}
        thresholds = score_thresholds(layer, calls[i], table, criterion)
        plans.append({n: {"sparsity": table[n], "threshold": thresholds[n]} for n in table})
        if on_layer is not None:
            on_layer(i)
    return plans
