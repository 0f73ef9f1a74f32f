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
from typing import Any

import torch
from torch import nn

from llmcomp.errors import LlmcompError

# A fixed-size sample of |x| per input group is enough for thresholds at a quantile (TEAL) and
# keeps memory flat however much calibration text there is.
QUANTILE_SAMPLE = 65536
QUANTILE_SEED = 0


@dataclass
class InputStats:
    """Running statistics of the inputs ``x`` (rows = tokens) of one input group.

    Modules reading the same input (q/k/v, gate/up) share one object: one Hessian, not three.
    """

    in_features: int
    with_hessian: bool = False
    with_quantiles: bool = False
    count: int = 0
    sum: torch.Tensor = field(init=False)
    sum_sq: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False, default=None)
    abs_sample: list[torch.Tensor] = field(init=False, default_factory=list)
    modules: list[str] = field(default_factory=list)  # the names reading this input, in call order

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.in_features, dtype=torch.float64)
        if self.with_hessian:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32)
        self._gen = torch.Generator().manual_seed(QUANTILE_SEED)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features)
        xd = x.double()
        self.count += x.shape[0]
        self.sum += xd.sum(0)
        self.sum_sq += (xd * xd).sum(0)
        if self.xtx is not None:
            xf = x.float()
            self.xtx += xf.T @ xf
        if self.with_quantiles:
            values = x.float().abs().reshape(-1)
            take = min(values.numel(), QUANTILE_SAMPLE)
            idx = torch.randperm(values.numel(), generator=self._gen)[:take]
            self.abs_sample.append(values[idx])
            pooled = torch.cat(self.abs_sample)
            if pooled.numel() > QUANTILE_SAMPLE:  # keep a uniform subsample of everything seen
                keep = torch.randperm(pooled.numel(), generator=self._gen)[:QUANTILE_SAMPLE]
                pooled = pooled[keep]
            self.abs_sample = [pooled]

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
            raise RuntimeError("hessian was not collected; declare Needs(hessian=True) on the pass")
        return self.xtx * (2.0 / max(self.count, 1))

    def abs_quantile(self, q: float) -> float:
        """The ``q`` quantile of ``|x|`` over all entries seen (from a fixed-seed sample)."""
        if not self.abs_sample:
            raise RuntimeError("quantiles were not collected; declare Needs(quantiles=True) on the pass")
        return float(torch.quantile(self.abs_sample[0], q))


class StopForward(Exception):
    """Raised inside a forward pass once everything wanted from it was recorded."""


class InputObserver:
    """Forward pre-hooks that feed :class:`InputStats`, one per *input group*.

    Modules called with the very same input tensor within one forward of the layer share a group
    (q/k/v read the same normed hidden state). Groups are numbered in the order the forward first
    reaches them, which is also the order sequential passes compress them in.
    """

    def __init__(self, modules: dict[str, nn.Module], hessian: bool = False, quantiles: bool = False,
                 one_group: bool = False) -> None:
        """``one_group``: the modules are known to read one input (a group found earlier); the forward
        is then stopped as soon as that input was recorded (:class:`StopForward`)."""
        self.modules = modules
        self.hessian, self.quantiles = hessian, quantiles
        self.groups: list[InputStats] = []
        self.group_of: dict[str, InputStats] = {}
        self.one_group = one_group
        if one_group:
            first = next(iter(modules.values()))
            shared = InputStats(first.in_features, hessian, quantiles, modules=list(modules))
            self.groups = [shared]
            self.group_of = dict.fromkeys(modules, shared)
        self._batch = 0
        self._seen: dict[int, tuple[int, torch.Tensor]] = {}  # id(group) -> (batch, last input)
        self._handles: list[Any] = []

    def new_batch(self) -> None:
        """Call before each forward of the layer."""
        self._batch += 1
        self._seen.clear()

    def _hook(self, name: str, x: torch.Tensor) -> None:
        group = self.group_of.get(name)
        if group is None:
            for candidate in self.groups:  # a sibling already saw this very tensor in this forward
                seen = self._seen.get(id(candidate))
                if seen is not None and seen[0] == self._batch and seen[1] is x:
                    group = candidate
                    break
            if group is None:
                group = InputStats(x.shape[-1], self.hessian, self.quantiles)
                self.groups.append(group)
            group.modules.append(name)
            self.group_of[name] = group
        seen = self._seen.get(id(group))
        if seen is not None and seen[0] == self._batch and seen[1] is x:
            return  # a sibling already recorded this input
        self._seen[id(group)] = (self._batch, x)
        group.update(x)
        if self.one_group:
            raise StopForward

    def __enter__(self) -> InputObserver:
        for name, module in self.modules.items():
            def hook(_mod: nn.Module, args: tuple, _name: str = name) -> None:
                self._hook(_name, args[0])

            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def stats(self) -> dict[str, InputStats]:
        return dict(self.group_of)


@contextmanager
def collect_input_stats(
    modules: dict[str, nn.Module], with_hessian: bool = False
) -> Iterator[dict[str, InputStats]]:
    """One :class:`InputStats` per module (no grouping): for direct use in tests and tools."""
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
# For choosing hyperparameters: disjoint from both (and no revision of an evaluation text).
VALIDATION_FILES = ("MPL-1.1", "GFDL-1.2", "BSD")


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


def offline_validation_text() -> tuple[str, str]:
    """(text, description) of the offline validation corpus: tune settings here, never on evaluation text."""
    desc = f"{LICENSE_DIR}/{{{','.join(VALIDATION_FILES)}}} (offline validation texts)"
    return _read_texts(VALIDATION_FILES), desc


def offline_evaluation_text() -> tuple[str, str]:
    """(text, description) of the offline evaluation corpus; disjoint from the calibration text."""
    desc = f"{LICENSE_DIR}/{{{','.join(EVALUATION_FILES)}}} (offline English license texts)"
    return _read_texts(EVALUATION_FILES), desc


# Hub corpora for calibration: always a *train* split (the evaluation corpora use test/validation).
CALIBRATION_DOCS = 2000  # documents read from the corpus: far more tokens than 128 x 2048 windows need


def calibration_corpus(name: str) -> Any:
    """The hub source of calibration corpus ``name`` (an :class:`llmcomp.eval.data.CorpusSpec`)."""
    from llmcomp.eval.data import CorpusSpec

    corpora = {
        "wikitext2": CorpusSpec("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "\n\n",
                                max_docs=CALIBRATION_DOCS * 10, description="wikitext-2-raw-v1 train"),
        "c4": CorpusSpec("c4", "allenai/c4", None, "train", " ", max_docs=CALIBRATION_DOCS,
                         hub_kwargs=(("data_files", "en/c4-train.00000-of-01024.json.gz"),),
                         description="c4 en train shard 0"),
    }
    if name not in corpora:
        raise LlmcompError(f"unknown calibration dataset {name!r}; allowed: {', '.join(corpora)}")
    return corpora[name]


def _hub_calibration_text(name: str) -> tuple[str, str]:
    from llmcomp.eval import data

    spec = calibration_corpus(name)
    try:
        rows = data.hub_rows(spec)
    except LlmcompError:
        raise LlmcompError(f"calibration dataset {name!r} ({spec.hub_path}, {spec.split}) could not be loaded "
                           "(offline?); use calibration.data_file / --calibration-file, or drop "
                           "calibration.dataset for the offline text") from None
    rows = [r for r in rows if r.strip()][: spec.max_docs]
    return spec.separator.join(rows), f"hub {spec.hub_path}: {spec.description}"


def calibration_text(data_file: str | None, override: str | None = None,
                     dataset: str | None = None) -> tuple[str, str]:
    """(text, description) of the calibration source: the one place that decides it.

    ``override`` (text given by the caller, e.g. ``--calibration-file``) wins over the recipe's
    ``data_file`` or ``dataset`` (a hub corpus's train split); without any, the offline license
    texts (never the evaluation texts).
    """
    if override is not None:
        return override, "caller-provided text"
    if data_file:
        path = Path(data_file)
        if not path.is_file():
            raise LlmcompError(f"calibration data_file {path} does not exist")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    if dataset:
        return _hub_calibration_text(dataset)
    return offline_calibration_text(), "offline license texts (llmcomp.calibration)"


def context_length(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
