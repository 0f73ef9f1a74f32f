"""Serve a swift and a super model behind one engine interface, routed per request after prefill.

Every request is prefilled by the swift model's engine. When its prompt is in the KV cache, the
logits after the last prompt token give the swift energy; at or below ``tau`` the swift engine
goes on decoding as usual (the prefill is not wasted), above it the sequence leaves the swift
engine (its slot is freed at once) and is submitted, with the same prompt and sampling
parameters, to the super model's engine, which prefills it into its own KV cache. The two
engines never share a KV cache, so nothing has to be kept consistent between them: a deferred
request's swift cache is simply dropped. Every event carries the answering model and the energy
(:class:`RoutedOutput`), which the HTTP layer turns into a response field, a header and
``/metrics`` counters. ``tau`` (and ``T``) can be changed while serving
(:meth:`RoutedEngine.update_router`); the next decision uses the new value.

Token-level deferral during generation is not implemented: a request is answered by one model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmcomp.routing import SUPER, SWIFT, Decision, Router, RouterConfig
from llmcomp.runtime.sampling import SamplingParams
from llmcomp.serve.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    EngineClosedError,
    QueueFullError,
    RequestOutput,
    Sink,
)
from llmcomp.serve.engine import Engine as _Engine


@dataclass
class RoutedOutput(RequestOutput):
    """A :class:`RequestOutput` that says which model produced it and the swift energy."""

    routed_to: str | None = None  # "swift" | "super"; None when the request failed before the decision
    energy: float | None = None


def with_route(ev: RequestOutput, decision: Decision | None) -> RoutedOutput:
    fields = {f.name: getattr(ev, f.name) for f in dataclasses.fields(RequestOutput)}
    if decision is None:
        return RoutedOutput(**fields)
    return RoutedOutput(**fields, routed_to=decision.model, energy=decision.energy)


class _Route:
    """One request's routing state: its client sink, the decision, the super handle once deferred."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.decision: Decision | None = None
        self.swift_handle: Any = None
        self.super_handle: Any = None
        self.cancelled = False
        self.forget: Callable[[], None] | None = None  # drops the route when it ends before a decision

    def swift_event(self, ev: RequestOutput) -> None:
        if ev.finished and self.decision is None and self.forget is not None:
            self.forget()  # cancelled or failed while prefilling
        self.sink(with_route(ev, self.decision))

    def super_event(self, ev: RequestOutput) -> None:
        self.sink(with_route(ev, self.decision))


class _SwiftEngine(_Engine):
    """The swift model's engine: the first token after a prefill is where the router decides."""

    def __init__(self, *args: Any, on_prefilled: Callable[[Any, torch.Tensor], bool], **kwargs: Any) -> None:
        self._on_prefilled = on_prefilled  # set before Engine starts its thread
        super().__init__(*args, **kwargs)

    def _append_token(self, seq: Any, logits: torch.Tensor, token: int) -> bool:
        if not seq.output_ids and self._on_prefilled(seq, logits):
            seq.done = True  # handed to the super engine: leaves this batch without an event
            return True
        return super()._append_token(seq, logits, token)


class RoutedHandle:
    """What :meth:`RoutedEngine.submit_many` returns; ``cancel()`` reaches whichever engine runs it."""

    def __init__(self, route: _Route) -> None:
        self._route = route
        self.id = route.swift_handle.id

    def cancel(self) -> None:
        route = self._route
        route.cancelled = True
        route.swift_handle.cancel()
        if route.super_handle is not None:
            route.super_handle.cancel()


class RoutedEngine:
    """The :class:`~llmcomp.serve.engine.Engine` interface over a swift and a super engine."""

    def __init__(self, swift_model: Any, super_model: Any, tokenizer: Any, config: RouterConfig,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
                 context_length: int | None = None, compile: bool = False,
                 progress: Callable[[str], None] | None = None) -> None:
        if config.mode != "request":
            raise ValueError(f"router mode {config.mode!r} is not served; only 'request' (after prefill) is")
        if config.energy_over != "vocab":
            raise ValueError("a served router takes the energy over the vocabulary (energy_over: vocab); "
                             "'choices' exists only for scoring tasks")
        if int(swift_model.config.vocab_size) != int(super_model.config.vocab_size):
            raise ValueError("the swift and super models have different vocabularies")
        self.router = Router(config)
        self.tokenizer = tokenizer
        self.counts = {SWIFT: 0, SUPER: 0}
        self._lock = threading.Lock()
        self._routes: dict[int, _Route] = {}
        say = progress or (lambda _m: None)
        say("super model engine")
        self.super = _Engine(super_model, tokenizer, max_batch_size, max_queue, context_length, compile=compile,
                             progress=progress)
        say("swift model engine")
        self.swift = _SwiftEngine(swift_model, tokenizer, max_batch_size, max_queue, context_length,
                                  compile=compile, progress=progress, on_prefilled=self._decide)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.context_length = min(self.swift.context_length, self.super.context_length)
        self.eos_ids = self.swift.eos_ids

    # -- the Engine interface ---------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.swift.num_waiting + self.super.num_waiting

    @property
    def num_active(self) -> int:
        return self.swift.num_active + self.super.num_active

    @property
    def vocab_size(self) -> int:
        return self.swift.vocab_size

    @property
    def router_config(self) -> RouterConfig:
        return self.router.config

    def update_router(self, tau: float | None = None, temperature: float | None = None) -> RouterConfig:
        """New tau and/or T for the next decisions (no restart)."""
        return self.router.update(tau=tau, temperature=temperature)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> RoutedHandle:
        return self.submit_many([(prompt_ids, params, sink)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, Sink]]) -> list[RoutedHandle]:
        """Every request starts on the swift engine (which bounds the queue: QueueFullError)."""
        routes = [_Route(sink) for _, _, sink in requests]
        with self._lock:  # _decide (engine thread) waits until the routes are registered
            handles = self.swift.submit_many([(ids, params, route.swift_event)
                                              for (ids, params, _), route in zip(requests, routes, strict=True)])
            for handle, route in zip(handles, routes, strict=True):
                route.swift_handle = handle
                route.forget = lambda key=handle.id: self._forget(key)
                self._routes[handle.id] = route
        return [RoutedHandle(r) for r in routes]

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Any:
        """Blocking helper (scripts, tests): the :meth:`Engine.generate` loop on this engine."""
        return _Engine.generate(self, prompt_ids, params, timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.swift.close()
        self.super.close()

    # -- the decision (swift engine thread) ---------------------------------------------------------
    def _decide(self, seq: Any, logits: torch.Tensor) -> bool:
        """Route one prefilled request; True when it was handed to the super engine."""
        decision = self.router.decide(logits)
        with self._lock:
            route = self._routes.pop(seq.id)
            route.forget = None
            self.counts[decision.model] += 1
        route.decision = decision
        if not decision.deferred:
            return False
        try:
            route.super_handle = self.super.submit(seq.prompt_ids, seq.params, route.super_event)
        except (QueueFullError, EngineClosedError) as exc:
            route.super_event(RequestOutput("", [], [], True, "error", len(seq.prompt_ids), 0, str(exc),
                                            retryable=True))
            return True
        if route.cancelled:
            route.super_handle.cancel()
        return True

    def _forget(self, seq_id: int) -> None:
        with self._lock:
            self._routes.pop(seq_id, None)


def build_routed_engine(swift: str, super_: str, config: RouterConfig, dtype: str, max_batch_size: int,
                        max_queue: int, max_model_len: int | None, compile: bool,
                        progress: Callable[[str], None] | None = None) -> RoutedEngine:
    """Load both models (same tokenizer: the swift one's) and build the routed engine."""
    from llmcomp.loading import load_model

    swift_model, tokenizer = load_model(swift, dtype=dtype)
    super_model, _ = load_model(super_, dtype=dtype)
    return RoutedEngine(swift_model, super_model, tokenizer, config, max_batch_size, max_queue, max_model_len,
                        compile=compile, progress=progress)


def build_routed_native(swift: str, super_: str, config: RouterConfig, options: Any) -> tuple[Any, Any]:
    """``(app, engine)`` for ``llmcomp serve --swift A --super B --router R``: both models in one
    supervised worker process (:mod:`llmcomp.serve.worker`), one OpenAI endpoint in front."""
    from llmcomp.loading import load_tokenizer, resolve_source
    from llmcomp.serve.app import ServerConfig, create_app
    from llmcomp.serve.server import _log_to_stderr, default_threads
    from llmcomp.serve.worker import EngineWorker, WorkerSpec

    _log_to_stderr()
    swift_source, super_source = resolve_source(swift), resolve_source(super_)
    config = config.model_copy(update={"swift": config.swift or swift, "super": config.super or super_})
    spec = WorkerSpec(swift_source.location, options.dtype, options.threads or default_threads(),
                      options.max_batch_size, options.max_queue, options.max_model_len, options.compile,
                      super_model=super_source.location, router=config.model_dump_json())
    engine = EngineWorker(spec, load_tokenizer(swift_source))
    app = create_app(engine, ServerConfig(model_name=options.served_model_name or "routed", api_key=options.api_key))
    return app, engine


def run_routed_native(swift: str, super_: str, config: RouterConfig, options: Any) -> None:
    """Serve until interrupted, then stop the worker (as :func:`llmcomp.serve.server.run_native`)."""
    import uvicorn

    app, engine = build_routed_native(swift, super_, config, options)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)
    finally:
        engine.close()
