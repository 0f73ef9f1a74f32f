"""``ActivationSparseLinear``: a linear layer that reads only the inputs that matter (TEAL / WINA).

It wraps a dense ``nn.Linear`` or an int_affine ``QuantLinear`` (the ``base`` child, whose
buffers keep their own names: ``base.weight``, ``base.weight_packed``, ...) and drops, per token,
the input channels with the smallest score before the matmul:

* TEAL: ``score_i = |x_i|``;
* WINA: ``score_i = |x_i| * ||W[:, i]||_2`` (the column norm, stored as ``col_norms``).

Two selection modes: ``topk`` keeps ``ceil((1 - s) * K)`` channels of every token (WINA's
evaluation); ``threshold`` keeps ``score > t`` with ``t`` calibrated offline (TEAL's runtime), so
the per-token count varies around the target. The checkpoint tensors (exactly the buffers) are
the base's, ``col_norms`` and, when the ``wina`` pass calibrated the layer, ``sparsity_table`` /
``threshold_table`` (one entry per target of ``spec.grid``: the greedy per-matrix allocation) and
``input_rotation`` (the output-preserving transform: ``y = W' (R^T x)`` with ``W' = W R``).

Decode (one token per call) in ``topk`` mode goes through the kernel dispatch
(``activation_sparse`` kind: the CPU gather kernel, the Triton sparse GEMV on CUDA), which reads
only the selected weight columns; calls with several tokens (prefill, perplexity) stay dense:
each token's unselected inputs are zeroed and the base module runs its dense matmul.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from llmcomp.kernels.act_sparse_packed import NATIVE_IO_DTYPES, packed_siblings
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    DenseLayout,
    QuantTensors,
    select_kernel,
)
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.modules.registry import register_module
from llmcomp.scheme import IntAffineSpec, ModuleSpec, register_spec

KIND = "activation_sparse"
CRITERIA = ("teal", "wina")
MODES = ("topk", "threshold")
MAX_SPARSITY = 0.99  # keep at least one input channel in a hundred
CPU_DECODE_KERNEL = "cpu_sparse_bag"  # llmcomp.kernels.act_sparse_cpu
CPU_PACKED_KERNEL = "cpu_sparse_packed"  # llmcomp.kernels.act_sparse_packed: int4/int8 base, no dense copy


@register_spec
class ActivationSparseSpec(ModuleSpec):
    """A dense (``base`` None) or int_affine weight with per-token input selection (docs/ACTIVATION_SPARSITY.md)."""

    kind: Literal["activation_sparse"] = "activation_sparse"
    base: IntAffineSpec | None = Field(None, description="the wrapped int_affine spec; None: a dense float weight")
    criterion: Literal["teal", "wina"] = "wina"
    grid: tuple[float, ...] = Field((), description="target sparsities with a calibrated allocation table")
    rotation: bool = Field(False, description="an input rotation R is stored (the output-preserving transform)")

    @model_validator(mode="after")
    def _consistent(self) -> ActivationSparseSpec:
        if self.base is not None and (self.base.in_features, self.base.out_features, self.base.bias) != (
                self.in_features, self.out_features, self.bias):
            raise ValueError("base spec shape/bias differs from the wrapper's")
        if any(not 0.0 <= s <= MAX_SPARSITY for s in self.grid) or list(self.grid) != sorted(set(self.grid)):
            raise ValueError(f"grid must be increasing sparsities in [0, {MAX_SPARSITY}]")
        return self


def keep_count(in_features: int, sparsity: float) -> int:
    """Channels kept per token at ``sparsity``: ``ceil((1 - s) * K)`` (float noise ignored), at least 1."""
    return max(1, min(in_features, math.ceil((1.0 - sparsity) * in_features - 1e-9)))


def scores(x: torch.Tensor, col_norms: torch.Tensor | None) -> torch.Tensor:
    """float32 per-channel scores: ``|x|`` (TEAL) or ``|x| * ||W[:, i]||`` (WINA, norms given)."""
    s = x.float().abs()
    return s if col_norms is None else s * col_norms.float()


def topk_mask(x: torch.Tensor, keep: int, col_norms: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask, per token (last dim), of the ``keep`` best-scored channels."""
    s = scores(x, col_norms)
    idx = torch.topk(s, keep, dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def masked_dense_linear(x: torch.Tensor, weight: torch.Tensor, col_norms: torch.Tensor | None, sparsity: float,
                        rotation: torch.Tensor | None = None, threshold: float | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's semantics with dense compute, from plain tensors (for engines such as vLLM).

    ``weight`` is the stored base weight ``W'`` ``[N, K]`` (dequantized), ``col_norms`` None for
    TEAL, ``rotation`` the stored ``input_rotation``; ``threshold`` replaces per-token top-k.
    """
    if rotation is not None:
        x = x @ rotation.to(x.dtype)
    if sparsity > 0.0 or threshold is not None:
        if threshold is not None:
            mask = scores(x, col_norms) > threshold
        else:
            mask = topk_mask(x, keep_count(x.shape[-1], sparsity), col_norms)
        x = x * mask.to(x.dtype)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@register_module(KIND)
class ActivationSparseLinear(nn.Module):
    """Per-token input sparsity on top of a dense or int_affine linear layer (see the module docstring)."""

    kind = KIND

    def __init__(self, base: nn.Linear | QuantLinear, criterion: str = "wina", grid: tuple[float, ...] = (),
                 rotation: bool = False, rotation_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)) or type(base) not in (nn.Linear, QuantLinear):
            raise TypeError(f"activation sparsity wraps nn.Linear or QuantLinear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.grid = tuple(float(s) for s in grid)
        self.default_criterion = criterion
        dtype = torch.float32
        self.register_buffer("col_norms", torch.ones(self.in_features, dtype=dtype))
        if self.grid:
            self.register_buffer("sparsity_table", torch.zeros(len(self.grid), dtype=dtype))
            self.register_buffer("threshold_table", torch.zeros(len(self.grid), dtype=dtype))
        else:
            self.sparsity_table = self.threshold_table = None
        if rotation:
            self.register_buffer("input_rotation", torch.eye(self.in_features, dtype=rotation_dtype))
        else:
            self.input_rotation = None
        # Runtime choice (not stored): set by configure() at load time.
        self.sparsity = 0.0
        self.criterion = criterion
        self.mode = "topk"
        self.threshold: float | None = None
        self.use_kernel = True
        self._kernel_state: tuple[Any, Any, tuple, ActivationSparseLayout] | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def wrap(cls, base: nn.Module, criterion: str = "wina", col_norms: torch.Tensor | None = None,
             grid: tuple[float, ...] = (), rotation: torch.Tensor | None = None) -> ActivationSparseLinear:
        """Wrap ``base``; column norms from ``col_norms`` or computed from its (dequantized) weight.

        ``rotation`` ``[K, K]``: the layer is fed ``x @ rotation`` (kept in the weight's float dtype)."""
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        mod = cls(base, criterion, grid, rotation is not None, dtype)  # type: ignore[arg-type]
        norms = col_norms if col_norms is not None else base_weight(base, torch.float32).norm(dim=0)
        mod.col_norms.copy_(norms.float())
        if rotation is not None:
            mod.input_rotation.copy_(rotation.to(dtype))
        return mod.to(base_device(base))

    @classmethod
    def from_spec(cls, spec: ActivationSparseSpec, dtype: torch.dtype) -> ActivationSparseLinear:
        if spec.base is None:
            base: nn.Module = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype)
            base.weight.requires_grad_(False)
        else:
            base = QuantLinear.from_spec(spec.base, dtype)
        return cls(base, spec.criterion, spec.grid, spec.rotation, dtype)  # type: ignore[arg-type]

    def spec(self) -> ActivationSparseSpec:
        base = self.base.spec() if isinstance(self.base, QuantLinear) else None
        return ActivationSparseSpec(in_features=self.in_features, out_features=self.out_features,
                                    bias=self.base.bias is not None, base=base, criterion=self.default_criterion,
                                    grid=self.grid, rotation=self.input_rotation is not None)

    # -- runtime configuration ----------------------------------------------------------------
    def configure(self, sparsity: float, criterion: str | None = None, mode: str = "topk",
                  allocated: bool = True) -> float:
        """Choose the active sparsity; returns the one this matrix runs at.

        With ``allocated`` and ``sparsity`` in ``grid``, the calibrated per-matrix value of the
        table is used (and its threshold in ``threshold`` mode); otherwise ``sparsity`` itself.
        """
        criterion = criterion or self.default_criterion
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= sparsity <= MAX_SPARSITY:
            raise ValueError(f"activation sparsity must be in [0, {MAX_SPARSITY}], got {sparsity}")
        self.criterion, self.mode, self.sparsity, self.threshold = criterion, mode, float(sparsity), None
        index = self.grid_index(sparsity)
        if allocated and index is not None and self.sparsity_table is not None:
            self.sparsity = float(self.sparsity_table[index])
            if mode == "threshold" and criterion == self.default_criterion:
                self.threshold = float(self.threshold_table[index])
        if mode == "threshold" and self.threshold is None:
            raise ValueError(f"threshold mode needs a calibrated {criterion} threshold for sparsity {sparsity} "
                             f"(grid {list(self.grid)}); run the wina pass or use mode topk")
        self._kernel_state = None
        return self.sparsity

    def grid_index(self, sparsity: float) -> int | None:
        return next((i for i, s in enumerate(self.grid) if abs(s - sparsity) < 1e-6), None)

    @property
    def active_norms(self) -> torch.Tensor | None:
        return self.col_norms if self.criterion == "wina" else None

    # -- execution ----------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight this layer computes with when nothing is dropped (``W' R^T``)."""
        w = base_weight(self.base, torch.float64 if self.input_rotation is not None else dtype)
        if self.input_rotation is not None:
            w = w @ self.input_rotation.double().t()
        return w.to(dtype)

    def input_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``[..., K]``: the inputs (after the rotation) each token keeps. For engines that
        compute densely (vLLM): ``y = base(rotate(x) * mask)``."""
        if self.mode == "threshold":
            return scores(x, self.active_norms) > self.threshold
        return topk_mask(x, keep_count(self.in_features, self.sparsity), self.active_norms)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as an engine that multiplies by :meth:`dequantized_weight` densely (vLLM) must see
        it: ``W' (m * xR)`` equals ``(W' R^T)`` applied to ``(m * xR) R^T`` (R orthogonal)."""
        if self.sparsity <= 0.0:
            return x
        rotated = self.rotate(x)
        kept = rotated * self.input_mask(rotated).to(rotated.dtype)
        return kept if self.input_rotation is None else kept @ self.input_rotation.to(x.dtype).t()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_rotation is None else x @ self.input_rotation.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rotate(x)
        if self.sparsity <= 0.0:
            return self.base(x)
        rows = math.prod(x.shape[:-1])
        if rows == 1 and self.mode == "topk" and self.use_kernel:
            state = self.packed_decode_state(x)
            if state is not None:  # the packed kernel's C++ operator, called directly (few guards)
                y = packed_siblings(x.reshape(-1).contiguous(), [state], [self.base.bias])
                return y.reshape(*x.shape[:-1], y.shape[0])
            kernel, state, layout = self._state_for(x)
            return kernel.apply(x, layout, state, self.base.bias)
        return self.base(x * self.input_mask(x).to(x.dtype))

    def packed_decode_state(self, x: torch.Tensor) -> Any | None:
        """The packed kernel's state when a batch-1 call with ``x`` runs its C++ operator, else
        None: what :class:`FusedSparseSiblings` needs to compute this layer together with its
        siblings in one call. Why not ``kernel.apply``: under torch.compile every object the step
        reads is guarded before each step; this path reads a few ints of the cached state (the
        kernel object, shared by all layers, cost one Python-level identity guard per layer)."""
        if (self.sparsity <= 0.0 or self.mode != "topk" or not self.use_kernel or self.input_rotation is not None
                or x.dtype not in NATIVE_IO_DTYPES):
            return None
        cached = self._kernel_state
        if cached is None or cached[2] != (x.device, x.dtype, self.sparsity, self.criterion):
            self._state_for(x)  # (re)prepares: eagerly, before the step is compiled
            cached = self._kernel_state
        state = cached[1]
        return state if getattr(state, "handle", None) is not None else None

    def _layout(self) -> ActivationSparseLayout:
        base = self.base.layout if isinstance(self.base, QuantLinear) else DenseLayout(self.out_features,
                                                                                      self.in_features)
        density = keep_count(self.in_features, self.sparsity) / self.in_features
        return ActivationSparseLayout(base, density, self.criterion)  # type: ignore[arg-type]

    def _state_for(self, x: torch.Tensor) -> tuple[Any, Any, ActivationSparseLayout]:
        """Kernel and its prepared weights, cached per (device, dtype, sparsity, criterion)."""
        key = (x.device, x.dtype, self.sparsity, self.criterion)
        cached = self._kernel_state
        if cached is not None and cached[2] == key:  # the hot path at decode: no new layout object
            return cached[0], cached[1], cached[3]
        layout = self._layout()
        kernel = None
        # Batch-1 decode on CPU: the lean kernels (packed int gather for an int4/int8 base, else the
        # bag over a dense copy), unless LLMCOMP_KERNEL forces a choice.
        if x.device.type == "cpu" and not os.environ.get("LLMCOMP_KERNEL"):
            prefs = ((CPU_PACKED_KERNEL,) if isinstance(self.base, QuantLinear) else ()) + (CPU_DECODE_KERNEL,)
            for prefer in prefs:
                try:
                    kernel = select_kernel(layout, x.device, x.dtype, prefer=prefer)
                    break
                except ValueError:  # e.g. float64, no C compiler, int3
                    continue
        if kernel is None:  # the priority list (the reference kernel last) picks one that can run it
            kernel = select_kernel(layout, x.device, x.dtype)
        if isinstance(self.base, QuantLinear):
            base: Any = QuantTensors(self.base.weight_packed, self.base.weight_scale, self.base.weight_zero_point)
        else:
            base = self.base.weight.data
        state = kernel.prepare(layout, ActivationSparseTensors(base, self.col_norms.float()), x.dtype)
        self._kernel_state = (kernel, state, key, layout)
        return kernel, state, layout

    def invalidate_kernel_cache(self) -> None:
        self._kernel_state = None
        if isinstance(self.base, QuantLinear):
            self.base.invalidate_kernel_cache()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel_state = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> ActivationSparseLinear:
        self._kernel_state = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, criterion={self.criterion}, "
                f"sparsity={self.sparsity:.3f}, mode={self.mode}, grid={list(self.grid)}, "
                f"rotation={self.input_rotation is not None}")


class FusedSparseSiblings(nn.Module):
    """Sibling :class:`ActivationSparseLinear` layers that read the same input (q/k/v, gate/up) as
    one module whose output is the concatenation of theirs (what the runtime's sibling fusion,
    :mod:`llmcomp.runtime.fuse`, does for plain int layers).

    At batch-1 decode, when every sibling runs the packed kernel's C++ operator, one call computes
    all of them, each with its own selection, weights and sparsity: the runtime then makes four
    sparse calls per decoder layer instead of seven, as the dense int4 path does (the per-call
    cost of dispatch, guards and wrapper code is comparable to the kernel's on small layers).
    Otherwise (prefill, another kernel, the transform) each sibling runs as it would alone. The
    siblings stay the model's (this module is not in the model tree; holding them in a ModuleList
    rather than a plain list made torch.compile's guard check about 3x cheaper); their
    configuration is read at every call, so ``configure()`` after fusing takes effect."""

    def __init__(self, modules: list[ActivationSparseLinear]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(x.shape[:-1]) == 1 and x.dtype in NATIVE_IO_DTYPES:
            states = [m.packed_decode_state(x) for m in self.parts]
            if all(st is not None for st in states):
                y = packed_siblings(x.reshape(-1).contiguous(), states, [m.base.bias for m in self.parts])
                return y.reshape(*x.shape[:-1], y.shape[0])
        return torch.cat([m(x) for m in self.parts], dim=-1)


def base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight of a wrapped module (dequantized for QuantLinear)."""
    if isinstance(base, QuantLinear):
        return base.dequantized_weight(dtype)
    return base.weight.detach().to(dtype)


def base_device(base: nn.Module) -> torch.device:
    t = base.weight if isinstance(base, nn.Linear) else base.weight_packed
    return t.device
