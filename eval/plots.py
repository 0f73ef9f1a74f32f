"""Quality-vs-size plots across models: one panel per task, Pareto front highlighted."""

from __future__ import annotations

from pathlib import Path

from llmcomp.errors import LlmcompError
from llmcomp.eval.runner import ModelResult
from llmcomp.eval.tasks import TaskSpec

X_AXES = {
    "bits": ("bits_per_weight", "bits per weight (decoder linears)"),
    "size": ("disk_mb", "size on disk (MiB)"),
}
PANEL_INCHES = (5.0, 4.0)
DPI = 120


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both size (smaller) and quality, sorted by size."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def _x_value(model: ModelResult, axis: str) -> float | None:
    attr = X_AXES[axis][0]
    return getattr(model.size, attr)


def plot_tradeoff(models: list[ModelResult], specs: list[TaskSpec], path: Path, x_axis: str = "bits") -> Path:
    """Write a PNG with quality (each task's primary metric) against model size; returns ``path``."""
    if x_axis not in X_AXES:
        raise LlmcompError(f"unknown plot axis {x_axis!r}; allowed: {', '.join(X_AXES)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [s for s in specs if any(s.name in m.results for m in models)]
    if not panels:
        raise LlmcompError("nothing to plot: no task produced a result")
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]),
                             squeeze=False)
    skipped = set()
    for ax, spec in zip(axes[0], panels, strict=True):
        metric = spec.primary_metric
        points = []
        for model in models:
            x, y = _x_value(model, x_axis), model.results.get(spec.name, {}).get(metric)
            if x is None or y is None:
                skipped.add(model.name)
                continue
            points.append((x, y))
            ax.scatter([x], [y], zorder=3)
            ax.annotate(model.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points, spec.higher_is_better)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), linestyle="--", color="gray", zorder=2, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xlabel(X_AXES[x_axis][1])
        ax.set_ylabel(f"{metric} ({'higher' if spec.higher_is_better else 'lower'} is better)")
        ax.set_title(spec.name)
        ax.grid(True, alpha=0.3)
    if skipped:
        fig.suptitle(f"no size/metric for: {', '.join(sorted(skipped))}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
