"""CPU execution of stored-sparse weights: dense (default) or a CSR matmul, chosen by dispatch.

Dense wins on CPU unless the matrix is very sparse: a CSR product reads an index per weight and
cannot use the vectorized GEMM micro-kernels. Measured on this project's CPU (bench/sparsity.py
--speed, docs/BENCHMARKS.md): against bf16 dense, CSR is 5-12x slower at 50% kept, breaks even
around 10% kept at batch 1 and is 2.5-3x faster at 5%. So the sparse path is chosen only at or
below ``MAX_DENSITY`` kept weights and for at most ``MAX_ROWS`` tokens per call (decode); the
recipes (40-50% kept) always run dense. ``LLMCOMP_SPARSE_CPU=0`` (or :func:`set_enabled`) turns it off.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

ENV_FLAG = "LLMCOMP_SPARSE_CPU"
MAX_DENSITY = 0.1
MAX_ROWS = 8
_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Force the sparse path on/off (None: follow ``LLMCOMP_SPARSE_CPU``, on unless it is ``0``)."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    return _enabled if _enabled is not None else os.environ.get(ENV_FLAG, "1") != "0"


def wants(module: Any, x: torch.Tensor) -> bool:
    """Whether ``module`` (a stored-sparse linear) should run sparse on this input."""
    if x.device.type != "cpu" or not enabled() or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    density = module.nnz / (module.in_features * module.out_features)
    return rows <= MAX_ROWS and density <= MAX_DENSITY


def csr_weight(weight: torch.Tensor) -> torch.Tensor:
    """The dense ``[out, in]`` weight as a float32 CSR matrix."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured here
        warnings.simplefilter("ignore", UserWarning)
        return weight.float().to_sparse_csr()


def csr_linear(csr: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ b)`` with ``W`` in CSR: one sparse-dense product on the transposed input."""
    flat = x.reshape(-1, x.shape[-1]).float()
    y = (csr @ flat.T).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], csr.shape[0])


def apply(module: Any, x: torch.Tensor) -> torch.Tensor:
    key = module._key(x)
    cached = getattr(module, "_csr", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, csr_weight(module.dequantized_weight(torch.float32)))
        module._csr = cached
    return csr_linear(cached[1], x, module.bias)
