"""``llmcomp serve`` as a real process, answered through the official ``openai`` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from llmcomp.serve.background import free_port

STARTUP_TIMEOUT_S = 180
KEY = "sk-cli"


class ServeProcess:
    """``llmcomp serve ARGS`` in its own session; stopped with SIGTERM like a service manager would."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "llmcomp", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcomp", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "/no/such/model"], "not found"),
        (["serve", "smollm2-135m", "--dtype", "float8"], "unknown dtype"),
        (["serve", "smollm2-135m", "--vllm-arg", "--foo"], "only applies to --engine vllm"),
    ],
)
def test_bad_cli_input_is_one_line(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_vllm_engine_refuses_unknown_module_kind_before_starting(tiny_llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "llmcomp", "format_version": 1, "modules": {
        "model.layers.0.mlp.down_proj": {"type": "tensor_train", "in_features": 160, "out_features": 64}}}
    (ckpt / "config.json").write_text(json.dumps(config))
    res = run_cli("serve", str(ckpt), "--engine", "vllm")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown kind 'tensor_train'" in res.stderr  # (known kinds vLLM cannot run: test_vllm_spec.py)


def test_serve_tiny_model_dir_with_api_key(tiny_llama_dir, tmp_path):
    server = ServeProcess([str(tiny_llama_dir), "--api-key", KEY, "--served-model-name", "tiny",
                           "--max-batch-size", "4", "--max-queue", "8"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        text = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
        streamed = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == text
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4)
        assert chat.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        rc = server.stop()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
    assert rc in (0, -signal.SIGTERM), server.log.read_text()[-3000:]
    log = server.log.read_text()
    assert "Finished server process" in log
    # Start-up compiles the decode step once per batch bucket (1, 2, 4) and says so, with the time.
    assert "KV cache 4 slots x 512 tokens" in log and "compiled the decode step (3 batch sizes) in" in log


@pytest.mark.slow
def test_serve_compressed_smollm2_answers_openai_client(tmp_path):
    out = tmp_path / "smollm2-w8"
    res = run_cli("compress", "smollm2-135m", "--recipe", "rtn-w8", "-o", str(out))
    assert res.returncode == 0, res.stderr
    server = ServeProcess([str(out), "--served-model-name", "smol", "--no-compile"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        text = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4,
                                         temperature=0).choices[0].text
        assert text.startswith(" Paris")
        stream = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0, stream=True)
        answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "Paris" in answer
    finally:
        server.stop()
