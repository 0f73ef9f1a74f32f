"""Evaluate one or several models on a task list with shared settings and shared data.

Data is prepared once, before any model is loaded, so a missing file fails in a second rather
than after a model load; models are evaluated one at a time and freed in between.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcomp.errors import LlmcompError
from llmcomp.eval.data import CORPORA, EvalText, load_eval_text
from llmcomp.eval.harness import (
    DEFAULT_SLOTS,
    build_hf_lm,
    build_runtime_lm,
    build_vllm_lm,
    check_hub_access,
    run_harness,
)
from llmcomp.eval.local_data import find_local_split
from llmcomp.eval.model_size import ModelSize, measure_model_size
from llmcomp.eval.perplexity import DEFAULT_SEQ_LEN, compute_perplexity
from llmcomp.eval.tasks import HARNESS, PERPLEXITY, TaskSpec

ENGINES = ("native", "hf", "vllm")  # native: lm-eval through the runtime; hf: through lm-eval's HFLM


@dataclass
class EvalSettings:
    """Everything that must be the same for every model of one comparison."""

    tasks: list[TaskSpec]
    data_file: Path | None = None
    data_dir: Path | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    stride: int | None = None
    batch_size: int = 1
    slots: int = DEFAULT_SLOTS
    max_tokens: int | None = None
    dtype: str = "auto"
    device: str = "cpu"
    limit: int | float | None = None
    num_fewshot: int | None = None
    engine: str = "native"
    progress: bool = True

    @property
    def perplexity_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.kind == PERPLEXITY]

    @property
    def harness_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.kind == HARNESS]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("tasks", "progress")}
        out["tasks"] = [t.name for t in self.tasks]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


@dataclass
class ModelResult:
    """One model's measurements; ``results[task][metric]`` are numbers."""

    name: str
    location: str
    size: ModelSize
    results: dict[str, dict[str, float | int]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "location": self.location, "size": self.size.to_dict(),
                "seconds": round(self.seconds, 2), "results": self.results}


def validate_settings(settings: EvalSettings) -> None:
    """Reject inconsistent options before any work starts."""
    if settings.engine not in ENGINES:
        raise LlmcompError(f"unknown engine {settings.engine!r}; allowed: {', '.join(ENGINES)}")
    corpus_tasks = [t.name for t in settings.perplexity_tasks if t.name in CORPORA]
    if settings.data_file is not None and len(corpus_tasks) != 1:
        raise LlmcompError(
            f"--data-file replaces exactly one hub corpus ({' or '.join(CORPORA)}); "
            f"the task list has {len(corpus_tasks)}: {', '.join(corpus_tasks) or 'none'}"
        )
    if settings.engine == "vllm" and settings.perplexity_tasks:
        names = ", ".join(t.name for t in settings.perplexity_tasks)
        raise LlmcompError(
            f"--engine vllm runs lm-eval tasks only; token perplexity ({names}) needs --engine native "
            "(lm-eval's 'wikitext' task gives word perplexity through vLLM)"
        )
    for name, value in (("--seq-len", settings.seq_len), ("--batch-size", settings.batch_size),
                        ("--slots", settings.slots)):
        if value < 1:
            raise LlmcompError(f"{name} must be positive, got {value}")
    if settings.data_dir is not None:
        for spec in settings.harness_tasks:
            find_local_split(spec, settings.data_dir)
    else:
        check_hub_access(settings.harness_tasks)


def prepare_texts(settings: EvalSettings) -> dict[str, EvalText]:
    """The corpus of every perplexity task, loaded once for all models."""
    texts = {}
    for spec in settings.perplexity_tasks:
        data_file = settings.data_file if spec.name in CORPORA else None
        texts[spec.name] = load_eval_text(spec.name, data_file)
    return texts


def _perplexity_tasks(model, tokenizer, settings: EvalSettings, texts: dict[str, EvalText]) -> dict:
    out = {}
    for spec in settings.perplexity_tasks:
        text = texts[spec.name]
        max_tokens = settings.max_tokens
        if text.max_windows is not None:  # e.g. C4's customary 256 windows
            cap = text.max_windows * settings.seq_len
            max_tokens = cap if max_tokens is None else min(max_tokens, cap)
        result = compute_perplexity(model, tokenizer, text.text, seq_len=settings.seq_len,
                                    stride=settings.stride, batch_size=settings.batch_size,
                                    max_tokens=max_tokens, progress=settings.progress)
        out[spec.name] = result.to_dict()
    return out


def evaluate_model(name: str, settings: EvalSettings, texts: dict[str, EvalText]) -> ModelResult:
    """Load ``name`` with the chosen engine and run every task on it."""
    from llmcomp.loading import load_model, resolve_source

    source = resolve_source(name)
    result = ModelResult(name, source.location, measure_model_size(source.location))
    start = time.perf_counter()
    if settings.engine == "vllm":
        if source.kind != "dir":
            raise LlmcompError(f"--engine vllm needs a local model directory, got {name!r}")
        lm = build_vllm_lm(source.location, settings.dtype, settings.batch_size, None)
        result.results.update(run_harness(lm, settings.harness_tasks, settings.data_dir,
                                          settings.num_fewshot, settings.limit))
        del lm
    else:
        model, tokenizer = load_model(source, dtype=settings.dtype, device=settings.device)
        result.results.update(_perplexity_tasks(model, tokenizer, settings, texts))
        if settings.harness_tasks:
            if settings.engine == "hf":
                lm = build_hf_lm(model, tokenizer, settings.batch_size)
            else:
                lm = build_runtime_lm(model, tokenizer, settings.slots, settings.progress)
            result.results.update(run_harness(lm, settings.harness_tasks, settings.data_dir,
                                              settings.num_fewshot, settings.limit))
            del lm
        del model, tokenizer
    gc.collect()
    result.seconds = time.perf_counter() - start
    return result


def evaluate_models(
    names: list[str], settings: EvalSettings
) -> tuple[list[ModelResult], dict[str, EvalText]]:
    """Evaluate every model in ``names`` (in order) under the same settings."""
    validate_settings(settings)
    texts = prepare_texts(settings)
    return [evaluate_model(n, settings, texts) for n in names], texts
