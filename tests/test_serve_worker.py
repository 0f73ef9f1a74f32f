"""The model runs in a supervised worker process: killing it gives 503s, then the server recovers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from llmcomp.errors import LlmcompError
from llmcomp.loading import load_tokenizer, resolve_source
from llmcomp.serve.app import ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.worker import EngineWorker, WorkerSpec, exit_cause

RECOVERY_TIMEOUT_S = 180
LONG = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    tokenizer = load_tokenizer(resolve_source(str(tiny_llama_dir)))
    spec = WorkerSpec(str(tiny_llama_dir), threads=1, max_batch_size=4, max_queue=8, compile=False)
    engine = EngineWorker(spec, tokenizer)
    with BackgroundServer(create_app(engine, ServerConfig("tiny"))) as url:
        yield url, engine
    engine.close()


def _complete(url: str, **fields) -> httpx.Response:
    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, **fields}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_recovered(url: str, engine: EngineWorker, old_pid: int) -> None:
    def ready() -> bool:
        r = httpx.get(url + "/health", timeout=10)
        if r.status_code == 503:
            assert r.json()["status"] == "restarting" and r.headers["retry-after"]
        return r.status_code == 200
    _wait_until(ready, RECOVERY_TIMEOUT_S, "the worker to restart")
    assert engine.worker_pid not in (None, old_pid)


def _assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "worker_restarting"
    assert int(response.headers["retry-after"]) > 0


def test_killed_worker_gives_503_then_recovers(served):
    url, engine = served
    reference = _complete(url)
    assert reference.status_code == 200
    text = reference.json()["choices"][0]["text"]

    # 1. A streaming request in flight when the worker segfaults ends with an error event.
    pid = engine.worker_pid
    body = {"model": "tiny", "prompt": "Hello", "stream": True, **LONG}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        os.kill(pid, signal.SIGSEGV)
        events += [line for line in lines if line.startswith("data: ")]
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "worker_restarting" and "SIGSEGV" in last["error"]["message"]

    # 2. While the new worker loads: 503 with Retry-After and an OpenAI error body.
    _assert_503(_complete(url))
    _wait_recovered(url, engine, pid)
    again = _complete(url)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == text  # same greedy answer

    # 3. A non-streaming request in flight when the worker is killed gets a 503 too.
    pid = engine.worker_pid
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", _complete(url, **LONG)))
    thread.start()
    _wait_until(lambda: engine.num_active == 1, 30, "the request to start")
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    _assert_503(result["r"])
    _wait_recovered(url, engine, pid)
    assert _complete(url).json()["choices"][0]["text"] == text

    metrics = httpx.get(url + "/metrics").text
    assert 'llmcomp_worker_restarts_total{cause="SIGSEGV"} 1.0' in metrics
    assert 'llmcomp_worker_restarts_total{cause="SIGKILL"} 1.0' in metrics
    assert httpx.get(url + "/health").json()["worker_restarts"] == 2


def test_worker_that_cannot_load_is_one_line_error(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    tokenizer = load_tokenizer(resolve_source(str(tiny_llama_dir)))
    with pytest.raises(LlmcompError, match="cannot start the model worker") as info:
        EngineWorker(WorkerSpec(str(bad), threads=1, compile=False), tokenizer)
    assert "\n" not in str(info.value)


def test_exit_cause_names_signals():
    assert exit_cause(-signal.SIGSEGV) == "SIGSEGV"
    assert exit_cause(3) == "exit 3"
    assert exit_cause(None) == "unknown"
