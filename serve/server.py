"""Assemble and run the native server: start the model worker, serve the app."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from llmcomp.serve.app import ServerConfig, create_app
from llmcomp.serve.engine import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from llmcomp.serve.worker import EngineWorker, WorkerSpec


def default_threads() -> int:
    """Compute threads for the engine: all cores but one, which is left to the HTTP event loop.

    Oversubscribed OpenMP is disastrous on small machines (measured here on 2 busy cores: one
    SmolLM2 decode step 3.8 s with 2 threads vs 0.21 s with 1); vLLM's CPU backend makes the same
    choice.
    """
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class NativeOptions:
    """Everything ``llmcomp serve --engine native`` accepts besides the model."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE
    dtype: str = "auto"
    served_model_name: str | None = None
    max_model_len: int | None = None
    threads: int | None = None  # torch compute threads; None: default_threads()
    compile: bool = True  # compile the decode step at start-up (--no-compile skips it)
    log_level: str = "info"


def build_native(model: str, options: NativeOptions) -> tuple[Any, EngineWorker]:
    """Start the model worker for ``model`` (alias, local dir, llmcomp checkpoint or hub id) and
    build ``(app, engine)``; the API process itself loads only the tokenizer."""
    from llmcomp.loading import load_tokenizer, resolve_source

    _log_to_stderr()
    source = resolve_source(model)
    tokenizer = load_tokenizer(source)
    spec = WorkerSpec(source.location, options.dtype, options.threads or default_threads(), options.max_batch_size,
                      options.max_queue, options.max_model_len, options.compile)
    engine = EngineWorker(spec, tokenizer)
    config = ServerConfig(model_name=options.served_model_name or model, api_key=options.api_key)
    return create_app(engine, config), engine


def _log_to_stderr() -> None:
    """Worker starts, crashes and restarts go to stderr next to uvicorn's own lines."""
    logger = logging.getLogger("llmcomp.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:    llmcomp: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_native(model: str, options: NativeOptions) -> None:
    """Serve until interrupted (uvicorn handles SIGINT/SIGTERM), then stop the model worker."""
    import uvicorn

    app, engine = build_native(model, options)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)
    finally:
        engine.close()
