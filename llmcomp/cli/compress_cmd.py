"""``llmcomp compress``: run a recipe over a model and write an llmcomp checkpoint."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from llmcomp.cli.common import console, err_console, user_errors
from llmcomp.errors import LlmcompError

SIZE_UNITS = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(text: str) -> int:
    """'500MB' / '2GB' / plain bytes -> bytes."""
    t = text.strip().upper()
    unit = next((u for u in SIZE_UNITS if t.endswith(u)), "")
    number, factor = (t[: -len(unit)], SIZE_UNITS[unit]) if unit else (t, 1)
    try:
        value = float(number)
    except ValueError:
        raise LlmcompError(f"invalid size {text!r}; use e.g. 500MB or 2GB") from None
    if value <= 0:
        raise LlmcompError(f"size must be positive, got {text!r}")
    return int(value * factor)


def summary_table(report: dict[str, Any], output_dir: Path) -> Table:
    table = Table(title=f"compressed -> {output_dir}", show_header=False)
    bpw = report.get("average_bits_per_weight")
    rows = [
        ("recipe", str(report.get("recipe"))),
        ("compressed modules", str(len(report.get("modules", {})))),
        ("avg bits/weight (compressed modules, incl. scales/zeros)", f"{bpw:.3f}" if bpw else "-"),
        ("size before -> after",
         f"{report['original_bytes'] / 1e6:.1f} MB -> {report['compressed_bytes'] / 1e6:.1f} MB"),
        ("compression ratio", f"{report['compression_ratio']:.2f}x"),
        ("time", f"{report['total_seconds']:.1f} s"),
        ("peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
    ]
    if report.get("calibration"):
        cal = report["calibration"]
        rows.append(("calibration", f"{cal['samples']} x {cal['seq_len']} tokens from {cal['source']}"))
    for key, value in rows:
        table.add_row(key, value)
    return table


@user_errors
def compress(
    model: str = typer.Argument(..., help="hub id (org/name), local HF directory, .gguf file, or alias smollm2-135m"),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="built-in recipe name or path to a YAML recipe"),
    target_bits: float | None = typer.Option(
        None, help="instead of a recipe: plan per-layer bits and group sizes (int3/4/8) from measured sensitivity so "
                   "the average stored bits per weight (scales and zero points counted) is at most this, e.g. 4.25"),
    target_size: str | None = typer.Option(
        None, help="instead of a recipe: like --target-bits, for a total tensor size, e.g. 80MB"),
    output: Path = typer.Option(..., "--output", "-o", help="output directory for the llmcomp checkpoint"),
    overwrite: bool = typer.Option(False, help="replace OUTPUT if it exists (atomically)"),
    dtype: str = typer.Option("auto", help="working/storage dtype: auto (as stored), bfloat16, float16, float32"),
    calibration_file: Path | None = typer.Option(
        None, help="plain-text calibration data (overrides the recipe's); default: offline English text"
    ),
    shard_size: str = typer.Option("1GB", help="max size of one safetensors shard (one is buffered in memory)"),
    trust_remote_code: bool = typer.Option(False, help="allow custom modelling code from the model repo"),
    resume: bool = typer.Option(
        False, help="continue an interrupted run from OUTPUT.partial (same model, recipe and dtype); the result is "
                    "bit-identical to an uninterrupted run"),
) -> None:
    """Compress MODEL with a recipe and write an llmcomp checkpoint loadable by from_pretrained, vLLM and
    `llmcomp serve`. See `llmcomp recipes` for the built-in recipes.

    With --target-bits or --target-size instead of --recipe, the budgeted auto-recipe (pass `autobits`) measures
    each layer group's sensitivity on calibration text and chooses bits and group size per layer to fit the budget.

    Progress is kept per layer in OUTPUT.partial: after a crash, kill or Ctrl-C, run the same command with
    --resume to continue where it stopped."""
    from llmcomp.pipeline import compress as run_compress

    parsed = choose_recipe(recipe, target_bits, target_size)
    text = None
    if calibration_file is not None:
        if not calibration_file.is_file():
            raise LlmcompError(f"calibration file {calibration_file} does not exist")
        text = calibration_file.read_text(encoding="utf-8", errors="replace")
    hint = resume_command()
    try:
        result = run_compress(model, parsed, output, overwrite=overwrite, dtype=dtype,
                              shard_bytes=parse_size(shard_size), trust_remote_code=trust_remote_code,
                              calibration_text=text, resume=resume, resume_hint=hint)
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted[/]: {interrupted_progress(output)}; resume with: {hint}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    console.print(summary_table(result.report, result.output_dir))


def choose_recipe(recipe: str | None, target_bits: float | None, target_size: str | None):
    """The recipe named, or the budgeted auto-recipe for a bits or size target (exactly one of the three)."""
    from llmcomp.recipes import load_recipe, recipe_from_dict

    given = [opt for opt, value in (("--recipe", recipe), ("--target-bits", target_bits),
                                    ("--target-size", target_size)) if value is not None]
    if len(given) != 1:
        raise LlmcompError("give exactly one of --recipe, --target-bits and --target-size"
                           + (f" (got {', '.join(given)})" if given else ""))
    if recipe is not None:
        return load_recipe(recipe)
    if target_bits is not None:
        if not 1.0 < target_bits <= 16.0:
            raise LlmcompError(f"--target-bits must be in (1, 16], got {target_bits}")
        target: dict[str, Any] = {"target_bits": target_bits}
        name = f"autobits-{target_bits:g}bpw"
    else:
        target = {"target_bytes": parse_size(str(target_size))}
        name = f"autobits-{target_size}"
    return recipe_from_dict({"name": name, "description": "budgeted mixed precision (llmcomp.passes.autobits)",
                             "passes": [{"type": "autobits", **target}]}, where=name)


def resume_command() -> str:
    """This command line with ``--resume`` (what to run after an interruption)."""
    args = [a for a in sys.argv[1:] if a != "--resume"]
    return "llmcomp " + shlex.join(args + ["--resume"])


def interrupted_progress(output: Path) -> str:
    from llmcomp.formats.partial import MANIFEST, partial_dir

    manifest = partial_dir(output) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return "no layer was finished"
    return f"{data.get('layers_done', 0)}/{data.get('num_layers', '?')} layers are saved in {partial_dir(output)}"


@user_errors
def recipes() -> None:
    """List the built-in recipes."""
    from llmcomp.recipes import builtin_recipes

    table = Table("recipe", "description")
    for name, desc in builtin_recipes().items():
        table.add_row(name, desc)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
    app.command("recipes")(recipes)
