"""``KernelLinear``: the kernel-dispatch plumbing every compressed linear that runs through
:func:`llmcomp.kernels.select_kernel` shares.

A subclass gives its ``layout`` and ``kernel_tensors()``; this base picks the kernel, lets it
repack once per (device, dtype), keeps that until the weights change (load, ``.to()``), and runs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmcomp.kernels.dispatch import select_kernel


class KernelLinear(nn.Module):
    """Base of kernel-dispatched linear modules; subclasses set ``bias`` and define ``layout`` /
    ``kernel_tensors``."""

    layout: Any
    bias: torch.Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self._kernel_state: tuple[Any, Any, torch.device, torch.dtype] | None = None

    def kernel_tensors(self) -> Any:
        raise NotImplementedError

    def _state_for(self, x: torch.Tensor) -> tuple[Any, Any]:
        """Select a kernel and let it repack once per (device, dtype); cached until weights change."""
        cached = self._kernel_state
        if cached is not None and cached[2] == x.device and cached[3] == x.dtype:
            return cached[0], cached[1]
        kernel = select_kernel(self.layout, x.device, x.dtype)
        state = kernel.prepare(self.layout, self.kernel_tensors(), x.dtype)
        self._kernel_state = (kernel, state, x.device, x.dtype)
        return kernel, state

    def invalidate_kernel_cache(self) -> None:
        self._kernel_state = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.invalidate_kernel_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> KernelLinear:
        self.invalidate_kernel_cache()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, state = self._state_for(x)
        return kernel.apply(x, self.layout, state, self.bias)
