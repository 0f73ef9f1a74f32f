"""``llmcomp heal CKPT --teacher MODEL -o OUT``: distill a tensorized / low-rank checkpoint;
``llmcomp quantize-cores CKPT -o OUT --bits 8``: quantize its MPO cores afterwards."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcomp.cli.common import console, err_console, user_errors
from llmcomp.errors import LlmcompError


@user_errors
def heal(
    checkpoint: Path = typer.Argument(..., help="llmcomp checkpoint with MPO (tensornet) or low-rank modules"),
    teacher: str = typer.Option(..., "--teacher", "-t", help="the original model (hub id, directory, alias)"),
    output: Path = typer.Option(..., "--output", "-o", help="where to write the healed checkpoint"),
    steps: int = typer.Option(100, help="optimizer steps"),
    lr: float = typer.Option(3e-4, help="Adam learning rate for the cores / factors"),
    batch_size: int = typer.Option(4, help="token windows per step"),
    seq_len: int = typer.Option(256, help="tokens per window"),
    samples: int = typer.Option(64, help="calibration windows drawn (fixed seed) and cycled through"),
    kl_weight: float = typer.Option(1.0, help="weight of KL(teacher || student) on the logits"),
    lm_weight: float = typer.Option(0.5, help="weight of the next-token cross-entropy"),
    temperature: float = typer.Option(1.0, help="distillation temperature (KL scaled by T^2)"),
    checkpoint_every: int = typer.Option(25, help="save the resumable state every N steps"),
    calibration_file: Path | None = typer.Option(
        None, help="plain-text training text; default: the offline calibration texts (never the evaluation texts)"),
    seed: int = typer.Option(0, help="seed of the window sampling and order"),
    balance_cores: bool = typer.Option(
        False, help="balance the MPO cores first (same product; for checkpoints compressed before the tensornet "
        "pass balanced float cores by default: balanced cores heal faster)"),
    resume: bool = typer.Option(False, help="continue from OUTPUT.heal (same options); ends bit-identical"),
    overwrite: bool = typer.Option(False, help="replace OUTPUT if it exists (atomically)"),
) -> None:
    """Heal a compressed checkpoint: a short distillation from the original model (KL on logits + LM loss) on
    calibration text. Only the MPO cores and low-rank factors train; every other tensor stays as it is, so the
    result has the same format and size.

    A resumable state is saved every --checkpoint-every steps in OUTPUT.heal. Ctrl-C finishes the current step,
    saves it and writes OUTPUT from it; run the same command with --resume to continue."""
    from llmcomp.healing import HealConfig
    from llmcomp.healing import heal as run_heal

    text = None
    if calibration_file is not None:
        if not calibration_file.is_file():
            raise LlmcompError(f"calibration file {calibration_file} does not exist")
        text = calibration_file.read_text(encoding="utf-8", errors="replace")
    cfg = HealConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, num_samples=samples,
                     kl_weight=kl_weight, lm_weight=lm_weight, temperature=temperature,
                     checkpoint_every=checkpoint_every, seed=seed, balance_cores=balance_cores)
    result = run_heal(checkpoint, teacher, output, cfg, calibration=text, resume=resume, overwrite=overwrite)
    first, last = result.history[0] if result.history else None, result.history[-1] if result.history else None
    if result.interrupted:
        err_console.print(f"[bold red]interrupted[/] after step {result.steps_done}/{steps}: {output} holds that "
                          f"state; continue with --resume", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130)
    if first and last:
        console.print(f"healed {result.steps_done} steps: loss {first['loss']:.4f} -> {last['loss']:.4f} "
                      f"(kl {first['kl']:.4f} -> {last['kl']:.4f}) -> {output}")


@user_errors
def quantize_cores(
    checkpoint: Path = typer.Argument(..., help="llmcomp checkpoint with float-core MPO modules (e.g. a healed one)"),
    output: Path = typer.Option(..., "--output", "-o", help="where to write the checkpoint with int cores"),
    bits: int = typer.Option(8, "--bits", "-b", help="bits per core entry: 8 or 4"),
    group_size: int = typer.Option(64, help="group length along each core's (r*m) x (n*s) rows; -1 = whole rows"),
    symmetric: bool = typer.Option(False, help="no zero points (symmetric groups)"),
    fit_iters: int | None = typer.Option(
        None, help="least-squares scale refinement rounds (default: FineQuant's, as the tensornet pass); 0 = RTN"),
    overwrite: bool = typer.Option(False, help="replace OUTPUT if it exists (atomically)"),
) -> None:
    """Quantize the MPO cores of a checkpoint to int8 / int4 (heal first, then quantize: int cores do not train).

    Every float-core MPO module is quantized as the tensornet pass's core_bits option does it; all other tensors
    are copied unchanged. The per-module error and bits per weight go to llmcomp_report.json."""
    from llmcomp.core_quant import quantize_checkpoint_cores
    from llmcomp.passes.finequant_fit import DEFAULT_FIT_ITERS

    iters = DEFAULT_FIT_ITERS if fit_iters is None else fit_iters
    report = quantize_checkpoint_cores(checkpoint, output, bits, group_size, symmetric, iters, overwrite)
    worst = max(r["rel_error"] for r in report.values())
    bpw = sum(r["bits_per_weight"] for r in report.values()) / len(report)
    console.print(f"quantized the cores of {len(report)} MPO modules to int{bits}: relative weight error up to "
                  f"{worst:.4f}, {bpw:.2f} bits per dense weight on average -> {output}")


def register(app: typer.Typer) -> None:
    app.command("heal")(heal)
    app.command("quantize-cores")(quantize_cores)
