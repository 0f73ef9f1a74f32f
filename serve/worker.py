"""Run the model in a worker process, so a native crash cannot take the API down.

A segfault in a CPU kernel or an out-of-memory kill ends the process it happens in. The API
process therefore only validates, tokenizes and formats; the model and its
:class:`~llmcomp.serve.engine.Engine` live in a child process (vLLM's EngineCore split).
Commands go to the worker over a pipe (``submit``, ``cancel``, ``close``), and the worker sends
every :class:`~llmcomp.serve.engine.RequestOutput` back over the same pipe.

When the worker dies, :class:`EngineWorker` (the API-side stand-in for ``Engine``, with the same
interface) finishes every in-flight request with a retryable error (HTTP 503), refuses new ones
with :class:`EngineUnavailableError` (503 + ``Retry-After``) while a fresh worker loads the model,
logs the cause and tells its listeners (``/metrics`` counts restarts by cause). Serving resumes
without restarting ``llmcomp serve``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llmcomp.errors import LlmcompError
from llmcomp.runtime.sampling import SamplingParams
from llmcomp.serve.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    EngineClosedError,
    QueueFullError,
    RequestOutput,
    Sink,
)

log = logging.getLogger("llmcomp.serve")

START_TIMEOUT_S = 600.0  # loading (and compiling) a model on a slow CPU
STOP_TIMEOUT_S = 10.0
RETRY_AFTER_S = 5  # what a client is told while a worker restarts
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # after consecutive crashes soon after a start
STABLE_AFTER_S = 60.0  # a worker that lived this long resets the backoff
_PR_SET_PDEATHSIG = 1


class EngineUnavailableError(Exception):
    """No worker is ready (it crashed and a new one is loading); answer 503 with ``Retry-After``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.retry_after = RETRY_AFTER_S


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker needs to build its engine (picklable: it crosses the process boundary)."""

    model: str
    dtype: str = "auto"
    threads: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE
    max_model_len: int | None = None
    compile: bool = True  # torch.compile the decode step per batch bucket before reporting ready
    super_model: str | None = None  # routed serving: ``model`` is the swift model, this the super one
    router: str | None = None  # routed serving: router.json text (llmcomp.routing.RouterConfig)
    super_url: str | None = None  # routed serving: the super model's OpenAI endpoint instead of super_model
    park_slots: int | None = None  # routed serving, on_spike defer: spare KV slots per engine (None: default)


def exit_cause(exitcode: int | None) -> str:
    """``SIGSEGV`` for a signal, ``exit 3`` for an exit status."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit {exitcode}"


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text if isinstance(exc, LlmcompError) else f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- worker process -------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if the API process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of the worker process: load, report ready, then serve commands until told to stop."""
    # Ctrl-C and service managers signal the whole process group: the API process decides when
    # the worker stops (``close`` or a closed pipe), so it can drain and shut down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            conn.send(message)

    try:
        import torch

        from llmcomp.loading import load_model
        from llmcomp.serve.engine import Engine

        torch.set_num_threads(spec.threads)
        if spec.super_model is not None or spec.super_url is not None:
            from llmcomp.routing import RouterConfig
            from llmcomp.serve.routed_engine import build_routed_engine

            router = RouterConfig.model_validate_json(spec.router or "")
            engine = build_routed_engine(spec.model, spec.super_model, router, spec.dtype, spec.max_batch_size,
                                         spec.max_queue, spec.max_model_len, spec.compile,
                                         progress=lambda line: send(("progress", line)), super_url=spec.super_url,
                                         park_slots=spec.park_slots)
            model = engine.swift.model
        else:
            model, tokenizer = load_model(spec.model, dtype=spec.dtype)
            from llmcomp.activation_sparsity import ActivationSettings

            ActivationSettings.from_env().apply(model)  # --activation-sparsity of `llmcomp serve`
            engine = Engine(model, tokenizer, spec.max_batch_size, spec.max_queue, spec.max_model_len,
                            compile=spec.compile, progress=lambda line: send(("progress", line)))
    except Exception as exc:  # reported to the API process as one line, then this worker exits
        send(("failed", _one_line(exc)))
        return
    send(("ready", {"pid": os.getpid(), "context_length": engine.context_length,
                    "vocab_size": int(model.config.vocab_size)}))
    handles: dict[int, Any] = {}

    def sink_for(key: int) -> Sink:
        def sink(ev: RequestOutput) -> None:
            if ev.finished:
                handles.pop(key, None)
            send(("event", key, ev))

        return sink

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the API process is gone
                break
            kind = message[0]
            if kind == "submit":
                requests = message[1]
                try:
                    accepted = engine.submit_many([(ids, params, sink_for(key)) for key, ids, params in requests])
                except (QueueFullError, EngineClosedError) as exc:
                    for key, ids, _ in requests:
                        send(("event", key, RequestOutput("", [], [], True, "error", len(ids), 0, str(exc),
                                                          retryable=True)))
                    continue
                handles.update({key: h for (key, _, _), h in zip(requests, accepted, strict=True)})
            elif kind == "cancel":
                handle = handles.pop(message[1], None)
                if handle is not None:
                    handle.cancel()
            elif kind == "router":  # routed serving: new tau/T (validated by the API process)
                engine.update_router(**message[1])
            elif kind == "close":
                break
    finally:
        engine.close()


# -- API side -------------------------------------------------------------------------------------
@dataclass
class _Pending:
    sink: Sink
    prompt_tokens: int
    completion_tokens: int = 0


class WorkerHandle:
    """What :meth:`EngineWorker.submit_many` returns per sequence; ``cancel()`` frees its slot."""

    def __init__(self, key: int, owner: EngineWorker) -> None:
        self.id = key
        self._owner = owner

    def cancel(self) -> None:
        self._owner._cancel(self.id)


class EngineWorker:
    """The API process's engine: the :class:`~llmcomp.serve.engine.Engine` interface, backed by a
    supervised worker process that is restarted when it dies."""

    def __init__(self, spec: WorkerSpec, tokenizer: Any, progress: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_batch_size = spec.max_batch_size
        self.max_queue = spec.max_queue
        self.context_length = 0
        self.vocab_size = 0
        self.restarts = 0
        self.on_worker_exit: list[Callable[[str], None]] = []  # called with the cause of each crash
        self._progress = progress or (lambda message: log.info(message))
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._conn: Connection | None = None
        self._proc: Any = None
        self._state = "starting"
        self._closed = threading.Event()
        self._start()

    # -- the Engine interface ---------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``ready``, ``restarting`` (a worker died, a new one is loading) or ``closed``."""
        return self._state

    @property
    def worker_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._pending) - self.max_batch_size)

    @property
    def num_active(self) -> int:
        return min(len(self._pending), self.max_batch_size)

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, Sink]]) -> list[WorkerHandle]:
        """Queue sequences atomically, with the engine's bound (``QueueFullError`` beyond it)."""
        with self._lock:
            if self._state == "closed":
                raise EngineClosedError("engine is shut down")
            if self._state != "ready" or self._conn is None:
                raise EngineUnavailableError("the model worker is restarting after a crash; retry shortly")
            # The worker's engine admits waiting + new <= max_queue + free slots; every unfinished
            # sequence here is active or waiting there, so this is the same bound.
            if len(self._pending) + len(requests) > self.max_queue + self.max_batch_size:
                raise QueueFullError(self.num_waiting, self.max_queue)
            keys = [next(self._keys) for _ in requests]
            for key, (ids, _, sink) in zip(keys, requests, strict=True):
                self._pending[key] = _Pending(sink, len(ids))
            try:
                self._conn.send(("submit", [(k, list(ids), p) for k, (ids, p, _) in zip(keys, requests, strict=True)]))
            except (OSError, ValueError):  # the worker died under us: the supervisor restarts it
                for key in keys:
                    self._pending.pop(key, None)
                raise EngineUnavailableError("the model worker stopped; retry shortly") from None
        return [WorkerHandle(k, self) for k in keys]

    @property
    def router_config(self) -> Any:
        """Routed serving: the router in force (``None`` for one model)."""
        if self.spec.router is None:
            return None
        from llmcomp.routing import RouterConfig

        return RouterConfig.model_validate_json(self.spec.router)

    def update_router(self, tau: float | None = None, temperature: float | None = None) -> Any:
        """New tau/T for the worker's next decisions; kept in the spec, so a restarted worker has them."""
        from llmcomp.routing import Router

        with self._lock:
            config = self.router_config
            if config is None:
                raise ValueError("this engine does not route")
            config = Router(config).update(tau=tau, temperature=temperature)  # validates
            self.spec = dataclasses.replace(self.spec, router=config.model_dump_json())
            if self._conn is not None and self._state == "ready":
                try:
                    self._conn.send(("router", {"tau": tau, "temperature": temperature}))
                except (OSError, ValueError):
                    pass  # the worker died: the new one starts from the updated spec
        return config

    def close(self) -> None:
        """Stop the worker (politely, then by force) and fail whatever is still pending."""
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
            self._closed.set()
            conn, proc = self._conn, self._proc
        if conn is not None:
            try:
                conn.send(("close",))
            except (OSError, ValueError):
                pass
        if proc is not None:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
        self._fail_pending("engine is shut down", retryable=False)

    # -- internals ----------------------------------------------------------------------------------
    def _cancel(self, key: int) -> None:
        with self._lock:
            if key not in self._pending or self._conn is None or self._state != "ready":
                return
            try:
                self._conn.send(("cancel", key))
            except (OSError, ValueError):
                pass

    def _spawn(self) -> tuple[Any, Connection]:
        ctx = mp.get_context("spawn")  # fork would copy the API's threads and locks mid-flight
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(self.spec, child), name="llmcomp-model-worker")
        proc.start()
        child.close()
        return proc, parent

    def _await_ready(self, proc: Any, conn: Connection) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if conn.poll(0.2):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "ready":
                    return message[1]
                if message[0] == "progress":  # start-up steps (KV cache size, compiling)
                    self._progress(message[1])
                if message[0] == "failed":
                    proc.join(STOP_TIMEOUT_S)
                    raise LlmcompError(f"cannot start the model worker: {message[1]}")
            elif not proc.is_alive():
                break
            if self._closed.is_set():
                raise EngineClosedError("engine is shut down")
        proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            raise LlmcompError(f"the model worker did not start within {START_TIMEOUT_S:.0f} s")
        raise LlmcompError(f"the model worker died while loading the model ({exit_cause(proc.exitcode)})")

    def _start(self) -> None:
        """Start the supervisor thread and wait for the first worker (its failure is raised here)."""
        first: dict[str, BaseException | None] = {}
        ready = threading.Event()
        thread = threading.Thread(target=self._supervise, args=(first, ready), daemon=True,
                                  name="llmcomp-worker-supervisor")
        thread.start()
        ready.wait()
        if first.get("error") is not None:
            raise first["error"]  # type: ignore[misc]

    def _launch(self) -> tuple[Any, Connection]:
        """Spawn a worker and wait until its model is loaded (LlmcompError if it cannot be)."""
        t0 = time.perf_counter()
        proc, conn = self._spawn()
        self._progress(f"loading {self.spec.model} in model worker process {proc.pid}")
        try:
            info = self._await_ready(proc, conn)
        except BaseException:
            conn.close()
            if proc.is_alive():
                proc.kill()
            raise
        with self._lock:
            if self._state == "closed":  # closed while loading
                conn.send(("close",))
                raise EngineClosedError("engine is shut down")
            self._proc, self._conn = proc, conn
            self.context_length, self.vocab_size = info["context_length"], info["vocab_size"]
            self._state = "ready"
        self._progress(f"model worker {proc.pid} ready in {time.perf_counter() - t0:.1f} s")
        return proc, conn

    def _supervise(self, first: dict[str, BaseException | None], ready: threading.Event) -> None:
        """One thread owns every worker: it spawns them (Linux ties a worker's parent-death signal to
        the spawning thread, so that thread must live as long as we do), delivers their events, and
        restarts them when they die."""
        try:
            proc, conn = self._launch()
        except BaseException as exc:
            first["error"] = exc
            ready.set()
            return
        ready.set()
        while True:
            started = time.monotonic()
            self._pump(conn)
            if self._closed.is_set():
                return
            proc.join(STOP_TIMEOUT_S)
            cause = exit_cause(proc.exitcode)
            with self._lock:
                self._state = "restarting"
                self._conn = None
                self.restarts += 1
                in_flight = len(self._pending)
            log.error("model worker %s died (%s); failing %d in-flight requests and starting a new one "
                      "(restart #%d)", proc.pid, cause, in_flight, self.restarts)
            for listener in self.on_worker_exit:
                listener(cause)
            self._fail_pending(f"the model worker died ({cause}); it is being restarted, retry shortly",
                               retryable=True)
            launched = self._relaunch(time.monotonic() - started)
            if launched is None:
                return
            proc, conn = launched

    def _pump(self, conn: Connection) -> None:
        """Deliver the worker's events until its pipe closes."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "event":
                self._deliver(message[1], message[2])

    def _relaunch(self, lifetime: float) -> tuple[Any, Connection] | None:
        """A new worker, retried with backoff while it keeps failing; None once we are closed."""
        attempt = 0 if lifetime >= STABLE_AFTER_S else 1
        while not self._closed.is_set():
            if self._closed.wait(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]):
                return None
            try:
                return self._launch()
            except EngineClosedError:
                return None
            except LlmcompError as exc:
                attempt += 1
                log.error("restarting the model worker failed (%s); next try in %.0f s", exc,
                          RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
        return None

    def _deliver(self, key: int, ev: RequestOutput) -> None:
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                return
            pending.completion_tokens = ev.completion_tokens
            if ev.finished:
                del self._pending[key]
        pending.sink(ev)

    def _fail_pending(self, message: str, retryable: bool) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.sink(RequestOutput("", [], [], True, "error", p.prompt_tokens, p.completion_tokens, message,
                                 retryable=retryable))
