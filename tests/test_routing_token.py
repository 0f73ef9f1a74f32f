"""Token-level routing: takeover and window verification in the runtime library, and the server's
``mode: token`` (the super model takes over mid-generation), each checked against a naive
reference that runs a full float64 HF forward of the whole sequence at every step."""

from __future__ import annotations

import json
import math
import queue
import time

import httpx
import pytest
import torch
from tiny_models import BYTE_VOCAB, byte_tokenizer, tiny_llama

from llmcomp.route_generate import generate_with_deferral, generate_with_takeover, generate_with_verification
from llmcomp.routing import Router, RouterConfig
from llmcomp.runtime import ModelRunner
from llmcomp.runtime.sampling import SamplingParams
from llmcomp.serve.app import ROUTED_HEADER, ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.routed_engine import RoutedEngine

STEPS = 12
EOS = BYTE_VOCAB  # tiny_llama's eos id
MODEL = "routed"
PROMPTS = ["The film was quite", "Once upon a", "Answer: it", "1 2 3", "Hello there, how", "Q"]


@pytest.fixture(scope="module")
def pair():
    return tiny_llama(seed=0, init_std=0.3).double(), tiny_llama(seed=7, init_std=0.3).double(), byte_tokenizer()


def naive_energy(values: list[float]) -> float:
    top = max(values)
    return -(top + math.log(sum(math.exp(v - top) for v in values)))


def full_forward(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def reference_takeover(swift, super_, prompt: list[int], tau: float, steps: int = STEPS) -> tuple[list[int], int]:
    """Tokens, and how many of them the swift model produced before the first spike."""
    seq, on_super, swift_tokens = list(prompt), False, 0
    while len(seq) - len(prompt) < steps:
        if not on_super and naive_energy(full_forward(swift, seq)[-1].tolist()) > tau:
            on_super = True
        seq.append(int(full_forward(super_ if on_super else swift, seq)[-1].argmax()))
        swift_tokens += not on_super
        if seq[-1] == EOS:
            break
    return seq[len(prompt):], swift_tokens


def reference_verification(swift, super_, prompt: list[int], tau: float, window: int) -> tuple[list[int], list[bool]]:
    seq, by_super, approved = list(prompt), [], len(prompt)
    while len(seq) - len(prompt) < STEPS:
        n = len(seq)
        if naive_energy(full_forward(swift, seq)[-1].tolist()) > tau:
            preds = full_forward(super_, seq).argmax(-1).tolist()  # preds[j - 1]: the token for position j
            cut = next((j for j in range(max(n - window, approved), n) if preds[j - 1] != seq[j]), n)
            seq, by_super = seq[:cut] + [preds[cut - 1]], by_super[:cut - len(prompt)] + [True]
            approved = len(seq)
        else:
            seq.append(int(full_forward(swift, seq)[-1].argmax()))
            by_super.append(False)
        if seq[-1] == EOS:
            break
    return seq[len(prompt):], by_super


def swift_energies(swift, prompt: list[int]) -> list[float]:
    """The swift energy at each step of swift-only greedy generation."""
    seq, out = list(prompt), []
    for _ in range(STEPS):
        last = full_forward(swift, seq)[-1]
        out.append(naive_energy(last.tolist()))
        seq.append(int(last.argmax()))
    return out


def mid_tau(energies: list[float], at: int) -> float:
    """A tau below ``energies[at]`` and above every earlier one (a takeover at step ``at``)."""
    below = max(energies[:at])
    assert energies[at] > below
    return (below + energies[at]) / 2


def first_record(energies: list[float], start: int = 2) -> int:
    return next(i for i in range(start, len(energies)) if energies[i] > max(energies[:i]))


def runners(pair, n: int = 1):
    swift, super_, _ = pair
    return [ModelRunner(m, max_batch_size=n, max_model_len=64) for m in (swift, super_)]


# -- library ---------------------------------------------------------------------------------------
def test_takeover_matches_full_forward_reference(pair):
    swift, super_, tok = pair
    prompt = tok.encode(PROMPTS[0])
    energies = swift_energies(swift, prompt)
    at = first_record(energies)
    tau = mid_tau(energies, at)
    tokens, swift_tokens = reference_takeover(swift, super_, prompt, tau)
    assert swift_tokens == at
    got = generate_with_takeover(*runners(pair), prompt, Router(RouterConfig(tau=tau)), STEPS, eos={EOS})
    assert got.tokens == tokens
    assert got.by_super == [False] * at + [True] * (len(tokens) - at)
    assert got.super_prefill_tokens == len(prompt) + at  # one catch-up of prompt + swift tokens
    assert got.super_forwards == len(tokens) - at  # the catch-up, then one decode per further token
    # first_only: the decision after prefill only (per request): all swift at this tau
    once = generate_with_takeover(*runners(pair), prompt, Router(RouterConfig(tau=tau)), STEPS, first_only=True)
    assert not any(once.by_super) and once.energies == pytest.approx(energies[:1], abs=1e-9)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_window_verification_matches_full_forward_reference(pair, window):
    swift, super_, tok = pair
    prompt = tok.encode(PROMPTS[1])
    energies = sorted(swift_energies(swift, prompt))
    tau = (energies[7] + energies[8]) / 2  # spikes at a few of the swift-only steps
    tokens, by_super = reference_verification(swift, super_, prompt, tau, window)
    assert any(by_super) and not all(by_super)
    got = generate_with_verification(*runners(pair), prompt, Router(RouterConfig(tau=tau)), STEPS, window, eos={EOS})
    assert got.tokens == tokens and got.by_super == by_super
    assert got.rejected > 0  # the rollback of both caches was exercised
    assert got.super_forwards == len(got.energies) - sum(e <= tau for e in got.energies)


def test_window_zero_is_per_token_deferral_and_rejections_roll_back(pair):
    swift, super_, tok = pair
    prompt = tok.encode(PROMPTS[2])
    energies = sorted(swift_energies(swift, prompt))
    router = Router(RouterConfig(tau=(energies[5] + energies[6]) / 2))
    plain = generate_with_deferral(*runners(pair), prompt, router, STEPS, eos={EOS})
    zero = generate_with_verification(*runners(pair), prompt, router, STEPS, 0, eos={EOS})
    assert zero.tokens == plain.tokens and zero.by_super == plain.by_super and zero.rejected == 0
    # a window over everything with tau below all energies: the super model checks every token, so
    # the result is super-only greedy, whatever the swift model proposed
    everything = Router(RouterConfig(tau=-1e9))
    got = generate_with_verification(*runners(pair), prompt, everything, STEPS, STEPS, eos={EOS})
    assert got.tokens == reference_takeover(swift, super_, prompt, -1e9)[0]
    with pytest.raises(ValueError, match="window"):
        generate_with_verification(*runners(pair), prompt, everything, STEPS, -1)


# -- server: mode token -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(pair):
    swift, super_, tok = pair
    prompts = [tok.encode(p) for p in PROMPTS]
    energies = [swift_energies(swift, p) for p in prompts]
    tau = mid_tau(energies[0], first_record(energies[0]))
    refs = [reference_takeover(swift, super_, p, tau) for p in prompts]
    engine = RoutedEngine(swift, super_, tok, RouterConfig(tau=tau, mode="token"), max_batch_size=4, max_queue=16,
                          context_length=64)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as url:
        yield url, engine, tok, prompts, refs, tau
    engine.close()


def collect(engine, prompt: list[int], max_tokens: int = STEPS) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), events.put)
    return events


def drain(events: queue.Queue) -> list:
    out = []
    while not out or not out[-1].finished:
        out.append(events.get(timeout=60))
    return out


def test_server_takeover_equals_reference_in_a_batch(served):
    _, engine, _, prompts, refs, _ = served
    assert any(0 < s < len(t) for t, s in refs), "the tau should give at least one mixed answer"
    queues = [collect(engine, p) for p in prompts]  # all at once: takeovers while others decode
    for prompt, events, (tokens, swift_tokens) in zip(prompts, queues, refs, strict=True):
        evs = drain(events)
        assert [t for ev in evs for t in ev.token_ids] == tokens
        models = [ev.routed_to for ev in evs for _ in ev.token_ids]
        assert models == ["swift"] * swift_tokens + ["super"] * (len(tokens) - swift_tokens)
        assert [ev.completion_tokens for ev in evs if ev.token_ids] == list(range(1, len(tokens) + 1))
        assert all(ev.prompt_tokens == len(prompt) for ev in evs)
    settle(engine)


def settle(engine) -> None:
    """Both engines empty (a slot is released just after its last event) and no route left."""
    deadline = time.monotonic() + 10
    while engine.num_active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_active == engine.num_waiting == 0 and not engine._routes


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_server_response_stream_and_metrics_name_the_models(served):
    url, _, tok, prompts, refs, _ = served
    i = next(k for k, (t, s) in enumerate(refs) if 0 < s < len(t))
    tokens, swift_tokens = refs[i]
    before = httpx.get(f"{url}/metrics").text
    request = {"model": MODEL, "prompt": prompts[i], "max_tokens": STEPS, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=request, timeout=60)
    body = r.json()
    assert r.status_code == 200 and r.headers[ROUTED_HEADER] == body["routed_to"] == "mixed"
    choice = body["choices"][0]
    assert choice["routed_to"] == "mixed" and choice["deferred_tokens"] == body["deferred_tokens"]
    assert choice["deferred_tokens"] == len(tokens) - swift_tokens and body["usage"]["completion_tokens"] == len(tokens)
    after = httpx.get(f"{url}/metrics").text
    assert metric(after, 'llmcomp_routed_requests_total{model="mixed"}') - \
        metric(before, 'llmcomp_routed_requests_total{model="mixed"}') == 1
    assert metric(after, "llmcomp_router_deferred_tokens_total") - \
        metric(before, "llmcomp_router_deferred_tokens_total") == len(tokens) - swift_tokens
    assert metric(after, "llmcomp_router_deferrals_total") - metric(before, "llmcomp_router_deferrals_total") == 1
    with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True}, timeout=60) as s:
        assert s.headers[ROUTED_HEADER] == "swift"  # the model of the first token
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    routes = [c["choices"][0]["routed_to"] for c in chunks]
    switch = routes.index("super")
    assert set(routes[:switch]) == {"swift"} and set(routes[switch:]) == {"super"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


def cancel_while_on_super(engine, prompt: list[int]) -> None:
    """Cancel a request as soon as the super model answers it: it ends cancelled, both engines free."""
    events: queue.Queue = queue.Queue()
    handle = engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), events.put)
    while (ev := events.get(timeout=60)).routed_to != "super":
        assert not ev.finished
    handle.cancel()
    while not ev.finished:
        ev = events.get(timeout=60)
    assert ev.finish_reason == "cancelled" and ev.completion_tokens < 40
    settle(engine)


def test_server_cancel_after_takeover_frees_both_engines(served):
    _, engine, tok, prompts, refs, tau = served
    i = next(k for k, (t, s) in enumerate(refs) if 0 < s < len(t))
    engine.update_router(tau=tau)
    cancel_while_on_super(engine, prompts[i])


# -- server: mode token, on_spike defer ------------------------------------------------------------
def reference_deferral(swift, super_, prompt: list[int], tau: float) -> tuple[list[int], list[bool]]:
    """Per-token deferral: above tau the super model makes that token, then the swift model goes on."""
    seq, by_super = list(prompt), []
    while len(seq) - len(prompt) < STEPS:
        spike = naive_energy(full_forward(swift, seq)[-1].tolist()) > tau
        seq.append(int(full_forward(super_ if spike else swift, seq)[-1].argmax()))
        by_super.append(spike)
        if seq[-1] == EOS:
            break
    return seq[len(prompt):], by_super


@pytest.fixture(scope="module")
def deferring(pair):
    swift, super_, tok = pair
    prompts = [tok.encode(p) for p in PROMPTS]
    energies = sorted(swift_energies(swift, prompts[1]))
    tau = (energies[7] + energies[8]) / 2  # spikes at a few steps
    refs = [reference_deferral(swift, super_, p, tau) for p in prompts]
    engine = RoutedEngine(swift, super_, tok, RouterConfig(tau=tau, mode="token", on_spike="defer"),
                          max_batch_size=4, max_queue=16, context_length=64)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as url:
        yield url, engine, prompts, refs, tau
    engine.close()


def wait_unparked(engine) -> None:
    """Every parked cache released (on the engine threads, soon after the requests end), nothing held."""
    deadline = time.monotonic() + 10
    while (engine.swift.num_parked or engine.super.num_parked) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.swift.num_parked == engine.super.num_parked == 0 and not engine.swift._held


def batch_equals_references(engine, prompts: list[list[int]], refs: list[tuple[list[int], list[bool]]]) -> None:
    """Submit every prompt at once; each answer's token ids, the model of each token and the
    running counts equal its reference (tokens, whether the super model made each)."""
    queues = [collect(engine, p) for p in prompts]
    for prompt, events, (tokens, by_super) in zip(prompts, queues, refs, strict=True):
        evs = drain(events)
        assert [t for ev in evs for t in ev.token_ids] == tokens
        assert [ev.routed_to == "super" for ev in evs for _ in ev.token_ids] == by_super
        assert [ev.completion_tokens for ev in evs if ev.token_ids] == list(range(1, len(tokens) + 1))
        assert all(ev.prompt_tokens == len(prompt) for ev in evs)


def test_server_per_token_deferral_equals_reference_in_a_batch(pair, deferring):
    swift, super_, _ = pair
    _, engine, prompts, refs, tau = deferring
    # interleaved answers: some super token is followed by a swift token
    assert any(s and not n for _, b in refs for s, n in zip(b, b[1:], strict=False))
    batch_equals_references(engine, prompts, refs)  # all at once: visits while others decode
    # the library's per-token deferral (both KV caches kept) agrees with the server's legs
    lib = generate_with_deferral(*runners(pair), prompts[1], Router(RouterConfig(tau=tau)), STEPS, eos={EOS})
    assert (lib.tokens, lib.by_super) == refs[1]
    settle(engine)


def test_server_per_token_deferral_response_and_cancel(deferring):
    url, engine, prompts, refs, tau = deferring
    i = next(k for k, (_, b) in enumerate(refs) if any(s and not n for s, n in zip(b, b[1:], strict=False)))
    tokens, by_super = refs[i]
    request = {"model": MODEL, "prompt": prompts[i], "max_tokens": STEPS, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=request, timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["routed_to"] == r.headers[ROUTED_HEADER] == "mixed"
    assert body["deferred_tokens"] == sum(by_super) and body["usage"]["completion_tokens"] == len(tokens)
    with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    routes = [c["choices"][0]["routed_to"] for c in chunks]
    assert "super" in routes and routes[routes.index("super"):].count("swift") > 0  # back to swift after super
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    cancel_while_on_super(engine, prompts[i])


@pytest.mark.parametrize("park", [True, False], ids=["parked", "re-prefilled"])
def test_server_deferral_prefills_only_what_each_engine_has_not_seen(pair, deferring, park):
    """With parked caches a returning sequence prefills only the tokens the other engine added;
    without them (park_slots=0) every leg prefills the whole sequence. Counted exactly, one
    request at a time, with the answers still equal to the reference."""
    swift, super_, tok = pair
    _, shared, prompts, refs, tau = deferring
    engine = shared if park else RoutedEngine(swift, super_, tok, RouterConfig(tau=tau, mode="token", on_spike="defer"),
                                              max_batch_size=4, max_queue=16, context_length=64, park_slots=0)
    assert any(sum(b) >= 2 for _, b in refs), "some answer should visit the super model twice"
    try:
        settle(engine)
        for prompt, (tokens, by_super) in zip(prompts, refs, strict=True):
            before = (engine.swift.prefilled_tokens, engine.super.prefilled_tokens)
            assert [t for ev in drain(collect(engine, prompt)) for t in ev.token_ids] == tokens
            p = len(prompt)
            visits = [j for j, s in enumerate(by_super) if s]  # super tokens, by position in the answer
            returns = [j for j in visits if j < len(tokens) - 1]  # after these the swift model goes on
            if park:
                want = (p + len(returns), p + visits[-1] if visits else 0)
            else:
                want = (p + sum(p + j + 1 for j in returns), sum(p + j for j in visits))
            assert (engine.swift.prefilled_tokens - before[0], engine.super.prefilled_tokens - before[1]) == want
        wait_unparked(engine)
        assert (engine.swift.parked_prefill_saved > 0) == park
    finally:
        if not park:
            engine.close()


# -- server: mode token, on_spike verify ---------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3])
def test_server_window_verification_equals_reference_in_a_batch(pair, window):
    """Six prompts decoded together: token ids and the model of each token equal the naive
    verification reference (float64 full forwards); swift tokens are sent only once checked or out
    of the window, so the stream never takes a token back."""
    swift, super_, tok = pair
    prompts = [tok.encode(p) for p in PROMPTS]
    energies = sorted(swift_energies(swift, prompts[1]))
    tau = (energies[7] + energies[8]) / 2
    refs = [reference_verification(swift, super_, p, tau, window) for p in prompts]
    deferral = [reference_deferral(swift, super_, p, tau) for p in prompts]
    assert refs != deferral, "some swift token should be rejected (else verification is per-token deferral)"
    config = RouterConfig(tau=tau, mode="token", on_spike="verify", window=window)
    engine = RoutedEngine(swift, super_, tok, config, max_batch_size=4, max_queue=16, context_length=64)
    try:
        batch_equals_references(engine, prompts, refs)  # all at once: checks while others decode
        settle(engine)
        wait_unparked(engine)
        assert engine.super.parked_prefill_saved > 0 and engine.swift.parked_prefill_saved > 0
        # over HTTP: the stream's text equals the answer's, and names each token's model
        i = next(k for k, (r, d) in enumerate(zip(refs, deferral, strict=True)) if r != d)
        with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as url:
            request = {"model": MODEL, "prompt": prompts[i], "max_tokens": STEPS, "temperature": 0}
            body = httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()
            with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True}, timeout=60) as s:
                chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert body["choices"][0]["text"] == tok.decode(refs[i][0]) == "".join(c["choices"][0]["text"] for c in chunks)
        assert body["deferred_tokens"] == sum(refs[i][1])
        cancel_while_on_super(engine, prompts[i])
        wait_unparked(engine)
    finally:
        engine.close()
