"""Calibration data and per-linear input statistics.

Passes that need calibration see :class:`InputStats` per linear layer rather than raw activations:
the running sums below are all DSnoT, Wanda, SparseGPT and WINA need, and they keep memory at
O(in_features^2) at most instead of O(tokens x in_features).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmcomp.errors import LlmcompError


@dataclass
class InputStats:
    """Running statistics of the inputs ``x`` (rows = tokens) seen by one linear layer."""

    in_features: int
    with_hessian: bool = False
    count: int = 0
    sum: torch.Tensor = field(init=False)
    sum_sq: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.in_features, dtype=torch.float64)
        if self.with_hessian:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features)
        xd = x.double()
        self.count += x.shape[0]
        self.sum += xd.sum(0)
        self.sum_sq += (xd * xd).sum(0)
        if self.xtx is not None:
            xf = x.float()
            self.xtx += xf.T @ xf

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sum_sq / max(self.count, 1) - self.mean**2).clamp_min(0.0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||_2^2`` per input channel (Wanda's statistic, squared)."""
        return self.sum_sq

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2/n * X^T X`` (SparseGPT/GPTQ convention)."""
        if self.xtx is None:
            raise RuntimeError("hessian was not collected; set needs_hessian on the pass")
        return self.xtx * (2.0 / max(self.count, 1))


@contextmanager
def collect_input_stats(
    modules: dict[str, nn.Linear], with_hessian: bool = False
) -> Iterator[dict[str, InputStats]]:
    """Attach forward pre-hooks that accumulate :class:`InputStats` for each named linear."""
    stats = {name: InputStats(m.in_features, with_hessian) for name, m in modules.items()}
    handles = []
    for name, module in modules.items():
        def hook(_mod: nn.Module, args: tuple, _name: str = name) -> None:
            stats[_name].update(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


# -- offline text ---------------------------------------------------------------------------------
# English prose that ships with every Debian/Ubuntu system and that anyone may use: the license
# texts. Calibration and evaluation use disjoint files, so nothing is tuned on evaluation text.
LICENSE_DIR = "/usr/share/common-licenses"
CALIBRATION_FILES = ("Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0", "LGPL-2")
EVALUATION_FILES = ("GPL-3", "GPL-2", "LGPL-2.1")


def _read_texts(names: tuple[str, ...]) -> str:
    texts = []
    for name in names:
        path = Path(LICENSE_DIR) / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not texts:
        raise LlmcompError(
            f"no offline text found in {LICENSE_DIR}; pass a text file (--calibration-file / --data-file)"
        )
    return "\n\n".join(texts)


def offline_calibration_text() -> str:
    return _read_texts(CALIBRATION_FILES)


def offline_evaluation_text() -> tuple[str, str]:
    """(text, description) of the offline evaluation corpus; disjoint from the calibration text."""
    desc = f"{LICENSE_DIR}/{{{','.join(EVALUATION_FILES)}}} (offline English license texts)"
    return _read_texts(EVALUATION_FILES), desc


def calibration_batches(
    tokenizer, text: str, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``[num_samples, seq_len]`` token windows drawn at random (fixed seed) from ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
