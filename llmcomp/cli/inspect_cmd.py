"""``llmcomp inspect``: validate a checkpoint and show what each module became."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from llmcomp.cli.common import console, user_errors

MODULE_COLUMNS = ("bits", "group_size", "own_group_size", "symmetric", "bits_per_weight", "rel_error", "sparsity")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _passes(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pass applied to a module, in order (format v1 reports name only the last one)."""
    if "passes" in report:
        return report["passes"]
    return [{k: v for k, v in report.items() if k not in ("shape", "numel")}] if report.get("pass") else []


def describe(path: Path, verify: bool = True) -> dict[str, Any]:
    """Validated summary of an llmcomp checkpoint (what `inspect --json` prints)."""
    from llmcomp.formats.checkpoint import validate_checkpoint

    info = validate_checkpoint(path, verify_hashes=verify)
    report = info.report() or {}
    per_module = report.get("modules", {})
    modules = {}
    # Modules with a spec were replaced (e.g. quantized); report-only ones were changed in place (pruned).
    for name in sorted(set(info.modules) | set(per_module), key=_natural_key):
        spec = info.modules[name].model_dump() if name in info.modules else {"kind": "dense"}
        merged = {**per_module.get(name, {}), **spec}
        modules[name] = {k: merged.get(k) for k in ("kind", "pass", *MODULE_COLUMNS)}
        modules[name]["passes"] = _passes(per_module.get(name, {}))
    group_counts: dict[str, int] = {}
    for m in modules.values():
        if m.get("group_size") is not None:
            key = str(m["group_size"])
            group_counts[key] = group_counts.get(key, 0) + 1
    pruned = [(r["sparsity"], r.get("numel", 0)) for r in per_module.values() if "sparsity" in r]
    pruned_numel = sum(n for _, n in pruned)
    return {
        "path": str(path),
        "format_version": info.stored_version,
        "average_sparsity": sum(s * n for s, n in pruned) / pruned_numel if pruned_numel else None,
        "recipe": info.quant.recipe,
        "architecture": (info.config.get("architectures") or ["?"])[0],
        "tensor_bytes": sum(info.files.values()),
        "files": info.files,
        "average_bits_per_weight": report.get("average_bits_per_weight"),
        "compression_ratio": report.get("compression_ratio"),
        "group_size_counts": group_counts,
        "plan": report.get("passes") or None,
        "modules": modules,
    }


@user_errors
def inspect(
    path: Path = typer.Argument(..., help="llmcomp checkpoint directory"),
    verify: bool = typer.Option(True, help="check SHA-256 of every tensor file"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    modules: bool = typer.Option(True, help="show the per-module table"),
    gg_fit: bool = typer.Option(False, "--gg", help="fit a generalized Gaussian to every linear weight and print "
                                "its shape nu per layer (2 = Gaussian, 1 = Laplacian)"),
    plot: Path | None = typer.Option(None, "--plot", help="write one histogram per linear weight, with its fitted "
                                     "GG and Gaussian densities, as PNGs into this directory"),
) -> None:
    """Validate an llmcomp checkpoint and show per-module choices (bits, chosen group size, bits/weight,
    error) and the average bits per weight including scales and zero points."""
    summary = describe(path, verify)
    if gg_fit or plot is not None:
        _gg_outputs(path, summary, gg_fit, plot, as_json)
    if as_json:
        console.print_json(json.dumps(summary))
        return
    if modules:
        table = Table("module", "kind", "passes", *MODULE_COLUMNS, title=str(path))
        for name, m in summary["modules"].items():
            passes = " > ".join(p.get("pass", "?") for p in m["passes"]) or "-"
            table.add_row(name, _fmt(m.get("kind")), passes, *(_fmt(m.get(c)) for c in MODULE_COLUMNS))
        console.print(table)
    bpw = summary["average_bits_per_weight"]
    ratio = summary["compression_ratio"]
    console.print(
        f"[bold]{summary['architecture']}[/] format v{summary['format_version']}, recipe {summary['recipe']}: "
        f"{len(summary['modules'])} compressed modules, {summary['tensor_bytes'] / 1e6:.1f} MB of tensors, "
        f"avg {_fmt(bpw)} bits/weight (incl. scales/zeros)"
        + (f", {ratio:.2f}x smaller than the source" if ratio else "")
        + (f", {summary['average_sparsity']:.1%} of the pruned modules' weights removed"
           if summary["average_sparsity"] is not None else "")
        + (f"; group sizes chosen: {summary['group_size_counts']}" if summary["group_size_counts"] else "")
    )
    console.print("[green]checkpoint valid[/]" + (" (hashes verified)" if verify else ""))


def _gg_outputs(path: Path, summary: dict[str, Any], gg_fit: bool, plot: Path | None, as_json: bool) -> None:
    """``--gg`` (a table, or ``gg`` in the JSON) and ``--plot DIR`` (llmcomp.gg_report)."""
    from llmcomp import gg_report

    if gg_fit:
        shapes = gg_report.gg_shapes(path)
        summary["gg"] = shapes
        if not as_json:
            table = Table("module", "kind", "GG shape nu", "scale", "std", title=f"{path}: generalized-Gaussian fits")
            for name, f in shapes.items():
                table.add_row(name, f["kind"], f"{f['shape']:.3f}", f"{f['scale']:.4g}", f"{f['std']:.4g}")
            console.print(table)
    if plot is not None:
        written = gg_report.plot_histograms(path, plot)
        if not as_json:
            console.print(f"wrote {len(written)} histograms to {plot}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
