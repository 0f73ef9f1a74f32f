"""``llmcomp bench``: CPU decode throughput of a model or checkpoint with the fast decode loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from llmcomp.cli.common import KERNEL_OPTION, console, force_kernels, user_errors
from llmcomp.errors import LlmcompError
from llmcomp.hostinfo import cpu_summary

MODES = ("eager", "compiled")
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise LlmcompError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise LlmcompError(f"--batch-sizes needs positive integers, got {text!r}")
    return sizes


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise LlmcompError(f"--modes takes a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return modes


def run_bench(model_source: str, batch_sizes: list[int], tokens: int, dtype: str, threads: int | None,
              modes: list[str], warmup: int, prompt: str, activation: Any = None) -> dict[str, Any]:
    """Load once; per mode (eager, compiled) one runner whose buckets are the batch sizes, compiled
    up front (timed apart), then ``warmup`` short runs and one timed generation per batch size."""
    import torch

    from llmcomp.generation import generate
    from llmcomp.loading import load_model
    from llmcomp.runtime import ModelRunner

    if tokens < 2:
        raise LlmcompError(f"--tokens must be at least 2, got {tokens}")
    if threads:
        torch.set_num_threads(threads)
    model, tok = load_model(model_source, dtype=dtype)
    applied = activation.apply(model) if activation is not None else None
    max_len = len(tok(prompt)["input_ids"]) + tokens
    results = []
    for mode in modes:
        runner = ModelRunner(model, max_batch_size=max(batch_sizes), max_model_len=max_len,
                             compile=mode == "compiled", buckets=batch_sizes)
        compile_s = runner.warm_up() if runner.compiled else 0.0
        for bs in batch_sizes:
            prompts = [prompt] * bs
            for _ in range(warmup):
                generate(model, tok, prompts, max_new_tokens=4, stop_at_eos=False, runner=runner)
            res = generate(model, tok, prompts, max_new_tokens=tokens, stop_at_eos=False, runner=runner)
            results.append({
                "mode": mode,
                "batch_size": bs,
                "new_tokens_per_sequence": tokens,
                "decode_tokens_per_second": round(res.decode_tokens_per_second, 2),
                "ms_per_step": round(1000 * res.decode_seconds / max(res.decode_steps, 1), 2),
                "prefill_seconds": round(res.prefill_seconds, 3),
                "compile_seconds": round(compile_s, 1),
                "sample": res.texts[0][:80],
            })
    return {
        "model": model_source,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "runtime": runner.backend,
        "machine": cpu_summary(),
        "activation_sparsity": applied,
        "torch": torch.__version__,
        "results": results,
    }


@user_errors
def bench(
    model: str = typer.Argument(..., help="llmcomp checkpoint, HF directory, hub id, or alias smollm2-135m"),
    batch_sizes: str = typer.Option("1,8", help="comma-separated batch sizes"),
    tokens: int = typer.Option(64, help="new tokens generated per sequence"),
    dtype: str = typer.Option("bfloat16", help="activation dtype: bfloat16 (fast int4/int8 paths), float32, ..."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    modes: str = typer.Option("eager,compiled", help="comma list: eager and/or compiled (torch.compile once per "
                              "batch size; compile time reported apart)"),
    warmup: int = typer.Option(1, help="short untimed runs before each measurement"),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="prompt repeated over the batch"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    out: Path | None = typer.Option(None, help="also write the JSON result to this file"),
    activation_sparsity: float | None = typer.Option(
        None, help="drop this fraction of each linear's inputs per decode token (TEAL/WINA; batch 1 reads only "
                   "the kept weight columns)"),
    activation_criterion: str = typer.Option("wina", help="with --activation-sparsity: wina or teal"),
    kernel: str | None = KERNEL_OPTION,
) -> None:
    """Measure CPU decode tokens/s on the serving runtime (slot KV cache, lean forward) at each batch
    size, eager and compiled."""
    from llmcomp.activation_sparsity import ActivationSettings

    activation = ActivationSettings(activation_sparsity, activation_criterion)
    activation.check()
    if kernel:
        force_kernels(kernel)
    result = run_bench(model, parse_batch_sizes(batch_sizes), tokens, dtype, threads, parse_modes(modes), warmup,
                       prompt, activation)
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table("mode", "batch", "decode tok/s", "ms/step", "prefill s", "compile s",
                  title=f"{model} ({result['dtype']}, {result['threads']} threads, {result['runtime']} forward)")
    for r in result["results"]:
        table.add_row(r["mode"], str(r["batch_size"]), f"{r['decode_tokens_per_second']:.1f}",
                      f"{r['ms_per_step']:.1f}", f"{r['prefill_seconds']:.2f}", f"{r['compile_seconds']:.0f}")
    console.print(table)
    console.print(f"host: {result['machine']}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
