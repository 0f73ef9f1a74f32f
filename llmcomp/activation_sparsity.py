"""Apply ``--activation-sparsity S --activation-criterion wina|teal`` to a loaded model.

Why at load time: activation sparsity changes no weight, so any checkpoint (dense, int8, int4)
can run it. Every linear layer inside the decoder layers (never the head) that is not wrapped
yet becomes an :class:`~llmcomp.modules.activation_sparse.ActivationSparseLinear` with column
norms computed now from its (dequantized) weight; layers the ``wina`` pass wrapped keep their
stored norms and use their calibrated per-matrix allocation when ``S`` is one of its targets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from llmcomp.errors import LlmcompError
from llmcomp.modules.activation_sparse import CRITERIA, MAX_SPARSITY, MODES, ActivationSparseLinear
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.passes.base import set_submodule

DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")
# WINA's public code gives real column norms only to these inputs; the rest score by |x| alone.
PUBLIC_WINA_MODULES = ("k_proj", "gate_proj")
NORM_SCOPES = ("all", "public")
ENV_SPARSITY = "LLMCOMP_ACTIVATION_SPARSITY"  # how `llmcomp serve` hands the flags to its worker process
ENV_CRITERION = "LLMCOMP_ACTIVATION_CRITERION"


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers (dense, int_affine or already wrapped) inside the decoder layers, by name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not DECODER_LINEAR.search(name) or any(name.startswith(p + ".") for p in found):
            continue
        if isinstance(module, ActivationSparseLinear) or type(module) in (nn.Linear, QuantLinear):
            found[name] = module
    return found


def check_settings(sparsity: float, criterion: str, mode: str = "topk", norms: str = "all") -> None:
    """One-line errors for bad flag values (the CLI turns them into ``error: ...``, exit 2)."""
    if not 0.0 <= sparsity <= MAX_SPARSITY:
        raise LlmcompError(f"--activation-sparsity must be in [0, {MAX_SPARSITY}], got {sparsity}")
    if criterion not in CRITERIA:
        raise LlmcompError(f"--activation-criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if mode not in MODES:
        raise LlmcompError(f"activation selection mode must be one of {', '.join(MODES)}, got {mode!r}")
    if norms not in NORM_SCOPES:
        raise LlmcompError(f"activation norm scope must be one of {', '.join(NORM_SCOPES)}, got {norms!r}")


def apply_activation_sparsity(model: nn.Module, sparsity: float, criterion: str = "wina", mode: str = "topk",
                              norms: str = "all", allocated: bool = True) -> dict[str, Any]:
    """Wrap/configure every decoder linear of ``model`` in place; returns a summary.

    ``norms="public"`` reproduces WINA's public code: only k_proj and gate_proj score with their
    column norms, the other projections by ``|x|`` (TEAL). ``allocated=False`` ignores stored
    allocation tables (uniform sparsity everywhere).
    """
    check_settings(sparsity, criterion, mode, norms)
    linears = decoder_linears(model)
    if not linears:
        raise LlmcompError("activation sparsity: the model has no linear layers inside decoder layers")
    wrapped = computed = 0
    weighted = total = 0.0
    for name, module in linears.items():
        if not isinstance(module, ActivationSparseLinear):
            module = ActivationSparseLinear.wrap(module, criterion)
            set_submodule(model, name, module)
            computed += 1
        wrapped += 1
        own = criterion
        if criterion == "wina" and norms == "public" and name.rsplit(".", 1)[-1] not in PUBLIC_WINA_MODULES:
            own = "teal"
        try:
            active = module.configure(sparsity, own, mode, allocated)
        except ValueError as exc:
            raise LlmcompError(f"{name}: {exc}") from None
        size = module.in_features * module.out_features
        weighted += active * size
        total += size
    return {"sparsity": sparsity, "criterion": criterion, "mode": mode, "norms": norms, "modules": wrapped,
            "norms_computed_at_load": computed, "weight_weighted_sparsity": weighted / max(total, 1.0)}


@dataclass(frozen=True)
class ActivationSettings:
    """What the ``--activation-*`` flags asked for (None sparsity: leave the model alone)."""

    sparsity: float | None = None
    criterion: str = "wina"
    mode: str = "topk"
    norms: str = "all"
    allocated: bool = True

    def check(self) -> None:
        if self.sparsity is not None:
            check_settings(self.sparsity, self.criterion, self.mode, self.norms)

    def apply(self, model: nn.Module) -> dict[str, Any] | None:
        if self.sparsity is None:
            return None
        return apply_activation_sparsity(model, self.sparsity, self.criterion, self.mode, self.norms, self.allocated)

    def to_env(self) -> dict[str, str]:
        """Environment for a worker process (``llmcomp serve`` loads the model in a child process)."""
        if self.sparsity is None:
            return {}
        return {ENV_SPARSITY: repr(self.sparsity), ENV_CRITERION: self.criterion}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ActivationSettings:
        env = dict(os.environ) if env is None else env
        raw = env.get(ENV_SPARSITY)
        if not raw:
            return cls()
        try:
            sparsity = float(raw)
        except ValueError:
            raise LlmcompError(f"{ENV_SPARSITY} must be a number, got {raw!r}") from None
        return cls(sparsity, env.get(ENV_CRITERION, "wina"))


def configure_from_env(name: str, module: nn.Module) -> None:
    """Engines that build modules one by one (the vLLM plugin) apply the worker's flags here:
    an :class:`ActivationSparseLinear` runs at the sparsity the environment names, others are untouched."""
    settings = ActivationSettings.from_env()
    if settings.sparsity is None or not isinstance(module, ActivationSparseLinear):
        return
    settings.check()
    try:
        module.configure(settings.sparsity, settings.criterion, settings.mode, settings.allocated)
    except ValueError as exc:
        raise LlmcompError(f"{name}: {exc}") from None


@contextmanager
def applied_at_load(settings: ActivationSettings, skip: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Within the block, every :func:`llmcomp.loading.load_model` applies ``settings`` to what it loads
    (except the first ``skip`` loads: a baseline evaluated first stays dense).

    Why a context: evaluation loads each model deep inside its runner; the post-load callback of
    :mod:`llmcomp.loading` keeps that code unaware of activation sparsity. Yields the list of
    summaries (one per model loaded).
    """
    from llmcomp.loading import post_load_callback

    settings.check()
    summaries: list[dict[str, Any]] = []
    if settings.sparsity is None:
        yield summaries
        return
    loads = [0]

    def apply(model: Any) -> None:
        loads[0] += 1
        if loads[0] > skip:
            summaries.append(settings.apply(model) or {})

    with post_load_callback(apply):
        yield summaries
