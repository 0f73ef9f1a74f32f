"""Native inference engine: continuous batching on the runtime's slot KV cache, on one thread.

One thread owns the model (a :class:`~llmcomp.runtime.ModelRunner`). Each iteration is one
forward: a decode step for every live sequence plus up to ``prefill_chunk`` prompt tokens of the
requests waiting to start (several short prompts at once, or one chunk of a long one), so
admitting requests neither stalls the running streams nor costs forwards of their own. Live
sequences occupy slots ``0..n-1``; one that finishes or is cancelled frees its slot at once (the
last live slot moves into it), so the next waiting request starts on the following iteration.
The waiting queue is bounded:
:meth:`Engine.submit` raises :class:`QueueFullError` instead of buffering without limit. Results
are pushed to a per-request ``sink`` callable, which lets the HTTP layer bridge into asyncio and
lets tests and scripts block on a plain queue.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcomp.runtime import ModelRunner, context_length
from llmcomp.runtime.runner import DEFAULT_PREFILL_CHUNK
from llmcomp.runtime.sampling import SamplingParams, TokenLogprob, make_generator, sample_rows, token_logprob
from llmcomp.runtime.stopping import eos_token_ids, is_end_of_sequence, length_limit_reached
from llmcomp.serve.detok import IncrementalDetokenizer

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_MODEL_LEN = 2048  # KV slots are pre-allocated to this length unless --max-model-len says otherwise
RETRY_AFTER_S = 1  # what a rejected client is told to wait before retrying
log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue is full; the caller should answer 429 with ``Retry-After``."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"server is at capacity ({waiting} requests waiting, limit {limit}); retry later")
        self.retry_after = RETRY_AFTER_S


class EngineClosedError(Exception):
    """The engine was shut down; no new requests are accepted."""


@dataclass
class RequestOutput:
    """One event for one sequence: new tokens/text since the previous event, and usage so far."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    retryable: bool = False  # the error is transient (the model worker is restarting): HTTP 503


Sink = Callable[[RequestOutput], None]


@dataclass
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    detok: IncrementalDetokenizer
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the KV cache
    cancelled: bool = False
    done: bool = False
    park_key: int | None = None  # routing: where this engine parks its cache when the sequence leaves


class RequestHandle:
    """Returned by :meth:`Engine.submit`; ``cancel()`` frees the slot at the next engine step."""

    def __init__(self, seq: _Sequence, engine: Engine) -> None:
        self._seq = seq
        self._engine = engine
        self.id = seq.id

    def cancel(self) -> None:
        if not self._seq.done:
            self._seq.cancelled = True
            self._engine._wake()


@dataclass
class Completion:
    """Result of the blocking :meth:`Engine.generate` helper."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt_tokens: int


class Engine:
    """Continuous-batching generator around one loaded model and its tokenizer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        context_length: int | None = None,
        compile: bool = False,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        progress: Callable[[str], None] | None = None,
        compile_backend: str = "inductor",
        spare_slots: int = 0,
    ) -> None:
        """``spare_slots``: KV slots past the batch, for subclasses that park sequences' caches."""
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.runner = ModelRunner(model, max_batch_size, context_length or default_max_model_len(model),
                                  compile=compile, compile_backend=compile_backend, prefill_chunk=prefill_chunk,
                                  spare_slots=spare_slots)
        self.context_length = self.runner.max_len
        if progress is not None:
            spare = f" + {spare_slots} spare" if spare_slots else ""
            progress(f"runtime: {self.runner.backend} forward, KV cache {max_batch_size}{spare} slots x "
                     f"{self.context_length} tokens = {self.runner.kv_cache_bytes / 2**20:.0f} MiB")
        if self.runner.compiled:
            self._compile(progress)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # taken from _waiting, prompts (partly) in the next slots
        self._active: list[_Sequence] = []  # index == KV slot
        self._calls: list[Callable[[], None]] = []  # to run on the engine thread (call_soon)
        self.prefilled_tokens = 0  # prompt tokens put into the cache (for benchmarks and tests)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmcomp-engine", daemon=True)
        self._thread.start()

    def _compile(self, progress: Callable[[str], None] | None) -> None:
        """Compile every batch bucket now, so no request pays for it; eager decode if it fails."""
        say = progress or log.info
        try:
            seconds = self.runner.warm_up(progress=lambda m: say(f"compiling {m}"))
        except Exception as exc:  # e.g. no C++ compiler for inductor: serving still works, eagerly
            self.runner.disable_compile()
            say(f"compiling the decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "decoding eagerly")
            return
        say(f"compiled the decode step ({len(self.runner.buckets)} batch sizes) in {seconds:.1f} s")

    # -- public API ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> RequestHandle:
        return self.submit_many([(prompt_ids, params, sink)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, Sink]]) -> list[RequestHandle]:
        """Queue several sequences atomically: either all are accepted or none (QueueFullError)."""
        seqs = [
            _Sequence(next(self._ids), list(ids), params, sink,
                      IncrementalDetokenizer(self.tokenizer, ids, params.stop), make_generator(params.seed))
            for ids, params, sink in requests
        ]
        with self._cond:
            if self._closed:
                raise EngineClosedError("engine is shut down")
            free_slots = self.max_batch_size - len(self._active) - len(self._prefilling)
            if len(self._waiting) + len(seqs) > self.max_queue + max(free_slots, 0):
                raise QueueFullError(len(self._waiting), self.max_queue)
            self._waiting.extend(seqs)
            self._cond.notify()
        return [RequestHandle(s, self) for s in seqs]

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None
    ) -> Completion:
        """Blocking helper for scripts and tests: run one request to completion."""
        events: queue.Queue[RequestOutput] = queue.Queue()
        self.submit(prompt_ids, params, events.put)
        text, ids, lps = [], [], []
        while True:
            ev = events.get(timeout=timeout)
            text.append(ev.text)
            ids.extend(ev.token_ids)
            lps.extend(ev.logprobs)
            if ev.finished:
                if ev.error:
                    raise RuntimeError(ev.error)
                return Completion("".join(text), ids, ev.finish_reason, lps, ev.prompt_tokens)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread before its next step (the runner has one owner thread)."""
        with self._cond:
            self._calls.append(fn)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- engine thread ------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while (not self._closed and not self._waiting and not self._active and not self._prefilling
                           and not self._calls):
                        self._cond.wait()
                    if self._closed:
                        break
                    calls, self._calls = self._calls, []
                try:
                    for fn in calls:
                        fn()
                    self._drop_cancelled()
                    self._step()
                except Exception as exc:  # keep serving: fail what was in flight, reset the slots
                    log.exception("engine step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
        self._fail_all("engine is shut down", list(self._waiting))

    def _plan_prefill(self) -> list[tuple[_Sequence, list[int]]]:
        """Prompt chunks for this step: waiting sequences take the slots after the live ones, in
        order, until ``prefill_chunk`` tokens are planned (only the last chunk can be partial)."""
        budget, parts, index = self.runner.prefill_chunk, [], 0
        while budget > 0:
            if index == len(self._prefilling):
                with self._cond:
                    if not self._waiting or len(self._active) + len(self._prefilling) >= self.max_batch_size:
                        break
                    self._prefilling.append(self._waiting.popleft())
            seq = self._prefilling[index]
            if seq.cancelled or len(seq.prompt_ids) >= self.context_length:
                self._drop_prefilling(index)
                if seq.cancelled:
                    self._finish(seq, "", [], [], "cancelled")
                else:
                    self._finish(seq, "", [], [], "error", error=f"the prompt has {len(seq.prompt_ids)} tokens; "
                                 f"the maximum context is {self.context_length}")
                continue
            if seq.prefilled == 0:
                self.runner.free(len(self._active) + index)
                self._resume(seq, len(self._active) + index)
            chunk = seq.prompt_ids[seq.prefilled:seq.prefilled + budget]
            parts.append((seq, chunk))
            budget -= len(chunk)
            index += 1
        return parts

    def _step(self) -> None:
        """One forward: a decode step of the live sequences plus the planned prompt chunks."""
        parts = self._plan_prefill()
        if not parts:
            if self._active:
                self._consume_decode(self.runner.decode([s.output_ids[-1] for s in self._active]))
            return
        first = len(self._active)
        logits, lasts = self.runner.decode_with_prefill(
            [s.output_ids[-1] for s in self._active], [(first + i, chunk) for i, (_, chunk) in enumerate(parts)])
        for seq, chunk in parts:
            seq.prefilled += len(chunk)
            self.prefilled_tokens += len(chunk)
        if self._active:
            self._consume_decode(logits)  # may free slots: the prompts being prefilled follow them down
        for (seq, _), last in zip(parts, lasts, strict=True):
            if seq.prefilled < len(seq.prompt_ids):
                break  # only the last chunk can be partial
            assert self._prefilling[0] is seq
            token = sample_rows(last[None], [seq.params], [seq.generator])[0]
            if self._append_token(seq, last, token):
                self._drop_prefilling(0)
            else:
                self._prefilling.pop(0)
                self._active.append(seq)  # its slot is len(active): the first after the live ones

    def _resume(self, seq: _Sequence, slot: int) -> None:
        """Hook: put a cache this engine kept for ``seq`` into ``slot`` and set ``seq.prefilled``."""

    def _drop_prefilling(self, index: int) -> None:
        """Remove a prefilling sequence; the ones after it move down one slot (those with data)."""
        self._prefilling.pop(index)
        base = len(self._active)
        self.runner.free(base + index)
        for j in range(index, len(self._prefilling)):
            if self._prefilling[j].prefilled:
                self.runner.move(base + j + 1, base + j)

    def _consume_decode(self, logits: torch.Tensor) -> None:
        """Sample and emit one token per live sequence, then free the slots of finished ones."""
        tokens = sample_rows(logits, [s.params for s in self._active], [s.generator for s in self._active])
        finished = []
        for i, seq in enumerate(self._active):
            if seq.cancelled:
                self._finish(seq, "", [], [], "cancelled")
                finished.append(i)
            elif self._append_token(seq, logits[i], tokens[i]):
                finished.append(i)
        self._release(finished)

    def _release(self, indices: list[int]) -> None:
        """Free the slots of finished sequences, keeping the live slots a prefix ``0..n-1``."""
        for i in sorted(indices, reverse=True):
            last = len(self._active) - 1
            self.runner.move(last, i)  # a no-op when i is the last slot
            self._active[i] = self._active[last]
            self._active.pop()
            self.runner.free(last)
        if indices:  # prompts being prefilled sit just after the live slots: follow them down
            for j, seq in enumerate(self._prefilling):
                if seq.prefilled:
                    self.runner.move(len(self._active) + len(indices) + j, len(self._active) + j)

    def _drop_cancelled(self) -> None:
        cancelled = [i for i, s in enumerate(self._active) if s.cancelled]
        for i in cancelled:
            self._finish(self._active[i], "", [], [], "cancelled")
        self._release(cancelled)

    def _append_token(self, seq: _Sequence, logits: torch.Tensor, token: int) -> bool:
        """Detokenize and emit one sampled token; returns True when the sequence is finished."""
        lps = [token_logprob(logits, token, seq.params.logprobs)] if seq.params.logprobs is not None else []
        seq.output_ids.append(token)
        return self._emit(seq, token, lps, len(seq.output_ids))

    def _emit(self, seq: _Sequence, token: int, lps: list[TokenLogprob], position: int) -> bool:
        """Detokenize and send ``token``, the ``position``-th of ``seq.output_ids`` (a router may
        hold the last few back); True when it ends the sequence (EOS, stop string, length)."""
        params = seq.params
        reason = None
        if is_end_of_sequence(token, self.eos_ids, params):
            reason, text = "stop", seq.detok.flush()
        else:
            text = seq.detok.add(token)
            if seq.detok.stopped:
                reason = "stop"
            elif length_limit_reached(position, len(seq.prompt_ids) + position, params, self.context_length):
                reason = "length"
                text += seq.detok.flush()
        if reason is not None:
            del seq.output_ids[position:]  # held-back tokens after the end are dropped
            self._finish(seq, text, [token], lps, reason)
            return True
        seq.sink(RequestOutput(text, [token], lps, False, None, len(seq.prompt_ids), position))
        return False

    def _finish(
        self, seq: _Sequence, text: str, ids: list[int], lps: list[TokenLogprob], reason: str,
        error: str | None = None,
    ) -> None:
        seq.done = True
        seq.sink(RequestOutput(text, ids, lps, True, reason, len(seq.prompt_ids), len(seq.output_ids), error))

    def _fail_all(self, message: str, extra: list[_Sequence] | None = None) -> None:
        pending = [*self._active, *self._prefilling, *(extra or [])]
        for seq in pending:
            if not seq.done:
                self._finish(seq, "", [], [], "error", error=message)
        self._active, self._prefilling = [], []
        for slot in range(self.runner.num_slots):
            self.runner.free(slot)


def default_max_model_len(model: Any) -> int:
    """The model's context, capped at :data:`DEFAULT_MAX_MODEL_LEN` (the KV cache is pre-allocated)."""
    return min(context_length(model), DEFAULT_MAX_MODEL_LEN)
