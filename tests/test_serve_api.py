"""Native OpenAI-compatible server, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from tiny_models import random_llama
from transformers import AutoTokenizer

from llmcomp.loading import resolve_source
from llmcomp.serve.app import MAX_BODY_BYTES, ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.engine import Engine

MODEL = "tiny-llama"
KEY = "sk-test-key"
CONTEXT = 512
SLOW_STEP_S = 0.02  # per forward: makes long generations last long enough to interrupt them


def _tiny_model(vocab: int, seed: int = 0):
    return random_llama(seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=64)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL, api_key=KEY))) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def slow_server(tokenizer):
    """One batch slot, one queue slot, and a model slowed to SLOW_STEP_S per step."""
    slow = _tiny_model(len(tokenizer), seed=1)
    # On the embedding: the runtime's lean forward calls the model's modules, never model.forward,
    # so a hook on the model itself would never slow anything.
    slow.model.embed_tokens.register_forward_pre_hook(lambda *_: time.sleep(SLOW_STEP_S))
    engine = Engine(slow, tokenizer, max_batch_size=1, max_queue=1)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as url:
        yield url, engine
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def greedy_ref(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def post(url: str, path: str, body: bytes | dict, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url + path, content=content, headers=headers, timeout=timeout)


def wait_idle(engine: Engine, limit_s: float) -> float:
    start = time.monotonic()
    while engine.num_active or engine.num_waiting:
        if time.monotonic() - start > limit_s:
            break
        time.sleep(0.01)
    return time.monotonic() - start


# -- happy paths ------------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_matches_greedy_reference_with_logprobs(client, model, tokenizer):
    prompt = "The quick brown fox"
    ids = tokenizer(prompt).input_ids
    ref = greedy_ref(model, ids, 8)
    res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    choice = res.choices[0]
    assert choice.text == tokenizer.decode(ref, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    # Teacher-forced float64 log-probabilities of the generated tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids + ref])).logits[0, len(ids) - 1 : -1].double()
    ref_lp = torch.log_softmax(logits, dim=-1)
    expected = [ref_lp[i, t].item() for i, t in enumerate(ref)]
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ref]
    for i, top in enumerate(choice.logprobs.top_logprobs):
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(ref_lp[i].max().item(), abs=1e-3)


def test_chat_uses_the_chat_template(client, model, tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False).input_ids
    ref = greedy_ref(model, ids, 6)
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == tokenizer.decode(ref, skip_special_tokens=True)
    assert res.usage.prompt_tokens == len(ids)
    content = res.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_streaming_completion_equals_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streaming_chat_with_usage_and_done_marker(server, client):
    messages = [{"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    with httpx.stream("POST", server[0] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_string_cuts_output(client):
    kwargs = dict(model=MODEL, prompt="Numbers:", max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    res = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert res.text == cut and res.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kwargs))
    assert streamed == cut


def test_seed_n_and_sampling(client):
    kwargs = dict(model=MODEL, prompt="Random:", max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text
    many = client.completions.create(n=3, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == 24 and many.usage.prompt_tokens == a.usage.prompt_tokens


def test_streamed_logprobs_equal_non_streamed(client):
    kwargs = dict(model=MODEL, prompt="Streamed logprobs", max_tokens=6, temperature=0, logprobs=2)
    full = client.completions.create(**kwargs).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs) if c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == full.tokens and len(full.tokens) == 6
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(full.token_logprobs)
    assert [o for p in parts for o in p.text_offset] == full.text_offset  # offsets continue across chunks
    assert [t for p in parts for t in p.top_logprobs] == full.top_logprobs

    messages = [{"role": "user", "content": "Stream me logprobs"}]
    chat = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    full_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **chat) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in full_chat] and len(streamed) == 5
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in full_chat])
    assert all(len(e.top_logprobs) == 3 for e in streamed)


def test_null_sampling_fields_and_any_integer_seed(client):
    """``temperature``/``top_p`` null mean 1 (OpenAI); a seed outside int64 is used modulo 2**64."""
    kwargs = dict(model=MODEL, prompt="Seeds:", max_tokens=6)
    a = client.completions.create(seed=2**64 + 5, **kwargs).choices[0].text
    b = client.completions.create(seed=5, temperature=None, top_p=None, **kwargs).choices[0].text
    assert a == b == client.completions.create(seed=5, **kwargs).choices[0].text


def test_batched_prompts_and_token_prompts(client, tokenizer):
    ids = tokenizer("Token prompt").input_ids
    res = client.completions.create(model=MODEL, prompt=["first", "second"], max_tokens=3, temperature=0)
    assert len(res.choices) == 2
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Token prompt", max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


# -- bad input ---------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * (CONTEXT + 10)}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, -1]}, 400, "prompt.1"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}, 400, "prompt"),  # lone surrogate: no 500
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "messages.0.content.0.type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, client, path, body, status, param):
    r = post(server[0], path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param in ("prompt", "max_tokens") and "context" in err["message"]:
        assert err["code"] == "context_length_exceeded"
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).choices[0].text is not None


def test_every_error_has_the_openai_shape(server):
    """Routing errors, FastAPI's own validation and the body limit answer OpenAI's JSON too (never 422)."""
    url, auth = server[0], {"Authorization": f"Bearer {KEY}"}

    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
        return r.json()["error"]

    wrong_method = httpx.get(url + "/v1/completions", headers=auth)
    assert error(wrong_method, 405)["type"] == "invalid_request_error" and wrong_method.headers["allow"] == "POST"
    assert error(httpx.get(url + "/v1/nope", headers=auth), 404)["type"] == "not_found_error"
    assert error(post(url, "/v1/completions", {"model": MODEL, "prompt": 3}), 400)["param"] == "prompt"
    too_large = b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"x" * MAX_BODY_BYTES)
    assert error(post(url, "/v1/completions", too_large), 413)["code"] == "body_too_large"
    chunked = httpx.post(url + "/v1/completions", headers=auth, content=iter([b"x" * 2**20] * 9))  # no Content-Length
    assert error(chunked, 413)["code"] == "body_too_large"
    form = httpx.post(url + "/v1/completions", headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
                      content=json.dumps({"model": MODEL, "prompt": "x"}))
    assert error(form, 400)["code"] == "invalid_json"
    no_type = httpx.post(url + "/v1/completions", headers=auth,
                         content=json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}))
    assert no_type.status_code == 200 and no_type.json()["usage"]["completion_tokens"] == 2  # JSON when untyped


def test_openai_client_sees_typed_errors(server):
    good = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        good.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_api_key_required_on_v1_only(server):
    r = post(server[0], "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server[0] + "/health").status_code == 200
    assert httpx.get(server[0] + "/nope").json()["error"]["type"] == "not_found_error"


def test_metrics_count_requests_tokens_and_latency(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=5, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['llmcomp_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["llmcomp_generation_tokens_total"] >= 5
    assert values["llmcomp_prompt_tokens_total"] >= 1
    assert values['llmcomp_request_latency_seconds_count{endpoint="completions"}'] >= 1
    assert values['llmcomp_time_to_first_token_seconds_count{endpoint="completions"}'] >= 1
    assert "llmcomp_queue_depth" in values and "llmcomp_active_sequences" in values


# -- concurrency, overload and disconnects -----------------------------------------------------
def test_32_concurrent_clients_are_all_answered_correctly(server, model, tokenizer):
    url, engine = server
    prompts = [f"Client {i} says" for i in range(32)]
    refs = [tokenizer.decode(greedy_ref(model, tokenizer(p).input_ids, 6), skip_special_tokens=True)
            for p in prompts]

    def ask(prompt: str) -> str:
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == refs
    assert wait_idle(engine, 5) < 5


def test_full_queue_answers_429_with_retry_after(slow_server):
    url, engine = slow_server
    body = {"model": MODEL, "prompt": "busy", "max_tokens": 40, "temperature": 0}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(url, "/v1/completions", body, key=None), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"]["code"] == "server_busy"
    assert wait_idle(engine, 10) < 10
    assert post(url, "/v1/completions", {**body, "max_tokens": 2}, key=None).status_code == 200
    assert "llmcomp_rejected_requests_total" in httpx.get(url + "/metrics").text


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    url, engine = slow_server
    body = {"model": MODEL, "prompt": "long story", "max_tokens": 400, "temperature": 0, "stream": True}
    full_duration = 400 * SLOW_STEP_S
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 5
        while engine.num_active != 1 and time.monotonic() < deadline:  # joins the batch right after token 1
            time.sleep(0.005)
        assert engine.num_active == 1
    # the client is gone: the engine must drop the sequence long before its 400 tokens are done
    assert wait_idle(engine, full_duration / 2) < full_duration / 2
    assert post(url, "/v1/completions", {**body, "stream": False, "max_tokens": 2}, key=None).status_code == 200


def test_disconnect_of_non_streaming_request_frees_the_slot(slow_server):
    url, engine = slow_server
    body = {"model": MODEL, "prompt": "long story", "max_tokens": 400, "temperature": 0}
    full_duration = 400 * SLOW_STEP_S

    wait_idle(engine, full_duration)  # an earlier test's request would take the one slot (429, no timeout)
    assert not engine.num_active and not engine.num_waiting
    with pytest.raises(httpx.ReadTimeout):  # in this thread: a raise inside a helper thread never failed the test
        post(url, "/v1/completions", body, key=None, timeout=0.5)
    assert wait_idle(engine, full_duration / 2) < full_duration / 2
