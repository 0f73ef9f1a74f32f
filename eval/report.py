"""Comparison of evaluated models: rows with deltas, a rich table, JSON and markdown reports."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcomp.eval.data import EvalText
from llmcomp.eval.runner import EvalSettings, ModelResult
from llmcomp.eval.tasks import TaskSpec

REPORT_SCHEMA_VERSION = 1
SIZE_TASK = "size"
LARGE_VALUE = 1e6  # printed in scientific notation (e.g. word perplexity of a random model)


@dataclass
class Row:
    """One (task, metric) line of the comparison; deltas are ``value - baseline``."""

    task: str
    metric: str
    higher_is_better: bool
    values: dict[str, float | None] = field(default_factory=dict)
    deltas: dict[str, float | None] = field(default_factory=dict)
    relative: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def better(self, model: str) -> bool | None:
        """Whether ``model`` beats the baseline on this row (None: no baseline / equal)."""
        delta = self.deltas.get(model)
        if delta is None or delta == 0:
            return None
        return (delta > 0) == self.higher_is_better


def _size_rows(models: list[ModelResult]) -> list[Row]:
    disk = Row(SIZE_TASK, "disk_mb", False, {m.name: m.size.disk_mb for m in models})
    bits = Row(SIZE_TASK, "bits_per_weight", False, {m.name: m.size.bits_per_weight for m in models})
    return [disk, bits]


def comparison_rows(models: list[ModelResult], specs: list[TaskSpec], baseline: str | None) -> list[Row]:
    """Primary metrics of every task (+ model size), with deltas against ``baseline`` if given."""
    rows = []
    for spec in specs:
        for metric in spec.metrics:
            values = {m.name: m.results.get(spec.name, {}).get(metric) for m in models}
            rows.append(Row(spec.name, metric, spec.higher_is_better, values))
    rows.extend(_size_rows(models))
    if baseline is not None:
        for row in rows:
            base = row.values.get(baseline)
            for name, value in row.values.items():
                if name == baseline or value is None or base is None:
                    continue
                row.deltas[name] = value - base
                row.relative[name] = (value - base) / base if base else None
    return rows


def format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= LARGE_VALUE:
        return f"{value:.4e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"


def format_delta(row: Row, model: str) -> str:
    delta, rel = row.deltas.get(model), row.relative.get(model)
    if delta is None:
        return ""
    text = f"{delta:+.4f}"
    return f"{text} ({rel:+.2%})" if rel is not None else text


def rich_table(rows: list[Row], models: list[ModelResult], baseline: str | None):
    """A rich Table: one column per model, deltas vs the baseline in green (better) / red (worse)."""
    from rich.table import Table

    title = "llmcomp eval" + (f" (deltas vs {baseline})" if baseline else "")
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for m in models:
        table.add_column(m.name + (" (baseline)" if m.name == baseline else ""), justify="right")
    for row in rows:
        cells = []
        for m in models:
            cell = format_value(row.values.get(m.name))
            delta = format_delta(row, m.name)
            if delta:
                better = row.better(m.name)
                color = "green" if better else "red" if better is False else "white"
                cell += f" [{color}]{delta}[/]"
            cells.append(cell)
        table.add_row(row.task, row.metric + (" ↑" if row.higher_is_better else " ↓"), *cells)
    return table


def report_dict(models: list[ModelResult], rows: list[Row], settings: EvalSettings,
                texts: dict[str, EvalText], baseline: str | None) -> dict[str, Any]:
    """The ``--output`` JSON: settings, per-task data labels, per-model results, comparison rows."""
    tasks = {}
    for spec in settings.tasks:
        tasks[spec.name] = {"description": spec.description, "metrics": list(spec.metrics),
                            "higher_is_better": spec.higher_is_better}
        if spec.name in texts:
            tasks[spec.name]["data"] = texts[spec.name].label
        elif settings.data_dir is not None:
            tasks[spec.name]["data"] = f"local files under {settings.data_dir}"
    return {
        "llmcomp_eval_version": REPORT_SCHEMA_VERSION,
        "settings": settings.to_dict(),
        "tasks": tasks,
        "baseline": baseline,
        "models": [m.to_dict() for m in models],
        "comparison": [r.to_dict() for r in rows],
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def markdown_report(data: dict[str, Any], rows: list[Row], plot_ref: str | None = None) -> str:
    """A markdown summary of :func:`report_dict` output; ``plot_ref`` is the plot's path relative to it."""
    names = [m["name"] for m in data["models"]]
    baseline = data["baseline"]
    lines = ["# llmcomp evaluation report", ""]
    settings = data["settings"]
    lines.append(
        f"Engine `{settings['engine']}`, dtype `{settings['dtype']}`, seq_len {settings['seq_len']}, "
        f"stride {settings['stride']}, few-shot {settings['num_fewshot'] or 0}, limit {settings['limit']}."
    )
    lines += ["", "## Tasks", ""]
    for name, info in data["tasks"].items():
        data_note = f" — data: {info['data']}" if "data" in info else ""
        lines.append(f"- **{name}**: {info['description']}{data_note}")
    lines += ["", "## Models", ""]
    for m in data["models"]:
        size = m["size"]
        bits = format_value(size["bits_per_weight"])
        lines.append(f"- **{m['name']}**: `{m['location']}` — bits/weight {bits} ({size['bits_source']}), "
                     f"{m['seconds']:.1f} s")
    lines += ["", "## Results", ""]
    header = ["task", "metric", *[n + (" (baseline)" if n == baseline else "") for n in names]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + " --- |" * len(header))
    for row in rows:
        cells = []
        for n in names:
            delta = format_delta(row, n)
            cells.append(format_value(row.values.get(n)) + (f" ({delta})" if delta else ""))
        arrow = "↑" if row.higher_is_better else "↓"
        lines.append(f"| {row.task} | {row.metric} {arrow} | " + " | ".join(cells) + " |")
    lines += ["", "↑ higher is better, ↓ lower is better. `wikitext2`/`c4`/`offline` are token-level "
              "perplexities; lm-eval's `wikitext` reports word perplexity per document (a different metric)."]
    if plot_ref is not None:
        lines += ["", f"![trade-off plot]({plot_ref})"]
    return "\n".join(lines) + "\n"
