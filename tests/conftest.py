"""Shared fixtures: a tiny random Llama saved as an HF directory, with the real SmolLM2 tokenizer
(the models themselves are built in ``tiny_models.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 as a plain HF directory (dequantized once, cached)."""
    from llmcomp.loading import resolve_source

    return resolve_source("smollm2-135m").path


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(path, tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def tiny_llama_factory(tokenizer_dir: Path):
    """``factory(path, seed=0, dtype=float32, **config_overrides)`` saves a random tiny Llama at ``path``."""

    def factory(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
        return make_tiny_llama(path, tokenizer_dir, seed=seed, dtype=dtype, **overrides)

    return factory


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM imported (skipped without it), the llmcomp plugin registered, inside a default vLLM config."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config

    from llmcomp.serve import vllm_plugin

    vllm_plugin.register()
    with set_current_vllm_config(VllmConfig()):
        yield vllm_plugin


@pytest.fixture
def tp(monkeypatch):
    """``tp(rank, size)`` makes vLLM build layers and parameters for that tensor-parallel rank
    (without initialising vLLM's process groups)."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    def set_rank(rank: int, size: int) -> None:
        for mod in (linear, parameter):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: size)

    return set_rank


def pytest_report_header(config) -> str:
    """Name the host kind at the top of every run: CPU kernels take different paths on each."""
    from llmcomp.hostinfo import cpu_summary

    return f"host: {cpu_summary()}"
