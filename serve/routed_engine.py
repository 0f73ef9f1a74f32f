"""Serve a swift and a super model behind one engine interface, routed per request or per token.

Every request is prefilled by the swift model's engine. When its prompt is in the KV cache, the
logits after the last prompt token give the swift energy; at or below ``tau`` the swift engine
goes on decoding as usual (the prefill is not wasted), above it the sequence leaves the swift
engine (its slot is freed at once) and is submitted, with the same prompt and sampling
parameters, to the super model's engine, which prefills it into its own KV cache.

``mode: token`` (router.json) also decides at every later swift step: when the energy of the
logits for the next token is above ``tau``, that token and the rest of the request are the super
model's (takeover). The sequence leaves the swift batch and enters the super engine with the
prompt plus the tokens generated so far as its "prompt", so the super KV cache is caught up by
one chunked prefill; it keeps the swift sequence's detokenizer (text and stop strings continue
across the switch) and random generator, and its ``max_tokens`` is what is left. With
``on_spike: defer`` the super engine makes only that one token and hands the sequence back the same
way: the swift engine gets prompt + every token so far as its "prompt" (one chunked prefill), then
goes on deciding at every step. Each leg re-prefills the sequence in the engine it enters (neither
engine keeps a parked slot), which is what a deferred token costs here.

The two engines never share a KV cache, so nothing has to be kept consistent between them: a
deferred request's swift cache is simply dropped, and the super cache is built from the token
ids. The super engine may be remote (:class:`~llmcomp.serve.remote_engine.RemoteEngine`): it gets
the same token ids over HTTP and, given the swift detokenizer, continues the text the same way.
Every event carries the model that produced its tokens and the first decision's energy
(:class:`RoutedOutput`), which the HTTP layer turns into response fields (``routed_to``:
swift, super or mixed; ``deferred_tokens``), a header and ``/metrics`` counters. ``tau`` (and
``T``) can be changed while serving (:meth:`RoutedEngine.update_router`); the next decision uses
the new value.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmcomp.routing import SUPER, SWIFT, Decision, Router, RouterConfig
from llmcomp.runtime.sampling import SamplingParams, TokenLogprob, sample_rows, token_logprob
from llmcomp.runtime.stopping import is_end_of_sequence, length_limit_reached
from llmcomp.serve.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    EngineClosedError,
    QueueFullError,
    RequestHandle,
    RequestOutput,
    Sink,
    _Sequence,
)
from llmcomp.serve.engine import Engine as _Engine


@dataclass
class RoutedOutput(RequestOutput):
    """A :class:`RequestOutput` that says which model produced its tokens and the swift energy."""

    routed_to: str | None = None  # "swift" | "super"; None when the request failed before the decision
    energy: float | None = None  # the first decision's (after prefill)


def with_route(ev: RequestOutput, model: str | None, decision: Decision | None,
               prompt_tokens: int | None = None, earlier_tokens: int = 0) -> RoutedOutput:
    """``ev`` labelled with its model; a takeover's counts are made the whole request's."""
    fields = {f.name: getattr(ev, f.name) for f in dataclasses.fields(RequestOutput)}
    if prompt_tokens is not None:
        fields["prompt_tokens"] = prompt_tokens
    fields["completion_tokens"] += earlier_tokens
    if decision is None:
        return RoutedOutput(**fields)
    return RoutedOutput(**fields, routed_to=model, energy=decision.energy)


class _Route:
    """One request's routing state: its client sink, the decision, the super handle once deferred."""

    def __init__(self, sink: Sink, prompt_tokens: int) -> None:
        self.sink = sink
        self.decision: Decision | None = None  # the first one (after prefill)
        self.swift_handle: Any = None
        self.super_handle: Any = None
        self.cancelled = False
        self.prompt_tokens = prompt_tokens  # the client's; a later leg's "prompt" includes generated tokens
        self.earlier = 0  # tokens generated before the current leg (a leg: one stay in one engine)
        self.forget: Callable[[], None] | None = None  # drops the route when the swift part ends
        self.key: int | None = None  # parked caches are kept under this key (on_spike: defer)
        self.release: Callable[[], None] | None = None  # frees those caches when the request ends

    def swift_event(self, ev: RequestOutput) -> None:
        if ev.finished and self.forget is not None:
            self.forget()  # finished, cancelled or failed on the swift engine
        self._ended(ev)
        self.sink(with_route(ev, SWIFT, self.decision, self.prompt_tokens, self.earlier))

    def super_event(self, ev: RequestOutput) -> None:
        self._ended(ev)
        self.sink(with_route(ev, SUPER, self.decision, self.prompt_tokens, self.earlier))

    def _ended(self, ev: RequestOutput) -> None:
        if ev.finished and self.release is not None:
            self.release()


@dataclass
class _Parked:
    """A sequence's cache kept in a spare slot while the other engine extends the sequence."""

    slot: int
    tokens: list[int]  # the ids whose keys and values the slot holds


class _Continuing(_Engine):
    """An engine that can continue a sequence the other engine started, for good or (``back``)
    for one token, after which ``back(sequence)`` hands it on.

    Parking (``park_slots`` > 0, used by ``on_spike: defer``): a sequence that leaves with a
    ``park_key`` has its cache moved into a spare slot; when it comes back (``submit_takeover`` with
    the same key) the cache is moved into its new slot and only the tokens added elsewhere are
    prefilled. Without a free spare slot, or if the ids no longer extend the parked ones, the
    sequence is prefilled whole, as without parking. Parked caches are released by :meth:`unpark`
    (any thread; done on the engine thread)."""

    def __init__(self, *args: Any, park_slots: int = 0, **kwargs: Any) -> None:
        self._back: dict[int, Callable[[Any], None]] = {}  # sequence id -> hand-back, for one-token visits
        self._parked: dict[int, _Parked] = {}  # park key -> cache; engine thread only
        self._spare: list[int] = []  # free spare slots (set once the runner exists)
        self.parked_prefill_saved = 0  # tokens not prefilled again thanks to parked caches
        super().__init__(*args, spare_slots=park_slots, **kwargs)
        self._spare = list(range(self.max_batch_size, self.runner.num_slots))

    def submit_takeover(self, ids: list[int], params: SamplingParams, sink: Sink, detok: Any,
                        generator: torch.Generator, back: Callable[[Any], None] | None = None,
                        park_key: int | None = None) -> RequestHandle:
        """Continue a sequence: ``ids`` = prompt + tokens so far (prefilled in chunks, or only the
        new ones after a cache parked under ``park_key``), its detokenizer and generator carry on.
        Admitted past the queue bound and ahead of the waiting requests: its client is already
        being answered."""
        seq = _Sequence(next(self._ids), list(ids), params, sink, detok, generator, park_key=park_key)
        with self._cond:
            if self._closed:
                raise EngineClosedError("engine is shut down")
            if back is not None:
                self._back[seq.id] = back
            self._waiting.appendleft(seq)
            self._cond.notify()
        return RequestHandle(seq, self)

    def unpark(self, key: int) -> None:
        """Release the cache parked under ``key``, if any (the request ended)."""
        self.call_soon(lambda: self._release_parked(key))

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def _park(self, seq: Any) -> None:
        """Keep the cache of ``seq`` (leaving this engine now) in a spare slot, when one is free."""
        slot = next((i for i, s in enumerate(self._active) if s is seq), None)
        if slot is None and self._prefilling and self._prefilling[0] is seq:
            slot = len(self._active)  # it leaves right after its prefill
        if slot is None or seq.park_key is None or not self._spare:
            return
        self._release_parked(seq.park_key)
        spare = self._spare.pop()
        length = self.runner.lengths[slot]
        self.runner.move(slot, spare)
        self._parked[seq.park_key] = _Parked(spare, (seq.prompt_ids + seq.output_ids)[:length])

    def _resume(self, seq: Any, slot: int) -> None:
        parked = self._parked.pop(seq.park_key, None) if seq.park_key is not None else None
        if parked is None:
            return
        n = _common_prefix(parked.tokens, seq.prompt_ids, len(seq.prompt_ids) - 1)  # >= 1 token to prefill
        if n:  # (verification may have rejected the cache's last tokens: they are cut off)
            self.runner.move(parked.slot, slot)
            self.runner.rewind(slot, n)
            seq.prefilled = n
            self.parked_prefill_saved += n
        self.runner.free(parked.slot)
        self._spare.append(parked.slot)

    def _spare_slot(self) -> int:
        """A free spare slot; the oldest parked cache gives its slot up when none is free."""
        if not self._spare:
            self._release_parked(next(iter(self._parked)))
        return self._spare.pop()

    def _release_parked(self, key: int) -> None:
        parked = self._parked.pop(key, None)
        if parked is not None:
            self.runner.free(parked.slot)
            self._spare.append(parked.slot)

    def _fail_all(self, message: str, extra: list[Any] | None = None) -> None:
        super()._fail_all(message, extra)  # frees every slot, the spare ones too
        self._parked.clear()
        self._spare = list(range(self.max_batch_size, self.runner.num_slots))


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    return n


Held = list[tuple[int, list[TokenLogprob]]]  # swift tokens (with their logprobs) not yet sent


class _SwiftEngine(_Continuing):
    """The swift model's engine: the router sees the logits of every token before it is sampled
    into the sequence (request mode decides only at the first).

    With ``on_spike: verify`` (``window`` > 0) the last ``window`` tokens of each sequence are held
    back: they are in the sequence and the cache but not sent, because the super model may reject
    them at the next spike. Older ones are sent (never to be checked), and all are sent when the
    sequence ends here."""

    def __init__(self, *args: Any, on_token: Callable[[Any, torch.Tensor], bool], window: int = 0,
                 **kwargs: Any) -> None:
        self._on_token = on_token  # set before Engine starts its thread
        self.window = window
        self._held: dict[int, Held] = {}  # sequence id -> held tokens (engine thread)
        super().__init__(*args, **kwargs)

    def take_held(self, seq: Any) -> Held:
        """The held tokens of ``seq`` (the last ones of its output), now the caller's to send."""
        return self._held.pop(seq.id, [])

    def _append_token(self, seq: Any, logits: torch.Tensor, token: int) -> bool:
        if self._on_token(seq, logits):
            seq.done = True  # handed to the super engine: leaves this batch without an event
            self._park(seq)
            return True
        if not self.window:
            return super()._append_token(seq, logits, token)
        held = self._held.setdefault(seq.id, [])
        held.append((token, [token_logprob(logits, token, seq.params.logprobs)] if seq.params.logprobs is not None
                     else []))
        seq.output_ids.append(token)
        n = len(seq.output_ids)
        ends = is_end_of_sequence(token, self.eos_ids, seq.params) or length_limit_reached(
            n, len(seq.prompt_ids) + n, seq.params, self.context_length)
        while held and (ends or len(held) > self.window):
            tok, lps = held.pop(0)
            if self._emit(seq, tok, lps, n - len(held)):
                return True
        return False

    def _finish(self, seq: Any, *args: Any, **kwargs: Any) -> None:
        self._held.pop(seq.id, None)  # cancelled, failed or ended: held tokens after the end are void
        super()._finish(seq, *args, **kwargs)


class _SuperEngine(_Continuing):
    """The super model's engine; also continues sequences the swift engine started."""

    def _append_token(self, seq: Any, logits: torch.Tensor, token: int) -> bool:
        back = self._back.pop(seq.id, None)
        finished = super()._append_token(seq, logits, token)
        if finished or back is None:
            return finished
        seq.done = True  # a one-token visit: its token was emitted, it leaves this batch
        self._park(seq)
        back(seq)
        return True

    def _finish(self, seq: Any, *args: Any, **kwargs: Any) -> None:
        self._back.pop(seq.id, None)  # cancelled or failed before its token
        super()._finish(seq, *args, **kwargs)

    def submit_verify(self, ids: list[int], held: Held, params: SamplingParams, sink: Sink, swift_sink: Sink,
                      detok: Any, generator: torch.Generator, back: Callable[[Any], None],
                      park_key: int) -> RequestHandle:
        """``on_spike: verify``: check the swift tokens ``held`` (sent after ``ids``, not yet to the
        client) and make the next token, in one forward on this engine's thread; accepted swift
        tokens go to ``swift_sink``, the super token to ``sink``, then ``back(visit)`` unless the
        super token ended the sequence."""
        seq = _Sequence(next(self._ids), list(ids), params, sink, detok, generator, park_key=park_key)
        seq.output_ids = [t for t, _ in held]
        if self._closed:
            raise EngineClosedError("engine is shut down")
        self.call_soon(lambda: self._verify(seq, held, swift_sink, back))
        return RequestHandle(seq, self)

    def _verify(self, seq: Any, held: Held, swift_sink: Sink, back: Callable[[Any], None]) -> None:
        """One verification, in a spare slot (the request's parked cache when there is one): the
        super logits at the held positions and after them, the longest agreeing prefix of the held
        tokens is kept, the super model's choice replaces the first disagreeing one (or follows
        them all), and the cache is cut back to what was kept (greedy: the choice is the argmax;
        sampling: a draw from the super distribution with the request's generator)."""
        if seq.cancelled:
            self._finish(seq, "", [], [], "cancelled")
            return
        ids = seq.prompt_ids + seq.output_ids
        h = len(held)
        parked = self._parked.pop(seq.park_key, None)
        if parked is not None:
            slot = parked.slot
            self.runner.rewind(slot, _common_prefix(parked.tokens, ids, len(ids) - h - 1))
            self.parked_prefill_saved += self.runner.lengths[slot]
        else:
            slot = self._spare_slot()
            self.runner.free(slot)
        if len(ids) >= self.context_length:
            self._spare.append(slot)
            self.runner.free(slot)
            self._finish(seq, "", [], [], "error", error=f"the sequence has {len(ids)} tokens; the maximum "
                         f"context is {self.context_length}")
            return
        new = ids[self.runner.lengths[slot]:]
        self.prefilled_tokens += len(new)
        logits = self.runner.prefill(slot, new, logits_for_all=True)[-(h + 1):]
        for cut in range(h + 1):  # the super model's choice at each held position, then after them
            token = sample_rows(logits[cut][None], [seq.params], [seq.generator])[0]
            if cut == h or token != held[cut][0]:
                break
        self.runner.rewind(slot, len(seq.prompt_ids) + cut)
        del seq.output_ids[cut:]
        sink, seq.sink = seq.sink, swift_sink
        for i, (token, lps) in enumerate(held[:cut]):  # accepted: sent as the swift model's
            if self._emit(seq, token, lps, i + 1):
                self._park_spare(seq, slot)
                return
        seq.sink = sink
        lps = [token_logprob(logits[cut], token, seq.params.logprobs)] if seq.params.logprobs is not None else []
        seq.output_ids.append(token)
        finished = self._emit(seq, token, lps, len(seq.output_ids))
        self._park_spare(seq, slot)
        if not finished:
            seq.done = True
            back(seq)

    def _park_spare(self, seq: Any, slot: int) -> None:
        """Keep the verification's cache (already in spare ``slot``) for the request's next visit."""
        self._release_parked(seq.park_key)
        self._parked[seq.park_key] = _Parked(slot, (seq.prompt_ids + seq.output_ids)[:self.runner.lengths[slot]])


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
                 progress: Callable[[str], None] | None = None, super_engine: Any = None,
                 park_slots: int | None = None) -> None:
        """``super_engine`` (e.g. a :class:`~llmcomp.serve.remote_engine.RemoteEngine`) replaces
        a local engine for ``super_model`` (then None); it needs ``submit`` and ``submit_takeover``.
        ``park_slots``: spare KV slots per engine for ``on_spike: defer`` (default: one per batch
        slot; 0 re-prefills every deferred token's sequence whole)."""
        if config.energy_over != "vocab":
            raise ValueError("a served router takes the energy over the vocabulary (energy_over: vocab); "
                             "'choices' exists only for scoring tasks")
        if super_engine is not None and config.mode == "token" and config.on_spike in ("defer", "verify"):
            raise ValueError(f"on_spike '{config.on_spike}' needs the super model in this server (a deferred token "
                             "goes back to the swift engine); use on_spike 'takeover' with a remote super model")
        if super_engine is None and int(swift_model.config.vocab_size) != int(super_model.config.vocab_size):
            raise ValueError("the swift and super models have different vocabularies")
        self.router = Router(config)
        self.tokenizer = tokenizer
        self._defer = config.mode == "token" and config.on_spike in ("defer", "verify")  # back to swift
        self._window = config.window if config.mode == "token" and config.on_spike == "verify" else 0
        if park_slots is None:
            park_slots = max_batch_size if self._defer else 0
        self.counts = {SWIFT: 0, SUPER: 0}  # first decisions (after prefill)
        self.takeovers = 0  # token mode: spikes after the first decision (takeovers, or deferred tokens with defer)
        self._lock = threading.Lock()
        self._routes: dict[int, _Route] = {}
        say = progress or (lambda _m: None)
        say("super model engine")
        self.super = super_engine or _SuperEngine(super_model, tokenizer, max_batch_size, max_queue, context_length,
                                                  compile=compile, progress=progress,
                                                  park_slots=max(park_slots, 1 if self._window else 0))
        say("swift model engine")
        self.swift = _SwiftEngine(swift_model, tokenizer, max_batch_size, max_queue, context_length,
                                  compile=compile, progress=progress, on_token=self._decide, park_slots=park_slots,
                                  window=self._window)
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
        routes = [_Route(sink, len(ids)) for ids, _, sink in requests]
        with self._lock:  # _decide (engine thread) waits until the routes are registered
            handles = self.swift.submit_many([(ids, params, route.swift_event)
                                              for (ids, params, _), route in zip(requests, routes, strict=True)])
            for handle, route in zip(handles, routes, strict=True):
                route.swift_handle = handle
                route.forget = lambda key=handle.id: self._forget(key)
                self._routes[handle.id] = route
                if self._defer:
                    route.key = handle.id
                    route.release = lambda key=handle.id: self._unpark(key)
        return [RoutedHandle(r) for r in routes]

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Any:
        """Blocking helper (scripts, tests): the :meth:`Engine.generate` loop on this engine."""
        return _Engine.generate(self, prompt_ids, params, timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.swift.close()
        self.super.close()

    # -- the decision (swift engine thread) ---------------------------------------------------------
    def _decide(self, seq: Any, logits: torch.Tensor) -> bool:
        """Route one swift step (the logits for its next token); True when the sequence goes to the
        super engine. Request mode decides only at the first token, token mode at each."""
        config = self.router.config
        if seq.output_ids and config.mode != "token":
            return False
        with self._lock:
            route = self._routes.get(seq.id)
        if route is None:  # cannot happen while the sequence is live; never fail a step for it
            return False
        first = route.decision is None
        decision = self.router.decide(logits)
        if first:
            route.decision = decision
            with self._lock:
                self.counts[decision.model] += 1
        if not decision.deferred:
            return False
        with self._lock:
            self._routes.pop(seq.id, None)
            route.forget = None
            self.takeovers += not first
        defer = config.mode == "token" and config.on_spike in ("defer", "verify")
        if defer:
            seq.park_key = route.key  # the swift engine keeps its cache while the super model adds a token
        try:
            if self._window:  # the held swift tokens go with it, to be checked
                held = self.swift.take_held(seq)
                kept = len(seq.output_ids) - len(held)
                route.earlier += kept
                params = dataclasses.replace(seq.params, max_tokens=seq.params.max_tokens - kept)
                route.super_handle = self.super.submit_verify(
                    seq.prompt_ids + seq.output_ids[:kept], held, params, route.super_event, route.swift_event,
                    seq.detok, seq.generator, lambda visit, r=route: self._back_to_swift(r, visit), route.key)
            elif first and not defer:  # the whole request: as if it had been sent to the super model
                route.super_handle = self.super.submit(seq.prompt_ids, seq.params, route.super_event)
            else:
                route.earlier += len(seq.output_ids)
                params = dataclasses.replace(seq.params, max_tokens=seq.params.max_tokens - len(seq.output_ids))
                back = (lambda visit, r=route: self._back_to_swift(r, visit)) if defer else None
                extra = {"back": back, "park_key": route.key} if defer else {}
                route.super_handle = self.super.submit_takeover(seq.prompt_ids + seq.output_ids, params,
                                                                route.super_event, seq.detok, seq.generator, **extra)
        except (QueueFullError, EngineClosedError) as exc:
            route.super_event(RequestOutput("", [], [], True, "error", len(seq.prompt_ids), 0, str(exc),
                                            retryable=True))
            return True
        if route.cancelled:
            route.super_handle.cancel()
        return True

    def _back_to_swift(self, route: _Route, visit: Any) -> None:
        """``on_spike: defer``: the super engine made one token of ``visit``; the swift engine goes on
        from prompt + every token so far (super engine thread)."""
        route.earlier += len(visit.output_ids)
        params = dataclasses.replace(visit.params, max_tokens=visit.params.max_tokens - len(visit.output_ids))
        try:
            with self._lock:  # registered before _decide (swift engine thread) can look for it
                handle = self.swift.submit_takeover(visit.prompt_ids + visit.output_ids, params, route.swift_event,
                                                    visit.detok, visit.generator, park_key=route.key)
                route.swift_handle = handle
                route.forget = lambda key=handle.id: self._forget(key)
                self._routes[handle.id] = route
        except EngineClosedError as exc:
            route.swift_event(RequestOutput("", [], [], True, "error", route.prompt_tokens, 0, str(exc),
                                            retryable=True))
            return
        if route.cancelled:
            handle.cancel()

    def _forget(self, seq_id: int) -> None:
        with self._lock:
            self._routes.pop(seq_id, None)

    def _unpark(self, key: int) -> None:
        """The request ended: neither engine needs the cache it may have parked for it."""
        self.swift.unpark(key)
        self.super.unpark(key)


def build_routed_engine(swift: str, super_: str | None, config: RouterConfig, dtype: str, max_batch_size: int,
                        max_queue: int, max_model_len: int | None, compile: bool,
                        progress: Callable[[str], None] | None = None, super_url: str | None = None,
                        super_api_key: str | None = None, park_slots: int | None = None) -> RoutedEngine:
    """Load both models (same tokenizer: the swift one's), or the swift one and connect to the
    super model's OpenAI-compatible endpoint ``super_url``, and build the routed engine."""
    from llmcomp.loading import load_model

    swift_model, tokenizer = load_model(swift, dtype=dtype)
    if super_url is not None:
        from llmcomp.serve.remote_engine import RemoteEngine

        remote = RemoteEngine(super_url, super_api_key, max_batch_size=max_batch_size, max_queue=max_queue)
        return RoutedEngine(swift_model, None, tokenizer, config, max_batch_size, max_queue, max_model_len,
                            compile=compile, progress=progress, super_engine=remote)
    super_model, _ = load_model(super_, dtype=dtype)
    return RoutedEngine(swift_model, super_model, tokenizer, config, max_batch_size, max_queue, max_model_len,
                        compile=compile, progress=progress, park_slots=park_slots)


def build_routed_native(swift: str, super_: str | None, config: RouterConfig, options: Any,
                        super_url: str | None = None, park_slots: int | None = None) -> tuple[Any, Any]:
    """``(app, engine)`` for ``llmcomp serve --swift A --super B --router R``: both models in one
    supervised worker process (:mod:`llmcomp.serve.worker`), one OpenAI endpoint in front; with
    ``super_url`` the worker relays deferred requests to that endpoint instead of loading B."""
    from llmcomp.loading import load_tokenizer, resolve_source
    from llmcomp.serve.app import ServerConfig, create_app
    from llmcomp.serve.server import _log_to_stderr, default_threads
    from llmcomp.serve.worker import EngineWorker, WorkerSpec

    _log_to_stderr()
    swift_source = resolve_source(swift)
    super_location = None if super_url is not None else resolve_source(super_).location
    config = config.model_copy(update={"swift": config.swift or swift, "super": config.super or super_ or super_url})
    spec = WorkerSpec(swift_source.location, options.dtype, options.threads or default_threads(),
                      options.max_batch_size, options.max_queue, options.max_model_len, options.compile,
                      super_model=super_location, router=config.model_dump_json(), super_url=super_url,
                      park_slots=park_slots)
    engine = EngineWorker(spec, load_tokenizer(swift_source))
    app = create_app(engine, ServerConfig(model_name=options.served_model_name or "routed", api_key=options.api_key))
    return app, engine


def run_routed_native(swift: str, super_: str | None, config: RouterConfig, options: Any,
                      super_url: str | None = None, park_slots: int | None = None) -> None:
    """Serve until interrupted, then stop the worker (as :func:`llmcomp.serve.server.run_native`)."""
    import uvicorn

    app, engine = build_routed_native(swift, super_, config, options, super_url, park_slots)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)
    finally:
        engine.close()
