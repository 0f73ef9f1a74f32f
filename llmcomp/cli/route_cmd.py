"""``llmcomp route calibrate``: pick an E-LANG router threshold on a calibration split."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcomp.cli.common import console, user_errors
from llmcomp.errors import LlmcompError

DEFAULT_MAX_DROP = 0.01  # the "Done" target: within 1 accuracy point of the super model
DEFAULT_CONFIDENCE = 0.95  # ... at the 5% quantile of a bootstrap of the calibration data
DEFAULT_SLOTS = 16  # llmcomp.eval.harness.DEFAULT_SLOTS (not imported: it pulls in torch)

NEXT_TOKEN_TASK = "offline"
NEXT_TOKEN_SPLIT = "offline-validation"  # llmcomp.calibration.offline_validation_text, not the evaluation text
DEFAULT_NEXT_TOKENS = 8192

route_app = typer.Typer(help="E-LANG routing between a swift (compressed) and a super (original) model.",
                        no_args_is_help=True)


@route_app.command("calibrate")
@user_errors
def calibrate(
    swift: str = typer.Option(..., "--swift", help="the swift (compressed) model: checkpoint dir, HF dir or alias"),
    super_: str = typer.Option(..., "--super", help="the super (original) model"),
    tasks: str = typer.Option("sst2", "--tasks", "-t",
                              help="comma-separated lm-eval acc tasks (sst2, rte, ...), or 'offline': next-token "
                                   "accuracy on the offline validation text (generation)"),
    data_dir: Path | None = typer.Option(None, help="local task data: DIR/<task>/<split>.jsonl (or .parquet/.tsv/"
                                                    ".csv); not needed for --tasks offline"),
    split: str = typer.Option("train", help="the calibration split file name; never the split you report"),
    output: Path = typer.Option(Path("router.json"), "--output", "-o", help="where router.json is written"),
    plot: Path | None = typer.Option(None, help="write a PNG: accuracy vs super-call fraction (the E-LANG curve)"),
    target_fraction: float | None = typer.Option(None, help="tau for at most this fraction of super calls"),
    target_acc: float | None = typer.Option(None, help="tau for the fewest super calls reaching this accuracy"),
    max_drop: float = typer.Option(DEFAULT_MAX_DROP, help="without a target: the fewest super calls within this "
                                                          "much of the super model's accuracy"),
    confidence: float = typer.Option(DEFAULT_CONFIDENCE, min=0.0, max=0.99,
                                     help="with --max-drop: the drop must hold at this confidence under a block "
                                          "bootstrap of the calibration data, so tau carries over to new data (0: the "
                                          "curve's point estimate)"),
    temperature: float = typer.Option(1.0, "--temperature", "-T", help="energy temperature T"),
    energy_over: str = typer.Option("vocab", help="vocab (the whole next-token distribution) or choices (the "
                                                  "answer choices' first tokens)"),
    normalize: bool = typer.Option(False, help="energy of log-probabilities instead of raw logits (shift-invariant; "
                                               "not in the paper)"),
    limit: float | None = typer.Option(None, help="examples per task (an int, or a fraction < 1); offline: tokens"),
    dtype: str = typer.Option("auto", help="auto (as stored), bfloat16, float16, float32"),
    device: str = typer.Option("cpu", help="torch device"),
    slots: int = typer.Option(DEFAULT_SLOTS, min=1, help="contexts scored side by side (KV-cache slots)"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Score the calibration split with both models, trace accuracy vs super-call fraction and
    write router.json (tau, T, mode, the curve). Example: `llmcomp route calibrate --swift ck/fq-w3
    --super smollm2-135m --tasks sst2 --data-dir glue/ --split train -o router.json --plot curve.png`."""
    from llmcomp.eval.tasks import parse_tasks
    from llmcomp.loading import load_model, resolve_source
    from llmcomp.route_calibrate import (
        TOKEN_BLOCK,
        calibrated_router,
        collect_examples,
        split_spec,
        token_examples,
    )
    from llmcomp.routing import RouterConfig, save_router

    if energy_over not in ("vocab", "choices"):
        raise LlmcompError(f"unknown --energy-over {energy_over!r}; allowed: vocab, choices")
    if target_fraction is not None and target_acc is not None:
        raise LlmcompError("give at most one of --target-fraction and --target-acc")
    if split in ("validation", "validation_matched", "validation_mismatched", "test"):
        raise LlmcompError(f"--split {split} is an evaluation split; calibrate on another (e.g. train)")
    base = RouterConfig(tau=0.0, temperature=temperature, energy_over=energy_over, normalize=normalize, swift=swift,
                        super=super_)
    next_token = tasks.strip().lower() == NEXT_TOKEN_TASK
    if next_token:
        from llmcomp.calibration import offline_validation_text

        text, _ = offline_validation_text()  # never the offline evaluation text
        names, split = [NEXT_TOKEN_TASK], NEXT_TOKEN_SPLIT
    else:
        if data_dir is None:
            raise LlmcompError("--data-dir is needed for lm-eval tasks (DIR/<task>/<split>.jsonl)")
        from llmcomp.eval.local_data import find_local_split

        specs = [split_spec(s, split) for s in parse_tasks(tasks)]
        for spec in specs:
            find_local_split(spec, data_dir)  # one-line error for missing files before any model loads
        names = [s.name for s in specs]
    if limit is not None and limit >= 1:
        limit = int(limit)
    swift_model, tokenizer = load_model(resolve_source(swift), dtype=dtype, device=device)
    super_model, _ = load_model(resolve_source(super_), dtype=dtype, device=device)
    if next_token:
        max_tokens = int(limit) if limit is not None else DEFAULT_NEXT_TOKENS
        examples = token_examples(swift_model, super_model, tokenizer, base, text, max_tokens=max_tokens)
    else:
        examples = collect_examples(swift_model, super_model, tokenizer, base, specs, data_dir, limit, slots,
                                    progress)
    drop = max_drop if target_fraction is None and target_acc is None else None
    config = calibrated_router(examples, base, names, split, target_fraction, target_acc, drop,
                               confidence if drop is not None else None, TOKEN_BLOCK if next_token else 1)
    save_router(config, output)
    cal = config.calibration
    assert cal is not None
    point = min(cal.curve, key=lambda p: abs(p.tau - config.tau))
    console.print(f"{cal.examples} examples ({', '.join(cal.tasks)}, {split}): swift acc {cal.swift_acc:.4f}, "
                  f"super acc {cal.super_acc:.4f}")
    console.print(f"tau {config.tau:.4f}: acc {point.acc:.4f} at super fraction {point.super_fraction:.3f} "
                  f"(random router: {point.random_acc:.4f})")
    console.print(f"router -> {output}")
    if plot is not None:
        from llmcomp.route_calibrate import plot_curve

        plot_curve(config, plot)
        console.print(f"plot -> {plot}")


def register(app: typer.Typer) -> None:
    app.add_typer(route_app, name="route")
