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


def pytest_report_header(config) -> str:
    """Name the host kind at the top of every run: CPU kernels take different paths on each."""
    from llmcomp.hostinfo import cpu_summary

    return f"host: {cpu_summary()}"
