"""``llmcomp profile MODEL --pass tensornet -o DIR``: per block x layer type sensitivity, plan, heat map."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcomp.cli.common import console, user_errors
from llmcomp.errors import LlmcompError


@user_errors
def profile(
    model: str = typer.Argument(..., help="hub id, local HF directory, .gguf file, or alias smollm2-135m"),
    pass_type: str = typer.Option("tensornet", "--pass", help="the factorizing pass to profile: tensornet or lowrank"),
    output: Path = typer.Option(..., "--output", "-o", help="directory for profile.json, plan.yaml, heatmap.png"),
    ratio: float | None = typer.Option(None, help="kept parameter ratio per layer (default 0.5 if no rule)"),
    chi: int | None = typer.Option(None, help="fixed bond dimension / rank instead of a ratio"),
    energy: float | None = typer.Option(None, help="singular-value energy threshold instead of a ratio"),
    num_cores: int = typer.Option(2, help="MPO cores (tensornet only, 2-4)"),
    dense_fraction: float = typer.Option(
        0.2, help="fraction of layers the plan keeps dense: the highest NLL increase per parameter saved"),
    samples: int = typer.Option(8, help="calibration windows"),
    seq_len: int = typer.Option(256, help="tokens per window"),
    batch_size: int = typer.Option(4, help="windows per forward"),
    calibration_file: Path | None = typer.Option(
        None, help="plain-text calibration data; default: the offline calibration texts (not the evaluation texts)"),
    overwrite: bool = typer.Option(False, help="replace OUTPUT if it exists"),
) -> None:
    """Measure what compressing each layer alone costs (mean next-token NLL on calibration text), one
    (block, layer type) at a time, and write profile.json, a heat map (heatmap.png, block x layer type) and
    plan.yaml: a recipe for `llmcomp compress --recipe DIR/plan.yaml` that keeps the most sensitive layers dense.

    Costs one forward over the calibration windows per layer (7 per block)."""
    import torch

    from llmcomp.calibration import calibration_batches, calibration_text
    from llmcomp.formats.atomic import AtomicDirectory
    from llmcomp.loading import load_model
    from llmcomp.profiling import pass_settings, profile_model, write_outputs

    if not 0.0 <= dense_fraction < 1.0:
        raise LlmcompError(f"--dense-fraction must be in [0, 1), got {dense_fraction}")
    settings = pass_settings(ratio, chi, energy, num_cores, pass_type)
    text = None
    if calibration_file is not None:
        if not calibration_file.is_file():
            raise LlmcompError(f"calibration file {calibration_file} does not exist")
        text = calibration_file.read_text(encoding="utf-8", errors="replace")
    with AtomicDirectory(output, overwrite) as stage:
        net, tokenizer = load_model(model, dtype=torch.float32)
        if getattr(net.config, "quantization_config", None):
            raise LlmcompError(f"{model} is already compressed; profile the original model")
        corpus, _ = calibration_text(None, text)
        ids = calibration_batches(tokenizer, corpus, samples, seq_len)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = net.config.num_hidden_layers * 7
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("profiling", total=total)
            result = profile_model(net, ids, pass_type, settings, batch_size,
                                   on_layer=lambda name: bar.update(task, advance=1, description=name))
        write_outputs(result, stage.path, dense_fraction)
        stage.commit()
    worst = sorted(result.costs, key=lambda c: c.delta_nll, reverse=True)[:5]
    console.print(f"base NLL {result.base_nll:.4f}; most sensitive: "
                  + ", ".join(f"{c.name} (+{c.delta_nll:.4f})" for c in worst))
    console.print(f"wrote {output}/profile.json, plan.yaml, heatmap.png")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
