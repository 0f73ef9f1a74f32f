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


def test_remote_super_refuses_token_mode_and_unreachable_urls(servers):
    _, up_url, _, _, tokenizer, swift, _ = servers
    with pytest.raises(ValueError, match="token"):
        RoutedEngine(swift, None, tokenizer, RouterConfig(tau=0.0, mode="token"),
                     super_engine=RemoteEngine(up_url))
    with pytest.raises(LlmcompError, match="cannot reach"):
        RemoteEngine("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(LlmcompError, match="not an http"):
        RemoteEngine("ftp://example")


@pytest.mark.parametrize(("mode", "extra", "message"), [
    ("request", ["--super", "smollm2-135m"], "not both"),
    ("token", [], "mode 'token' needs --super"),
])
def test_serve_super_url_bad_combinations_are_one_line(tmp_path, mode, extra, message):
    from typer.testing import CliRunner

    from llmcomp.cli.main import app
    from llmcomp.routing import save_router

    save_router(RouterConfig(tau=0.0, mode=mode, swift="smollm2-135m"), tmp_path / "router.json")
    result = CliRunner().invoke(app, ["serve", "--router", str(tmp_path / "router.json"), "--super-url",
                                      "http://127.0.0.1:9", *extra])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
