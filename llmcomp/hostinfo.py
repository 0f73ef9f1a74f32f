"""What CPU this runs on: printed by CI, benchmarks and ``llmcomp bench``.

Hosts here differ from machine to machine (AVX2-only EPYC, AVX-512/AMX Xeon), and torch's CPU
kernels take different code paths on each, so every measurement and failure names its host kind.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The instruction-set extensions that change which CPU kernels run.
SIMD_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return None


def cpu_info() -> dict[str, Any]:
    """Model name, core count, SIMD flags and torch's chosen CPU capability."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set((_cpuinfo_field(text, "flags") or "").split())
    info: dict[str, Any] = {
        "cpu": _cpuinfo_field(text, "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
    }
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def cpu_summary() -> str:
    """One line, e.g. ``Intel(R) Xeon(R) Processor, 2 cores, simd avx2 avx512f ... (torch: AVX512)``."""
    info = cpu_info()
    simd = " ".join(info["simd"]) or "none of " + "/".join(SIMD_FLAGS[:2])
    torch_cap = f" (torch: {info['torch_cpu_capability']})" if "torch_cpu_capability" in info else ""
    return f"{info['cpu']}, {info['cores']} cores, simd {simd}{torch_cap}"
