"""One dispatch point between compressed modules and GEMM kernels.

A :class:`QuantLayout` (shapes, bits, group size, zero points) is the only contract with kernels.
Each kernel answers ``can_implement(layout, device, dtype) -> (ok, reason)``; selection walks a
per-device priority list, and when nothing fits the error lists every kernel's reason.
Kernels may repack weights once (``prepare``) into whatever layout they run fastest on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llmcomp import intquant


@dataclass(frozen=True)
class QuantLayout:
    """What a kernel needs to know about one quantized linear layer."""

    out_features: int
    in_features: int
    bits: int
    group_size: int  # effective group length along K (in_features for per-channel)
    symmetric: bool

    @property
    def num_groups(self) -> int:
        return intquant.num_groups(self.in_features, self.group_size)


@dataclass
class QuantTensors:
    """Checkpoint tensors of one layer, in the storage layout of :mod:`llmcomp.intquant`."""

    packed: torch.Tensor  # int8 [N, K] for 8 bits, int32 [N, ceil(K / (32 // bits))] otherwise
    scale: torch.Tensor  # [N, groups], float
    zero: torch.Tensor | None  # int8 [N, groups] or None when symmetric


class Kernel(Protocol):
    name: str

    def can_implement(self, layout: QuantLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]: ...

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> Any: ...

    def apply(self, x: torch.Tensor, layout: QuantLayout, state: Any, bias: torch.Tensor | None) -> torch.Tensor: ...


class ReferenceKernel:
    """Dequantize the whole matrix, then a plain matmul: slow, obviously correct, runs anywhere."""

    name = "reference"

    def can_implement(self, layout: QuantLayout, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return True, ""

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
        q = intquant.unpack(tensors.packed, layout.bits, layout.in_features)
        return intquant.dequantize(q, tensors.scale, tensors.zero, layout.group_size, dtype=dtype)

    def apply(self, x: torch.Tensor, layout: QuantLayout, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        w = state.to(device=x.device, dtype=x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


_KERNELS: dict[str, Kernel] = {}
_PRIORITY: dict[str, list[str]] = {"cuda": [], "cpu": [], "other": []}


def register_kernel(kernel: Kernel, devices: tuple[str, ...], first: bool = True) -> None:
    """Add a kernel to the priority lists of ``devices`` ("cuda", "cpu", "other")."""
    if kernel.name in _KERNELS and _KERNELS[kernel.name] is not kernel:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    for dev in devices:
        order = _PRIORITY[dev]
        if kernel.name not in order:
            order.insert(0, kernel.name) if first else order.append(kernel.name)


def _device_key(device: torch.device) -> str:
    return device.type if device.type in ("cuda", "cpu") else "other"


def select_kernel(
    layout: QuantLayout, device: torch.device, dtype: torch.dtype, prefer: str | None = None
) -> Kernel:
    """Pick the first kernel of ``device``'s priority list that can run ``layout``.

    ``prefer`` (or the ``LLMCOMP_KERNEL`` environment variable) forces one kernel by name.
    """
    _load_builtin_kernels()
    prefer = prefer or os.environ.get("LLMCOMP_KERNEL") or None
    if prefer is not None:
        if prefer not in _KERNELS:
            raise ValueError(f"unknown kernel {prefer!r}; registered: {sorted(_KERNELS)}")
        ok, reason = _KERNELS[prefer].can_implement(layout, device, dtype)
        if not ok:
            raise ValueError(f"kernel {prefer!r} cannot run {layout}: {reason}")
        return _KERNELS[prefer]
    reasons = []
    for name in _PRIORITY[_device_key(device)] + ["reference"]:
        ok, reason = _KERNELS[name].can_implement(layout, device, dtype)
        if ok:
            return _KERNELS[name]
        reasons.append(f"{name}: {reason}")
    raise RuntimeError(f"no kernel can run {layout} on {device}: " + "; ".join(reasons))


_BUILTINS_LOADED = False


def _load_builtin_kernels() -> None:
    """Import kernel modules lazily so ``import llmcomp`` stays light and triton stays optional."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    register_kernel(ReferenceKernel(), devices=())
    import importlib

    for module in ("llmcomp.kernels.cpu", "llmcomp.kernels.triton_gemm"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # the module itself not written yet / triton missing
            if exc.name not in (module, "triton"):
                raise
            continue
        mod.register()
