"""``llmcomp eval``: perplexity and GLUE for one or several models, with deltas, reports and plots."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llmcomp.cli.common import console, user_errors
from llmcomp.errors import LlmcompError

DEFAULT_SLOTS = 16  # llmcomp.eval.harness.DEFAULT_SLOTS; not imported here, as that pulls in torch
TASKS_HELP = (
    "comma-separated tasks: wikitext2, c4, offline (token perplexity); sst2, mrpc, rte, cola, qnli, qqp, "
    "mnli, mnli_mismatch, wnli or 'glue' (lm-eval); wikitext (lm-eval WORD perplexity, a different metric)"
)


def _settings(tasks: str, data_file: Path | None, data_dir: Path | None, seq_len: int, stride: int | None,
              batch_size: int, max_tokens: int | None, dtype: str, device: str, limit: float | None,
              num_fewshot: int | None, engine: str, progress: bool, slots: int):
    from llmcomp.eval.runner import EvalSettings
    from llmcomp.eval.tasks import parse_tasks

    if limit is not None and limit >= 1:
        limit = int(limit)
    return EvalSettings(
        tasks=parse_tasks(tasks), data_file=data_file, data_dir=data_dir, seq_len=seq_len, stride=stride,
        batch_size=batch_size, max_tokens=max_tokens, dtype=dtype, device=device, limit=limit,
        num_fewshot=num_fewshot, engine=engine, progress=progress, slots=slots,
    )


@user_errors
def eval_command(
    models: list[str] | None = typer.Argument(None, help="models: llmcomp checkpoint dirs, HF dirs, hub ids, "
                                                        ".gguf, or alias smollm2-135m"),
    tasks: str = typer.Option("wikitext2", "--tasks", "-t", help=TASKS_HELP),
    baseline: str | None = typer.Option(None, "--baseline", "-b", help="model to compare against (evaluated "
                                                                       "first; deltas are model - baseline)"),
    data_file: Path | None = typer.Option(None, help="local copy of the wikitext2/c4 corpus: .txt, .jsonl "
                                                     "('text' field) or .parquet ('text' column)"),
    data_dir: Path | None = typer.Option(None, help="local lm-eval task data: DIR/<task>/validation.jsonl "
                                                    "(or .parquet/.tsv) with the hub dataset's columns"),
    seq_len: int = typer.Option(2048, help="perplexity window in tokens (capped at the model's context)"),
    stride: int | None = typer.Option(None, help="sliding-window stride for perplexity (default: "
                                                 "non-overlapping windows, GPTQ protocol)"),
    batch_size: int = typer.Option(1, help="perplexity windows per forward pass (and lm-eval requests per "
                                           "forward with --engine hf/vllm)"),
    slots: int = typer.Option(DEFAULT_SLOTS, help="native engine: lm-eval contexts computed side by side "
                                                  "(KV-cache slots)"),
    max_tokens: int | None = typer.Option(None, help="score only the first N tokens of each corpus"),
    dtype: str = typer.Option("auto", help="auto (as stored), bfloat16, float16, float32"),
    device: str = typer.Option("cpu", help="torch device for the native engine"),
    limit: float | None = typer.Option(None, help="lm-eval: examples per task (an int, or a fraction < 1)"),
    num_fewshot: int | None = typer.Option(None, help="lm-eval few-shot examples (default 0-shot)"),
    engine: str = typer.Option("native", help="native (llmcomp loader; lm-eval requests through the llmcomp "
                                              "runtime, shared contexts computed once), hf (llmcomp loader; "
                                              "lm-eval's HFLM) or vllm (lm-eval's vLLM backend; lm-eval tasks only)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write results as JSON"),
    report: Path | None = typer.Option(None, help="write a markdown report"),
    plot: Path | None = typer.Option(None, help="write a PNG: each task's metric against model size"),
    plot_x: str = typer.Option("bits", help="plot x axis: bits (bits/weight) or size (MiB on disk)"),
    progress: bool = typer.Option(True, help="show progress bars"),
    activation_sparsity: float | None = typer.Option(
        None, help="drop this fraction of each linear's inputs per token (TEAL/WINA, decoder layers; the "
                   "--baseline model stays dense); a wina-pass checkpoint uses its per-matrix allocation"),
    activation_criterion: str = typer.Option("wina", help="with --activation-sparsity: wina (|x| * column "
                                                          "norm) or teal (|x|)"),
    swift: str | None = typer.Option(None, help="routed evaluation: the swift model (default: the router's)"),
    super_: str | None = typer.Option(None, "--super", help="routed evaluation: the super model (default: the "
                                                            "router's)"),
    router: Path | None = typer.Option(None, help="routed evaluation (E-LANG): router.json; adds a 'routed' row "
                                                  "with acc and super_fraction (lm-eval tasks)"),
) -> None:
    """Evaluate MODELS on TASKS; with several models (or --baseline) print a comparison with deltas.

    Examples: `llmcomp eval smollm2-135m --tasks wikitext2 --data-file wiki.test.parquet`;
    `llmcomp eval OUT --baseline smollm2-135m --tasks sst2,mrpc --data-dir glue/`;
    `llmcomp eval A B C --tasks wikitext2 --plot pareto.png`.
    """
    from llmcomp.activation_sparsity import ActivationSettings, applied_at_load
    from llmcomp.eval.plots import X_AXES, plot_tradeoff
    from llmcomp.eval.report import comparison_rows, markdown_report, report_dict, rich_table, write_json
    from llmcomp.eval.runner import evaluate_models

    if plot_x not in X_AXES:
        raise LlmcompError(f"unknown --plot-x {plot_x!r}; allowed: {', '.join(X_AXES)}")
    settings = _settings(tasks, data_file, data_dir, seq_len, stride, batch_size, max_tokens, dtype, device,
                         limit, num_fewshot, engine, progress, slots)
    names = list(dict.fromkeys(([baseline] if baseline else []) + list(models or [])))
    routed = router is not None or swift is not None or super_ is not None
    if not names and not routed:
        raise LlmcompError("give MODELS to evaluate, or --router (with --swift/--super) for routed evaluation")
    if routed and settings.perplexity_tasks:
        raise LlmcompError("routed evaluation (--router) runs lm-eval tasks (sst2, rte, ...), not token perplexity")
    activation = ActivationSettings(activation_sparsity, activation_criterion)
    if activation_sparsity is not None and engine == "vllm":
        raise LlmcompError("--activation-sparsity runs on the native and hf engines, not vllm")
    with applied_at_load(activation, skip=1 if baseline else 0) as applied:
        results, texts = evaluate_models(names, settings)
    if routed:
        from llmcomp.eval.routed import evaluate_routed_cli

        results.append(evaluate_routed_cli(swift, super_, router, settings))
    if applied:
        console.print(f"activation sparsity: {applied[-1]}")
    rows = comparison_rows(results, settings.tasks, baseline)
    console.print(rich_table(rows, results, baseline))
    data = report_dict(results, rows, settings, texts, baseline)
    if applied:
        data["activation_sparsity"] = applied[-1]
    if output is not None:
        write_json(data, output)
        console.print(f"results -> {output}")
    if plot is not None:
        plot_tradeoff(results, settings.tasks, plot, plot_x)
        console.print(f"plot -> {plot}")
    if report is not None:
        ref = os.path.relpath(plot, report.parent) if plot is not None else None
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(markdown_report(data, rows, ref))
        console.print(f"report -> {report}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
