"""`llmcomp serve --activation-sparsity`: the live worker process applies the flags it is handed.

The worker loads the model in a child process and reads the settings from the environment
(``ActivationSettings.to_env``). Reference: the same model with the same settings applied in
this process, served by an in-process engine; the dense model must answer differently, so the
comparison can fail when the worker ignores the flags.
"""

from __future__ import annotations

import httpx
import pytest

from llmcomp.activation_sparsity import ActivationSettings
from llmcomp.loading import load_model, load_tokenizer, resolve_source
from llmcomp.serve.app import ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.engine import Engine
from llmcomp.serve.worker import EngineWorker, WorkerSpec

SETTINGS = ActivationSettings(0.5, "wina")
BODY = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
        "ignore_eos": True, "logprobs": 1}


def _complete(engine) -> tuple[str, list[float]]:
    with BackgroundServer(create_app(engine, ServerConfig("tiny"))) as url:
        r = httpx.post(url + "/v1/completions", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def _in_process(path: str, settings: ActivationSettings) -> tuple[str, list[float]]:
    model, tokenizer = load_model(path, dtype="float32")
    settings.apply(model)
    return _complete(Engine(model, tokenizer, max_batch_size=2, max_queue=4))


@pytest.mark.slow
def test_live_worker_serves_with_activation_sparsity(tiny_llama_dir, monkeypatch):
    path = str(tiny_llama_dir)
    dense_text, _ = _in_process(path, ActivationSettings())
    sparse_text, sparse_lp = _in_process(path, SETTINGS)
    assert sparse_text != dense_text  # 50% of the inputs dropped changes this model's greedy text

    for key, value in SETTINGS.to_env().items():  # what `llmcomp serve` sets for its worker
        monkeypatch.setenv(key, value)
    tokenizer = load_tokenizer(resolve_source(path))
    spec = WorkerSpec(path, dtype="float32", threads=1, max_batch_size=2, max_queue=4, compile=False)
    worker = EngineWorker(spec, tokenizer)
    try:
        text, logprobs = _complete(worker)
    finally:
        worker.close()
    assert text == sparse_text
    assert logprobs == pytest.approx(sparse_lp, abs=1e-4)
