"""Native inference engine: continuous batching of HF causal LMs on a background thread.

One thread owns the model. Each iteration it admits waiting requests (prefilled one at a time, so
no prompt padding is ever attended), then runs a single batched decode step for every live
sequence on a shared left-padded KV cache (:mod:`llmcomp.serve.kv_batch`). Sequences leave the
batch as soon as they finish or are cancelled, freeing their slot for the next waiting request.
The waiting queue is bounded: :meth:`Engine.submit` raises :class:`QueueFullError` instead of
buffering without limit. Results are pushed to a per-request ``sink`` callable, which lets the
HTTP layer bridge into asyncio and lets tests and scripts block on a plain queue.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcomp.generation import eos_token_ids
from llmcomp.serve import kv_batch
from llmcomp.serve.detok import IncrementalDetokenizer
from llmcomp.serve.sampling import SamplingParams, TokenLogprob, make_generator, sample_token, token_logprob

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_QUEUE = 64
RETRY_AFTER_S = 1  # what a rejected client is told to wait before retrying
FALLBACK_CONTEXT_LENGTH = 2048  # when the config names no maximum position


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
    cancelled: bool = False
    done: bool = False


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
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_length = context_length or _context_length(model)
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._admitting = 0  # sequences taken from _waiting whose prefill is still running
        self._active: list[_Sequence] = []
        self._batch: kv_batch.KVBatch | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmcomp-engine", daemon=True)
        self._thread.start()

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
            free_slots = self.max_batch_size - len(self._active) - self._admitting
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
                    while not self._closed and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = []
                    while self._waiting and len(self._active) + len(admitted) < self.max_batch_size:
                        admitted.append(self._waiting.popleft())
                    # Popped but not yet active: still occupying batch slots for submit()'s bound.
                    self._admitting = len(admitted)
                try:
                    self._drop_cancelled()
                    for seq in admitted:
                        self._prefill(seq)
                    with self._cond:
                        self._admitting = 0
                    if self._active:
                        self._decode_step()
                except Exception as exc:  # keep serving: fail what was in flight, reset the batch
                    with self._cond:
                        self._admitting = 0
                    self._fail_all(admitted, f"{type(exc).__name__}: {exc}")
        self._fail_all(list(self._waiting), "engine is shut down")

    def _forward(self, **kwargs: Any) -> Any:
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(use_cache=True, **kwargs)

    def _prefill(self, seq: _Sequence) -> None:
        if seq.cancelled:
            self._finish(seq, "", [], [], "cancelled")
            return
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        out = self._forward(input_ids=ids, past_key_values=kv_batch.new_cache())
        keys, values = kv_batch.cache_tensors(out.past_key_values)
        row = kv_batch.KVBatch(
            keys, values, torch.ones_like(ids), torch.tensor([ids.shape[1]], device=self.device)
        )
        if not self._append_token(seq, out.logits[0, -1]):
            self._batch = kv_batch.merge(self._batch, row)
            self._active.append(seq)

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None and batch.size == len(self._active)
        last = torch.tensor([[s.output_ids[-1]] for s in self._active], dtype=torch.long, device=self.device)
        ones = torch.ones_like(last)
        out = self._forward(
            input_ids=last,
            attention_mask=torch.cat([batch.mask, ones], dim=1),
            position_ids=batch.positions.unsqueeze(1),
            past_key_values=kv_batch.to_cache(batch),
        )
        keys, values = kv_batch.cache_tensors(out.past_key_values)
        grown = kv_batch.KVBatch(keys, values, torch.cat([batch.mask, ones], dim=1), batch.positions + 1)
        keep = []
        for i, seq in enumerate(self._active):
            if seq.cancelled:
                self._finish(seq, "", [], [], "cancelled")
            elif not self._append_token(seq, out.logits[i, -1]):
                keep.append(i)
        self._set_rows(grown, keep)

    def _set_rows(self, batch: kv_batch.KVBatch, keep: list[int]) -> None:
        if len(keep) != batch.size:
            batch = kv_batch.select(batch, keep)
        self._active = [self._active[i] for i in keep]
        self._batch = batch if self._active else None

    def _drop_cancelled(self) -> None:
        if self._batch is None or not any(s.cancelled for s in self._active):
            return
        keep = []
        for i, seq in enumerate(self._active):
            if seq.cancelled:
                self._finish(seq, "", [], [], "cancelled")
            else:
                keep.append(i)
        self._set_rows(self._batch, keep)

    def _append_token(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Sample, detokenize and emit one token; returns True when the sequence is finished."""
        params = seq.params
        token = sample_token(logits, params, seq.generator)
        lps = [token_logprob(logits, token, params.logprobs)] if params.logprobs is not None else []
        seq.output_ids.append(token)
        reason = None
        if token in self.eos_ids and not params.ignore_eos:
            reason, text = "stop", seq.detok.flush()
        else:
            text = seq.detok.add(token)
            if seq.detok.stopped:
                reason = "stop"
            elif len(seq.output_ids) >= params.max_tokens or (
                len(seq.prompt_ids) + len(seq.output_ids) >= self.context_length
            ):
                reason = "length"
                text += seq.detok.flush()
        if reason is not None:
            self._finish(seq, text, [token], lps, reason)
            return True
        seq.sink(RequestOutput(text, [token], lps, False, None, len(seq.prompt_ids), len(seq.output_ids)))
        return False

    def _finish(
        self, seq: _Sequence, text: str, ids: list[int], lps: list[TokenLogprob], reason: str,
        error: str | None = None,
    ) -> None:
        seq.done = True
        seq.sink(RequestOutput(text, ids, lps, True, reason, len(seq.prompt_ids), len(seq.output_ids), error))

    def _fail_all(self, extra: list[_Sequence], message: str) -> None:
        for seq in self._active + [s for s in extra if s not in self._active]:
            if not seq.done:
                self._finish(seq, "", [], [], "error", error=message)
        self._active, self._batch = [], None


def _context_length(model: Any) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT_LENGTH
