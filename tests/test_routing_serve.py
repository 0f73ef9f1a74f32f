"""Routed serving: one endpoint in front of a swift and a super engine (two tiny models), the
answering model in the response and a header, /metrics counters, tau changed at run time.

References: each request's swift energy from a full HF forward of its prompt (float64, the naive
formula), and the answer from HF greedy generation with the model that energy selects.
"""

from __future__ import annotations

import math
import time

import httpx
import pytest
import torch
from tiny_models import random_llama
from transformers import AutoTokenizer

from llmcomp.loading import resolve_source
from llmcomp.routing import RouterConfig
from llmcomp.runtime.sampling import SamplingParams
from llmcomp.serve.app import ROUTED_HEADER, ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.metrics import ENERGY_BUCKETS
from llmcomp.serve.routed_engine import RoutedEngine

MODEL = "routed"
CONTEXT = 256
MAX_TOKENS = 5
PROMPTS = ["The film was", "Once upon a time in a small village", "Answer:", "1 2 3 4", "Hello there, how",
           "The capital of France is"]


def _tiny(vocab: int, seed: int):
    return random_llama(seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=CONTEXT,
                        initializer_range=0.2)


def naive_energy(values: list[float], temperature: float = 1.0) -> float:
    top = max(v / temperature for v in values)
    return -temperature * (top + math.log(sum(math.exp(v / temperature - top) for v in values)))


@pytest.fixture(scope="module")
def setup():
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)
    swift, super_ = _tiny(len(tokenizer), 0), _tiny(len(tokenizer), 5)
    energies = []
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = swift.double()(input_ids=torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1]
        energies.append(naive_energy(logits.tolist()))
    swift.float()
    ordered = sorted(energies)
    tau = (ordered[2] + ordered[3]) / 2  # three prompts above: super
    engine = RoutedEngine(swift, super_, tokenizer, RouterConfig(tau=tau, swift="tiny-a", super="tiny-b"),
                          max_batch_size=4, max_queue=16)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as url:
        yield url, engine, tokenizer, swift, super_, energies, tau
    engine.close()


def greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
    return tokenizer.decode(out, skip_special_tokens=True)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_each_request_answered_by_the_model_its_energy_selects(setup):
    url, engine, tokenizer, swift, super_, energies, tau = setup
    before = httpx.get(f"{url}/metrics").text
    for prompt, value in zip(PROMPTS, energies, strict=True):
        expected = "super" if value > tau else "swift"
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers[ROUTED_HEADER] == body["routed_to"] == body["choices"][0]["routed_to"] == expected
        assert body["choices"][0]["text"] == greedy(super_ if expected == "super" else swift, tokenizer, prompt)
    after = httpx.get(f"{url}/metrics").text
    deferred = sum(v > tau for v in energies)
    assert metric(after, 'llmcomp_routed_requests_total{model="super"}') - \
        metric(before, 'llmcomp_routed_requests_total{model="super"}') == deferred
    assert metric(after, 'llmcomp_routed_requests_total{model="swift"}') - \
        metric(before, 'llmcomp_routed_requests_total{model="swift"}') == len(PROMPTS) - deferred
    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert delta("llmcomp_router_deferrals_total") == deferred
    assert delta("llmcomp_router_energy_count") == len(PROMPTS)

    for edge in ENERGY_BUCKETS:  # (no _sum: prometheus drops it for histograms with negative buckets)
        assert delta(f'llmcomp_router_energy_bucket{{le="{edge}"}}') == sum(v <= edge for v in energies)


def test_events_carry_the_energy(setup):
    _, engine, tokenizer, _, _, energies, tau = setup
    import queue

    events: queue.Queue = queue.Queue()
    engine.submit(tokenizer(PROMPTS[0]).input_ids, SamplingParams(max_tokens=2, temperature=0.0), events.put)
    ev = events.get(timeout=60)
    assert ev.energy == pytest.approx(energies[0], abs=1e-3)
    assert ev.routed_to == ("super" if energies[0] > tau else "swift")


def test_tau_changes_at_run_time_and_streams_name_the_model(setup):
    url, engine, _, _, _, energies, tau = setup
    state = httpx.get(f"{url}/v1/router").json()
    assert state["tau"] == pytest.approx(tau) and state["swift"] == "tiny-a" and state["mode"] == "request"
    r = httpx.post(f"{url}/v1/router", json={"tau": min(energies) - 1.0})
    assert r.status_code == 200 and r.json()["tau"] == pytest.approx(min(energies) - 1.0)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0],
                                                                  "max_tokens": 3, "stream": True}, timeout=60) as s:
            assert s.headers[ROUTED_HEADER] == "super"
            chunks = [line for line in s.iter_lines() if line.startswith("data: {")]
        assert chunks and all('"routed_to": "super"' in c for c in chunks)
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 2,
                                                      "n": 2}, timeout=60)
        assert r.json()["routed_to"] == "super" and all(c["routed_to"] == "super" for c in r.json()["choices"])
        assert httpx.post(f"{url}/v1/router", json={"tau": "high"}).status_code == 400
        assert httpx.post(f"{url}/v1/router", json={"temperature": 0}).status_code == 400
        r = httpx.post(f"{url}/v1/router", json={"tau": max(energies) + 1.0})
        assert r.status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 2},
                       timeout=60)
        assert r.headers[ROUTED_HEADER] == "swift"
    finally:
        httpx.post(f"{url}/v1/router", json={"tau": tau})


def test_unrouted_server_has_no_router(tmp_path):
    from llmcomp.serve.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)
    engine = Engine(_tiny(len(tokenizer), 1), tokenizer, max_batch_size=1, max_queue=1)
    try:
        with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as url:
            assert httpx.get(f"{url}/v1/router").status_code == 404
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
            assert "routed_to" not in r.json() and ROUTED_HEADER not in r.headers
    finally:
        engine.close()


@pytest.mark.slow
def test_llmcomp_serve_router_worker_process(tmp_path):
    """`llmcomp serve --swift A --super B --router R`: both models in the supervised worker process;
    tau changed through the API reaches the worker (and survives in its spec for restarts)."""
    from tiny_models import make_tiny_llama

    from llmcomp.routing import save_router
    from llmcomp.serve.routed_engine import build_routed_native
    from llmcomp.serve.server import NativeOptions

    tok_dir = resolve_source("smollm2-135m").location
    swift = make_tiny_llama(tmp_path / "swift", tok_dir, seed=0)
    super_ = make_tiny_llama(tmp_path / "super", tok_dir, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "swift")
    save_router(RouterConfig(tau=1e6), tmp_path / "router.json")  # everything on swift at first
    from llmcomp.routing import load_router

    options = NativeOptions(max_batch_size=2, max_queue=4, threads=1, compile=False, served_model_name=MODEL)
    app, engine = build_routed_native(str(tmp_path / "swift"), str(tmp_path / "super"),
                                      load_router(tmp_path / "router.json"), options)
    try:
        with BackgroundServer(app) as url:
            request = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json=request, timeout=60)
            assert r.headers[ROUTED_HEADER] == "swift" and r.json()["choices"][0]["text"] == greedy_n(
                swift, tokenizer, PROMPTS[0], 3)
            assert httpx.post(f"{url}/v1/router", json={"tau": -1e6}).json()["tau"] == -1e6
            r = httpx.post(f"{url}/v1/completions", json=request, timeout=60)
            assert r.headers[ROUTED_HEADER] == "super" and r.json()["choices"][0]["text"] == greedy_n(
                super_, tokenizer, PROMPTS[0], 3)
            assert RouterConfig.model_validate_json(engine.spec.router).tau == -1e6
            assert 'llmcomp_routed_requests_total{model="super"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        engine.close()


def greedy_n(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("tau_side", ["super", "swift"])
def test_cancel_frees_both_engines_and_forgets_the_route(setup, tau_side):
    import queue

    _, engine, tokenizer, _, _, energies, tau = setup
    engine.update_router(tau=min(energies) - 1.0 if tau_side == "super" else max(energies) + 1.0)
    try:
        for cancel_at_once in (True, False):
            events: queue.Queue = queue.Queue()
            handle = engine.submit(tokenizer(PROMPTS[1]).input_ids, SamplingParams(max_tokens=200, temperature=0.0),
                                   events.put)
            if not cancel_at_once:
                first = events.get(timeout=60)  # the decision has been made
                assert first.routed_to == tau_side
            handle.cancel()
            while not (ev := events.get(timeout=60)).finished:
                pass
            assert ev.finish_reason in ("cancelled", "stop") and ev.completion_tokens < 200
        deadline = time.monotonic() + 10
        while (engine.swift.num_active or engine.super.num_active) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_active == engine.num_waiting == 0
        assert not engine._routes  # no route left behind
    finally:
        engine.update_router(tau=tau)
