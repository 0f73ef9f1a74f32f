"""E-LANG routing between a swift (compressed) and a super (original) model.

The swift model runs first; the energy of its output distribution,
``E(x) = -T * logsumexp(logits(x) / T)``, is low when some logits are large (the model is sure)
and high when all are small. Above a threshold ``tau`` the input goes to the super model. Both
models are black boxes: the router only needs the swift model's logits at one position (the
answer position of a scoring request, or the last prompt token after prefill).

``router.json`` (:class:`RouterConfig`) holds ``tau``, ``T``, the mode, what the energy is taken
over, and the calibration curve that ``llmcomp route calibrate`` measured to pick ``tau``.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmcomp.errors import LlmcompError
from llmcomp.formats.atomic import write_file_atomic

ROUTER_FORMAT = "llmcomp-router"
ROUTER_VERSION = 1
SWIFT, SUPER = "swift", "super"
Mode = Literal["request", "token"]  # request: one decision per input (after prefill); token: per step
OnSpike = Literal["takeover", "defer", "verify"]  # token mode: the super model makes the rest, that one token,
# or checks the last `window` swift tokens and makes the next one (swift tokens are held back until checked)
DEFAULT_WINDOW = 4
EnergyOver = Literal["vocab", "choices"]  # the whole vocabulary, or the answer choices' first tokens


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-T * logsumexp(logits / T)`` over the last dimension, in at least float32.

    Why at least float32: bf16 logits of a 49k vocabulary lose the differences that separate a
    sure from an unsure prediction in the sum.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"the energy temperature must be positive and finite, got {temperature}")
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -temperature * torch.logsumexp(x / temperature, dim=-1)


def routing_energy(logits: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """The router's score of ``logits [..., V]``: the energy, of log-probabilities with ``normalize``."""
    if config.normalize:
        logits = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return energy(logits, config.temperature)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CurvePoint(_Model):
    """One point of the calibration curve: route inputs with energy above ``tau`` to super."""

    tau: float
    super_fraction: float = Field(ge=0.0, le=1.0)
    acc: float = Field(ge=0.0, le=1.0)
    random_acc: float = Field(ge=0.0, le=1.0, description="expected accuracy of a random router at this fraction")
    ppl: float | None = Field(default=None, description="next-token examples: perplexity of the routed predictions")


class Calibration(_Model):
    """What ``tau`` was chosen from: the data, the target and the measured curve."""

    tasks: list[str]
    split: str
    examples: int = Field(ge=1)
    target: str = Field(description="e.g. 'super_fraction=0.3' or 'acc=0.81'")
    swift_acc: float
    super_acc: float
    curve: list[CurvePoint]


class RouterConfig(_Model):
    """The contents of ``router.json``."""

    format: Literal["llmcomp-router"] = ROUTER_FORMAT
    version: Literal[1] = ROUTER_VERSION
    tau: float = Field(description="inputs whose swift energy is above tau go to the super model")
    temperature: float = Field(default=1.0, gt=0.0, description="T of the energy")
    mode: Mode = "request"
    on_spike: OnSpike = Field(default="takeover", description="mode token: at a step above tau the super model "
                              "makes that token and all the rest (takeover) or only that token, then the swift "
                              "model goes on (defer), or also checks the last `window` swift tokens first (verify)")
    window: int = Field(default=DEFAULT_WINDOW, ge=1, le=64, description="on_spike verify: swift tokens the super "
                        "model checks at a spike; the server holds that many back until they are checked")
    energy_over: EnergyOver = "vocab"
    normalize: bool = Field(default=False, description="take the energy of log-probabilities (log_softmax) instead "
                            "of raw logits: shift-invariant; for T < 1 a Renyi entropy (not in the paper)")
    swift: str | None = None
    super: str | None = None
    calibration: Calibration | None = None


def load_router(path: str | Path) -> RouterConfig:
    """Read and validate ``router.json`` (one-line errors for a missing or malformed file)."""
    path = Path(path)
    if not path.is_file():
        raise LlmcompError(f"router file {path} does not exist")
    try:
        return RouterConfig.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise LlmcompError(f"{path} is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise LlmcompError(f"{path}: {where}: {first['msg']}") from None


def save_router(config: RouterConfig, path: str | Path) -> None:
    """Write ``router.json`` atomically (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, config.model_dump_json(indent=2) + "\n")


@dataclass(frozen=True)
class Decision:
    """One routing decision: the swift energy and which model answers."""

    energy: float
    model: str  # SWIFT or SUPER

    @property
    def deferred(self) -> bool:
        return self.model == SUPER


class Router:
    """Threshold rule on the swift energy; ``tau`` may be changed at any time (thread-safe)."""

    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self._lock = threading.Lock()

    @property
    def config(self) -> RouterConfig:
        with self._lock:
            return self._config

    @property
    def tau(self) -> float:
        return self.config.tau

    @property
    def temperature(self) -> float:
        return self.config.temperature

    def update(self, tau: float | None = None, temperature: float | None = None) -> RouterConfig:
        """A new tau and/or T, validated; takes effect for the next decision."""
        with self._lock:
            changes = {k: v for k, v in (("tau", tau), ("temperature", temperature)) if v is not None}
            self._config = RouterConfig.model_validate({**self._config.model_dump(), **changes})
            return self._config

    def energy(self, logits: torch.Tensor) -> torch.Tensor:
        return routing_energy(logits, self.config)

    def decide_energy(self, value: float) -> Decision:
        """Super when the energy is strictly above tau."""
        return Decision(float(value), SUPER if value > self.tau else SWIFT)

    def decide(self, logits: torch.Tensor) -> Decision:
        """The decision for one position's logits ``[V]``."""
        if logits.dim() != 1:
            raise ValueError(f"decide takes one position's logits [V], got shape {tuple(logits.shape)}")
        config = self.config
        value = float(routing_energy(logits, config))
        return Decision(value, SUPER if value > config.tau else SWIFT)
