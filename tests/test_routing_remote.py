"""Routed serving with the super model behind an OpenAI-compatible endpoint (``--super-url``): the
upstream is a real native ``llmcomp serve`` app on 127.0.0.1 (another tiny model), not a mock.
References: the upstream's own answer to the same prompt, and HF greedy generation of the model
the router selects."""

from __future__ import annotations

import json
import queue
import time

import httpx
import pytest
import torch
from tiny_models import random_llama
from transformers import AutoTokenizer

from llmcomp.errors import LlmcompError
from llmcomp.loading import resolve_source
from llmcomp.routing import RouterConfig
from llmcomp.runtime.sampling import SamplingParams
from llmcomp.serve.app import ROUTED_HEADER, ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.engine import Engine
from llmcomp.serve.remote_engine import RemoteEngine
from llmcomp.serve.routed_engine import RoutedEngine

CONTEXT = 256
TOKENS = 6
PROMPTS = ["The film was", "Once upon a time in a small village"]


def _tiny(vocab: int, seed: int):
    return random_llama(seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=CONTEXT,
                        initializer_range=0.2)


@pytest.fixture(scope="module")
def servers():
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)
    swift, super_ = _tiny(len(tokenizer), 0), _tiny(len(tokenizer), 5)
    upstream_engine = Engine(super_, tokenizer, max_batch_size=2, max_queue=8, context_length=CONTEXT)
    upstream = BackgroundServer(create_app(upstream_engine, ServerConfig("super-up")))
    up_url = upstream.start()
    remote = RemoteEngine(up_url, max_batch_size=2, max_queue=8)
    engine = RoutedEngine(swift, None, tokenizer, RouterConfig(tau=-1e9), max_batch_size=2, max_queue=8,
                          context_length=CONTEXT, super_engine=remote)
    with BackgroundServer(create_app(engine, ServerConfig("routed"))) as url:
        yield url, up_url, engine, upstream_engine, tokenizer, swift, super_
    engine.close()
    upstream.stop()
    upstream_engine.close()


def greedy(model, tokenizer, prompt: str, n: int = TOKENS) -> str:
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
    return tokenizer.decode(out, skip_special_tokens=True)


def test_deferred_requests_are_answered_by_the_upstream(servers):
    url, up_url, engine, _, tokenizer, swift, super_ = servers
    assert engine.super.model == "super-up" and engine.super.context_length == CONTEXT  # from GET /v1/models
    for prompt in PROMPTS:
        request = {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
        direct = httpx.post(f"{up_url}/v1/completions", json={**request, "model": "super-up"}, timeout=60).json()
        r = httpx.post(f"{url}/v1/completions", json={**request, "model": "routed"}, timeout=60)
        body = r.json()
        assert r.status_code == 200 and r.headers[ROUTED_HEADER] == body["routed_to"] == "super"
        text = body["choices"][0]["text"]
        assert text == direct["choices"][0]["text"] == greedy(super_, tokenizer, prompt)
        assert body["usage"] == direct["usage"] and body["choices"][0]["deferred_tokens"] == TOKENS
        with httpx.stream("POST", f"{url}/v1/completions", json={**request, "model": "routed", "stream": True},
                          timeout=60) as s:
            assert s.headers[ROUTED_HEADER] == "super"
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == text
        assert {c["choices"][0]["routed_to"] for c in chunks} == {"super"}
    engine.update_router(tau=1e9)  # now everything stays on the local swift model
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "routed", "prompt": PROMPTS[0], "max_tokens": TOKENS,
                                                      "temperature": 0}, timeout=60)
        assert r.headers[ROUTED_HEADER] == "swift" and r.json()["choices"][0]["text"] == greedy(swift, tokenizer,
                                                                                               PROMPTS[0])
    finally:
        engine.update_router(tau=-1e9)


def test_cancel_reaches_the_upstream(servers):
    _, _, engine, upstream_engine, tokenizer, _, _ = servers
    events: queue.Queue = queue.Queue()
    handle = engine.submit(tokenizer(PROMPTS[1]).input_ids, SamplingParams(max_tokens=200, temperature=0.0,
                                                                            ignore_eos=True), events.put)
    first = events.get(timeout=60)
    assert first.routed_to == "super" and not first.finished
    handle.cancel()
    while not (ev := events.get(timeout=60)).finished:
        pass
    assert ev.finish_reason == "cancelled" and ev.completion_tokens < 200
    deadline = time.monotonic() + 10  # the upstream sees the closed stream and cancels its sequence
    while (upstream_engine.num_active or engine.super.num_active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream_engine.num_active == 0 and engine.super.num_active == 0


def test_remote_super_refuses_unreachable_urls_and_defer(servers):
    _, up_url, _, _, tokenizer, swift, _ = servers
    with pytest.raises(ValueError, match="defer"):
        RoutedEngine(swift, None, tokenizer, RouterConfig(tau=0.0, mode="token", on_spike="defer"),
                     super_engine=RemoteEngine(up_url))
    with pytest.raises(LlmcompError, match="cannot reach"):
        RemoteEngine("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(LlmcompError, match="not an http"):
        RemoteEngine("ftp://example")


@pytest.mark.parametrize(("mode", "extra", "message"), [
    ("request", ["--super", "smollm2-135m"], "not both"),
    ("token", ["--engine", "vllm"], "native engine"),
    ("defer", [], "on_spike 'defer' needs --super"),
    ("verify", [], "on_spike 'verify' needs --super"),
    ("token", ["--park-slots", "2"], "--park-slots applies to routers with mode"),
])
def test_serve_super_url_bad_combinations_are_one_line(tmp_path, mode, extra, message):
    from typer.testing import CliRunner

    from llmcomp.cli.main import app
    from llmcomp.routing import save_router

    on_spike = mode if mode in ("defer", "verify") else "takeover"
    save_router(RouterConfig(tau=0.0, mode="request" if mode == "request" else "token", on_spike=on_spike,
                             swift="smollm2-135m"), tmp_path / "router.json")
    result = CliRunner().invoke(app, ["serve", "--router", str(tmp_path / "router.json"), "--super-url",
                                      "http://127.0.0.1:9", *extra])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


# -- token mode and logprobs with a remote super model ------------------------------------------------
STEPS = 10


def energies_of(model, ids: list[int], steps: int = STEPS) -> list[float]:
    """The swift energy before each token of swift-only greedy generation (HF forward, float64 sum)."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
            out.append(float(-torch.logsumexp(last, 0)))
            seq.append(int(last.argmax()))
    return out


def takeover_tau(energies: list[float]) -> tuple[float, int]:
    """A tau that the energy first crosses at a step >= 2 (with a margin): the swift model makes
    that many tokens, the super model the rest."""
    for at in range(2, len(energies)):
        below = max(energies[:at])
        if energies[at] - below > 1e-3:
            return (below + energies[at]) / 2, at
    raise AssertionError("no energy record after step 2")


def hf_takeover(swift, super_, ids: list[int], at: int, steps: int = STEPS) -> list[int]:
    """Reference: ``at`` swift greedy tokens, then super greedy from prompt + those tokens."""
    seq = list(ids)
    with torch.no_grad():
        for k in range(steps):
            model = swift if k < at else super_
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def token_mode(servers):
    """The same swift model routed in token mode twice: super remote (the upstream) and super local."""
    _, up_url, _, _, tokenizer, swift, super_ = servers
    ids = tokenizer(PROMPTS[1]).input_ids
    tau, at = takeover_tau(energies_of(swift, ids))
    config = RouterConfig(tau=tau, mode="token")
    remote = RoutedEngine(swift, None, tokenizer, config, max_batch_size=2, max_queue=8, context_length=CONTEXT,
                          super_engine=RemoteEngine(up_url, max_batch_size=2, max_queue=8))
    local = RoutedEngine(swift, super_, tokenizer, config, max_batch_size=2, max_queue=8, context_length=CONTEXT)
    with BackgroundServer(create_app(remote, ServerConfig("routed"))) as r_url, \
            BackgroundServer(create_app(local, ServerConfig("routed"))) as l_url:
        yield r_url, l_url, remote, ids, at
    remote.close()
    local.close()


def test_token_mode_remote_takeover_equals_local_and_reference(servers, token_mode):
    _, _, _, _, tokenizer, swift, super_ = servers
    r_url, l_url, remote, ids, at = token_mode
    tokens = hf_takeover(swift, super_, ids, at)
    events: queue.Queue = queue.Queue()
    remote.submit(ids, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True), events.put)
    evs = [events.get(timeout=60)]
    while not evs[-1].finished:
        evs.append(events.get(timeout=60))
    assert [t for ev in evs for t in ev.token_ids] == tokens  # the upstream's token ids are relayed
    assert [ev.routed_to for ev in evs for _ in ev.token_ids] == ["swift"] * at + ["super"] * (STEPS - at)
    assert evs[-1].completion_tokens == STEPS and all(ev.prompt_tokens == len(ids) for ev in evs)
    request = {"model": "routed", "prompt": PROMPTS[1], "max_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    answers = [httpx.post(f"{u}/v1/completions", json=request, timeout=60) for u in (r_url, l_url)]
    got, want = (a.json() for a in answers)
    assert answers[0].headers[ROUTED_HEADER] == got["routed_to"] == want["routed_to"] == "mixed"
    assert got["choices"][0]["text"] == want["choices"][0]["text"] == tokenizer.decode(tokens)
    assert got["deferred_tokens"] == want["deferred_tokens"] == STEPS - at
    assert got["usage"] == want["usage"]
    with httpx.stream("POST", f"{r_url}/v1/completions", json={**request, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    routes = [c["choices"][0]["routed_to"] for c in chunks]
    switch = routes.index("super")
    assert set(routes[:switch]) == {"swift"} and set(routes[switch:]) == {"super"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == got["choices"][0]["text"]


def test_token_mode_remote_stop_string_across_the_switch(servers, token_mode):
    """A stop string that starts in the swift text and ends in the super text stops both ways alike
    (the upstream's token ids go through the swift detokenizer, which holds back the prefix)."""
    _, _, _, _, tokenizer, swift, super_ = servers
    r_url, l_url, _, ids, at = token_mode
    tokens = hf_takeover(swift, super_, ids, at)
    swift_text, full = tokenizer.decode(tokens[:at]), tokenizer.decode(tokens)
    assert len(swift_text) >= 2 and len(full) >= len(swift_text) + 3
    stop = full[len(swift_text) - 2:len(swift_text) + 2]
    assert stop not in swift_text and stop not in full[len(swift_text):]  # only across the boundary
    request = {"model": "routed", "prompt": PROMPTS[1], "max_tokens": STEPS, "temperature": 0, "stop": [stop]}
    got, want = (httpx.post(f"{u}/v1/completions", json=request, timeout=60).json() for u in (r_url, l_url))
    assert got["choices"][0]["text"] == want["choices"][0]["text"] == full[:full.index(stop)]
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"] == "stop"
    assert got["usage"] == want["usage"] and got["routed_to"] == "mixed"


def test_logprobs_pass_through_from_the_upstream(servers, token_mode):
    url, up_url, _, _, tokenizer, _, _ = servers
    r_url, l_url, _, _, _ = token_mode
    request = {"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "logprobs": 3}
    direct = httpx.post(f"{up_url}/v1/completions", json={**request, "model": "super-up"}, timeout=60).json()
    routed = httpx.post(f"{url}/v1/completions", json={**request, "model": "routed"}, timeout=60).json()
    assert routed["routed_to"] == "super" and routed["choices"][0]["logprobs"] == direct["choices"][0]["logprobs"]
    assert len(routed["choices"][0]["logprobs"]["tokens"]) == TOKENS
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    # token mode: swift logprobs, then the upstream's, equal to the local takeover's
    request = {"model": "routed", "prompt": PROMPTS[1], "max_tokens": STEPS, "temperature": 0, "ignore_eos": True,
               "logprobs": 2}
    got, want = (httpx.post(f"{u}/v1/completions", json=request, timeout=60).json()["choices"][0]["logprobs"]
                 for u in (r_url, l_url))
    assert got["tokens"] == want["tokens"] and len(got["tokens"]) == STEPS
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
    for g, w in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
        assert list(g) == list(w) and list(g.values()) == pytest.approx(list(w.values()), abs=1e-5)


def test_native_server_returns_token_ids(servers):
    """The vLLM extensions the relay asks for: ``return_token_ids`` and ``token_id:N`` logprob tokens."""
    _, up_url, _, _, tokenizer, _, super_ = servers
    ids = tokenizer(PROMPTS[0]).input_ids
    with torch.no_grad():
        want = super_.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    request = {"model": "super-up", "prompt": ids, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True}
    body = httpx.post(f"{up_url}/v1/completions", json=request, timeout=60).json()["choices"][0]
    assert body["token_ids"] == want and body["logprobs"]["tokens"] == [f"token_id:{t}" for t in want]
    assert [int(next(iter(top))[9:]) for top in body["logprobs"]["top_logprobs"]] == want  # greedy: top-1
    with httpx.stream("POST", f"{up_url}/v1/completions", json={**request, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want


class _TextOnlyRemote(RemoteEngine):
    """An upstream that answers with text only (no ``return_token_ids``, logprob tokens as text)."""

    def _body(self, prompt_ids: list[int], params: SamplingParams) -> dict:
        body = super()._body(prompt_ids, params)
        body.pop("return_token_ids")
        body.pop("return_tokens_as_token_ids", None)
        return body


def test_text_only_upstream_is_relayed_as_text(servers, token_mode):
    """The fallback: without token ids, text and usage still match (no stop string across the
    switch here), and logprobs fail with one line instead of guessed ids."""
    _, up_url, _, _, tokenizer, swift, super_ = servers
    _, l_url, local_engine, ids, at = token_mode
    engine = RoutedEngine(swift, None, tokenizer, local_engine.router.config, max_batch_size=2, max_queue=8,
                          context_length=CONTEXT, super_engine=_TextOnlyRemote(up_url, max_batch_size=2, max_queue=8))
    request = {"model": "routed", "prompt": PROMPTS[1], "max_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    try:
        with BackgroundServer(create_app(engine, ServerConfig("routed"))) as url:
            got = httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()
            want = httpx.post(f"{l_url}/v1/completions", json=request, timeout=60).json()
            assert got["choices"][0]["text"] == want["choices"][0]["text"] == tokenizer.decode(
                hf_takeover(swift, super_, ids, at))
            assert got["usage"] == want["usage"] and got["deferred_tokens"] == STEPS - at
            r = httpx.post(f"{url}/v1/completions", json={**request, "logprobs": 1}, timeout=60)
            assert r.status_code == 500 and "by its text" in r.json()["error"]["message"]
    finally:
        engine.close()
