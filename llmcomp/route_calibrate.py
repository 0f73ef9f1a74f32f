"""Calibrate an E-LANG router: the accuracy vs super-call fraction curve, and tau for a target.

Per example of a calibration split (never the reported one) we measure the swift energy, whether
the swift model is right and whether the super model is right. Sorting by energy (highest first)
and deferring the top k to super traces every reachable operating point exactly:
``acc(k) = (super correct among the top k + swift correct among the rest) / n``. A random router
deferring the same fraction f has expected accuracy ``(1 - f) * swift_acc + f * super_acc`` (the
straight line between the two models): the baseline an energy router must beat.

A tau read off the calibration curve is an estimate: on other data the same tau defers a different
fraction and loses a different amount. For the default target ("within ``max_drop`` of the super
model") the pick can therefore ask for a confidence: the smallest fraction whose accuracy gap to
the super model stays within ``max_drop`` at the ``1 - confidence`` quantile of a block bootstrap
of the calibration examples (blocks: ``block`` consecutive tokens of a text, whose next-token
outcomes are correlated; one document of a task). Measured on SmolLM2 (docs/ROUTING.md): the point
estimate lands 1.3 points short of super on the evaluation text, the 95% bound 0.9 within.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcomp.errors import LlmcompError
from llmcomp.routing import Calibration, CurvePoint, RouterConfig

ALL_SUPER_MARGIN = 1.0  # tau this far below the lowest energy: every example goes to super
PLOT_INCHES = (6.0, 4.5)
TOKEN_WINDOW = 512  # next-token calibration windows (as the perplexity benchmarks)
NO_BOOTSTRAP = 0  # per-example samples are what calibration needs, not stderr
PLOT_DPI = 120
TOKEN_BLOCK = 128  # bootstrap block of next-token examples (consecutive positions of one text)
RESAMPLES = 1000  # bootstrap resamples for the confidence bound
RESAMPLE_BATCH = 100  # resamples held in memory at once (each is one row of n weights)
BOOTSTRAP_SEED = 0  # the same examples always give the same tau


@dataclass(frozen=True)
class Example:
    """One calibration example: swift energy and both models' correctness."""

    task: str
    doc_id: int
    energy: float
    swift_correct: bool
    super_correct: bool
    swift_nll: float | None = None  # next-token examples: -log p(target) under each model
    super_nll: float | None = None


def routing_curve(examples: list[Example]) -> list[CurvePoint]:
    """Every operating point: defer the k highest-energy examples, k = 0..n (ties move together)."""
    if not examples:
        raise LlmcompError("no calibration examples")
    n = len(examples)
    ranked = sorted(examples, key=lambda e: -e.energy)
    swift_acc = sum(e.swift_correct for e in examples) / n
    super_acc = sum(e.super_correct for e in examples) / n
    correct = sum(e.swift_correct for e in examples)  # deferring nothing
    has_nll = all(e.swift_nll is not None and e.super_nll is not None for e in examples)
    nll = sum(e.swift_nll for e in examples) if has_nll else 0.0  # type: ignore[misc]
    points = []
    for k in range(n + 1):
        if k > 0:
            correct += ranked[k - 1].super_correct - ranked[k - 1].swift_correct
            if has_nll:
                nll += ranked[k - 1].super_nll - ranked[k - 1].swift_nll  # type: ignore[operator]
        if 0 < k < n and ranked[k - 1].energy == ranked[k].energy:
            continue  # a threshold cannot split equal energies
        if k == 0:
            tau = ranked[0].energy
        elif k == n:
            tau = ranked[-1].energy - ALL_SUPER_MARGIN
        else:
            tau = (ranked[k - 1].energy + ranked[k].energy) / 2
        f = k / n
        points.append(CurvePoint(tau=tau, super_fraction=f, acc=correct / n,
                                 random_acc=(1 - f) * swift_acc + f * super_acc,
                                 ppl=math.exp(nll / n) if has_nll else None))
    return points


def pick_point(curve: list[CurvePoint], super_fraction: float | None = None,
               acc: float | None = None) -> CurvePoint:
    """The point for a target: the largest fraction not above ``super_fraction``, or the smallest
    fraction reaching ``acc`` (the most accurate point when none does)."""
    if (super_fraction is None) == (acc is None):
        raise LlmcompError("give exactly one target: --target-fraction or --target-acc")
    if super_fraction is not None:
        if not 0.0 <= super_fraction <= 1.0:
            raise LlmcompError(f"--target-fraction must lie in [0, 1], got {super_fraction}")
        return max((p for p in curve if p.super_fraction <= super_fraction), key=lambda p: p.super_fraction)
    reaching = [p for p in curve if p.acc >= acc]  # type: ignore[operator]
    if not reaching:
        return max(curve, key=lambda p: (p.acc, -p.super_fraction))
    return min(reaching, key=lambda p: p.super_fraction)


def bootstrap_blocks(examples: list[Example], block: int) -> list[int]:
    """Block index of each example: documents of a task with ``block=1``, runs of ``block``
    consecutive positions (``doc_id``) of one text for next-token examples."""
    keys: dict[tuple[str, int], int] = {}
    return [keys.setdefault((e.task, e.doc_id // block), len(keys)) for e in examples]


def gap_bounds(examples: list[Example], weights: Any) -> Any:
    """``[R, n + 1]``: per resample (a row of ``weights``, one weight per example) and per ``k``
    (defer the ``k`` highest energies, as :func:`routing_curve`), the routed accuracy minus the
    super model's, both weighted. Paired: the super accuracy is the same resample's."""
    import numpy as np

    order = sorted(range(len(examples)), key=lambda i: -examples[i].energy)
    loss = np.array([float(examples[i].super_correct) - float(examples[i].swift_correct) for i in order])
    w = np.asarray(weights, dtype=np.float64)[:, order]
    cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w * loss, axis=1)], axis=1)
    return -(cum[:, -1:] - cum) / w.sum(axis=1, keepdims=True)


def lower_gaps(examples: list[Example], confidence: float, block: int = 1, resamples: int = RESAMPLES,
               seed: int = BOOTSTRAP_SEED) -> list[float]:
    """Per ``k`` = 0..n: the ``1 - confidence`` quantile of the bootstrapped gap to super."""
    import numpy as np

    if not 0.0 < confidence < 1.0:
        raise LlmcompError(f"--confidence must lie in (0, 1), got {confidence}")
    blocks = np.array(bootstrap_blocks(examples, block))
    count = int(blocks.max()) + 1
    rng = np.random.default_rng(seed)
    gaps = []
    for start in range(0, resamples, RESAMPLE_BATCH):
        drawn = rng.multinomial(count, np.full(count, 1.0 / count), size=min(RESAMPLE_BATCH, resamples - start))
        gaps.append(gap_bounds(examples, drawn[:, blocks]))
    return np.quantile(np.concatenate(gaps), 1.0 - confidence, axis=0).tolist()


def pick_within(curve: list[CurvePoint], n: int, max_drop: float, lower: list[float] | None = None) -> CurvePoint:
    """The fewest super calls within ``max_drop`` of the super model: on the curve itself, or with
    ``lower`` (from :func:`lower_gaps`) where the lower bound of the gap is within it; all super
    calls when no point is."""
    super_acc = curve[-1].acc
    for point in curve:
        gap = lower[round(point.super_fraction * n)] if lower is not None else point.acc - super_acc
        if gap >= -max_drop - 1e-12:
            return point
    return curve[-1]


def split_spec(spec: Any, split: str) -> Any:
    """``spec`` reading the local file ``DIR/<task>/<split>.*`` instead of its validation file."""
    return dataclasses.replace(spec, local_files=((spec.local_files[0][0], split),))


def task_samples(lm: Any, specs: list[Any], data_dir: Path, limit: int | float | None) -> dict[str, list[dict]]:
    """lm-eval's per-document samples (with their metrics) of ``lm`` on ``specs``."""
    import lm_eval

    from llmcomp.eval.harness import local_task_config, quiet_libraries, task_manager

    with quiet_libraries():
        manager = task_manager()
        tasks = [local_task_config(manager, s, data_dir) for s in specs]
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                          log_samples=True, bootstrap_iters=NO_BOOTSTRAP)
    return {s.name: results["samples"][s.name] for s in specs}


def collect_examples(swift_model: Any, super_model: Any, tokenizer: Any, config: RouterConfig, specs: list[Any],
                     data_dir: Path, limit: int | float | None = None, slots: int = 16,
                     progress: bool = True) -> list[Example]:
    """Score ``specs`` with both models; per document: swift energy, swift and super ``acc``."""
    from llmcomp.eval.routed import RoutedLM
    from llmcomp.eval.runtime_lm import RuntimeLM

    for spec in specs:
        if "acc" not in spec.metrics:
            raise LlmcompError(f"task {spec.name} reports no per-example 'acc'; calibrate on acc tasks "
                               "(sst2, rte, qnli, mrpc, qqp, mnli, wnli)")
    swift_lm = RoutedLM(swift_model, tokenizer, config, None, slots=slots, progress=progress)
    swift = task_samples(swift_lm, specs, data_dir, limit)
    super_ = task_samples(RuntimeLM(super_model, tokenizer, slots=slots, progress=progress), specs, data_dir, limit)
    examples = []
    for spec in specs:
        by_doc = {s["doc_id"]: s for s in super_[spec.name]}
        for sample in swift[spec.name]:
            doc = sample["doc_id"]
            examples.append(Example(spec.name, doc, swift_lm.stats.doc_energy[(spec.name, doc)],
                                    bool(sample["acc"]), bool(by_doc[doc]["acc"])))
    return examples


def token_examples(swift_model: Any, super_model: Any, tokenizer: Any, config: RouterConfig, text: str,
                   seq_len: int = TOKEN_WINDOW, max_tokens: int | None = None,
                   source: str = "offline") -> list[Example]:
    """Next-token examples (generation, teacher-forced): per position of ``text`` in non-overlapping
    windows, the swift energy of its next-token logits and whether each model's argmax is the
    actual next token, with both models' NLL of it (the routed perplexity)."""
    import torch

    from llmcomp.eval.perplexity import plan_windows, tokenize_text
    from llmcomp.routing import routing_energy
    from llmcomp.runtime import ModelRunner

    ids = tokenize_text(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    runners = [ModelRunner(m, max_batch_size=1, max_model_len=seq_len) for m in (swift_model, super_model)]
    examples: list[Example] = []
    for window in plan_windows(ids.numel(), seq_len, None):
        tokens = ids[window.begin:window.end].tolist()
        targets = torch.tensor(tokens[1:])
        outs = []
        for runner in runners:
            runner.free(0)
            logits = runner.prefill(0, tokens[:-1], logits_for_all=True).float()
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            outs.append((logits, logits.argmax(-1) == targets, nll))
        values = routing_energy(outs[0][0], config).tolist()
        for j, value in enumerate(values):
            examples.append(Example(source, window.begin + j, value, bool(outs[0][1][j]), bool(outs[1][1][j]),
                                    float(outs[0][2][j]), float(outs[1][2][j])))
    return examples


def calibrated_router(examples: list[Example], base: RouterConfig, tasks: list[str], split: str,
                      super_fraction: float | None = None, acc: float | None = None,
                      max_drop: float | None = None, confidence: float | None = None,
                      block: int = 1) -> RouterConfig:
    """``base`` with tau picked for the target (one of ``super_fraction``, ``acc``, ``max_drop``;
    the last optionally at a bootstrap ``confidence``) and the calibration record filled in."""
    curve = routing_curve(examples)
    if max_drop is not None:
        if super_fraction is not None or acc is not None:
            raise LlmcompError("give one target: --target-fraction, --target-acc or --max-drop")
        lower = lower_gaps(examples, confidence, block) if confidence else None
        point = pick_within(curve, len(examples), max_drop, lower)
        target = f"super-{max_drop}" + (f" at {confidence:g} confidence (block bootstrap, blocks of {block})"
                                        if confidence else "")
    else:
        point = pick_point(curve, super_fraction, acc)
        target = f"super_fraction={super_fraction}" if super_fraction is not None else f"acc={acc}"
    calibration = Calibration(tasks=tasks, split=split, examples=len(examples), target=target,
                              swift_acc=curve[0].acc, super_acc=curve[-1].acc, curve=curve)
    return base.model_copy(update={"tau": point.tau, "calibration": calibration})


def plot_curve(config: RouterConfig, path: Path, title: str = "E-LANG routing") -> Path:
    """Accuracy vs super-call fraction: the energy router, the random router, swift- and super-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = config.calibration
    if cal is None:
        raise LlmcompError("the router has no calibration curve to plot")
    xs = [p.super_fraction for p in cal.curve]
    fig, ax = plt.subplots(figsize=PLOT_INCHES)
    ax.plot(xs, [p.acc for p in cal.curve], label="energy router", color="tab:blue")
    ax.plot(xs, [p.random_acc for p in cal.curve], "--", label="random router (expected)", color="tab:gray")
    ax.scatter([0.0], [cal.swift_acc], marker="o", color="tab:orange", zorder=3, label="swift only")
    ax.scatter([1.0], [cal.super_acc], marker="s", color="tab:green", zorder=3, label="super only")
    chosen = min(cal.curve, key=lambda p: abs(p.tau - config.tau))
    ax.scatter([chosen.super_fraction], [chosen.acc], marker="*", s=120, color="tab:red", zorder=4,
               label=f"tau={config.tau:.3g}")
    ax.set_xlabel("fraction of super-model calls")
    ax.set_ylabel(f"accuracy ({', '.join(cal.tasks)}, {cal.split}, n={cal.examples})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
