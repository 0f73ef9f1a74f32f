"""``MPOLinear``: a linear layer whose weight is a matrix product operator (tensor-train matrix).

The weight ``W [out, in]`` with ``out = m_1 ... m_d`` and ``in = n_1 ... n_d`` is stored as ``d``
cores ``G_k [r_{k-1}, m_k, n_k, r_k]`` (``r_0 = r_d = 1``):

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

(row-major multi-indices). The cores are the checkpoint tensors (``core_0`` .. ``core_{d-1}``).
They are ``nn.Parameter``s with ``requires_grad=False`` so that healing can switch them to
trainable without changing names or storage; they are saved like buffers.

Quantized cores (CompactifAI's tensorization + quantization setting; spec ``core_bits`` 4 or 8):
each core, viewed as the matrix ``[r_{k-1} m_k, n_k r_k]``, is stored in the int group layout of
:mod:`llmcomp.intquant` (groups of ``core_group_size`` along the second axis): ``core_k_packed``,
``core_k_scale`` and, when asymmetric, ``core_k_zero_point``. The forward dequantizes the cores
(small: about the size of the kept parameters) and contracts them as above; quantized cores are
not trainable (heal first, then quantize).

Why a contraction rather than a rebuild: for decode the forward applies the cores to the input one
at a time (:func:`mpo_apply`, one small matmul per core), never forming ``W``. For calls with many
rows (long prefill, training) where contracting every row costs more multiply-adds than building
``W`` once, the forward builds it transiently for that call (:meth:`MPOLinear.uses_contraction`
counts both; ``LLMCOMP_MPO_FORWARD=contract`` forbids it). :meth:`MPOLinear.dequantized_weight`
gives the dense weight to loaders and exporters that need one (vLLM, compressed-tensors).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from llmcomp import intquant
from llmcomp.modules.registry import register_module
from llmcomp.scheme import ModuleSpec, register_spec

MIN_CORES, MAX_CORES = 2, 4
# "auto": contract unless a transient rebuild costs fewer multiply-adds for the call's rows;
# "contract": always contract (never build the dense weight in forward).
FORWARD_MODE = os.environ.get("LLMCOMP_MPO_FORWARD", "auto")
CORE_BITS = (4, 8)
DEFAULT_CORE_GROUP = 64


@register_spec
class MPOSpec(ModuleSpec):
    """A tensor-train matrix: dimension factors and internal bond dimensions (docs/TENSORNET.md)."""

    kind: Literal["mpo"] = "mpo"
    out_factors: list[int] = Field(min_length=MIN_CORES, max_length=MAX_CORES)
    in_factors: list[int] = Field(min_length=MIN_CORES, max_length=MAX_CORES)
    ranks: list[int] = Field(description="bond dimensions r_1 .. r_{d-1} between consecutive cores")
    core_bits: Literal[4, 8] | None = Field(None, description="int bits of the stored cores (None: float cores)")
    core_group_size: int = Field(DEFAULT_CORE_GROUP,
                                 description="group length along a core's [r m, n s] rows; -1 = whole rows")
    core_symmetric: bool = Field(False, description="quantized cores without zero points")

    @model_validator(mode="after")
    def _consistent(self) -> MPOSpec:
        d = len(self.out_factors)
        if len(self.in_factors) != d:
            raise ValueError(f"in_factors has {len(self.in_factors)} entries, out_factors {d}")
        if len(self.ranks) != d - 1:
            raise ValueError(f"ranks needs {d - 1} entries for {d} cores, got {len(self.ranks)}")
        if any(f < 1 for f in (*self.out_factors, *self.in_factors)) or any(r < 1 for r in self.ranks):
            raise ValueError("factors and ranks must be positive")
        if math.prod(self.out_factors) != self.out_features or math.prod(self.in_factors) != self.in_features:
            raise ValueError("the factors' products must equal out_features and in_features")
        if self.core_group_size != -1 and self.core_group_size < 1:
            raise ValueError(f"core_group_size must be positive or -1, got {self.core_group_size}")
        return self

    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        bonds = [1, *self.ranks, 1]
        return [(bonds[k], m, n, bonds[k + 1]) for k, (m, n) in enumerate(zip(self.out_factors, self.in_factors,
                                                                                strict=True))]


def core_matrix_shape(shape: tuple[int, int, int, int]) -> tuple[int, int]:
    """The 2-D view ``[r m, n s]`` a quantized core is grouped and stored in."""
    r, m, n, s = shape
    return r * m, n * s


def mirrored_shapes(shapes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Core shapes of the mirrored MPO (cores reversed, bonds swapped)."""
    return [(s, m, n, r) for r, m, n, s in reversed(shapes)]


def contract_right_to_left(shapes: list[tuple[int, int, int, int]]) -> bool:
    """Whether contracting right to left costs fewer multiply-adds (the direction :func:`mpo_apply` takes)."""
    return contraction_macs(mirrored_shapes(shapes)) < contraction_macs(shapes)


def mpo_apply(x: torch.Tensor, cores: list[torch.Tensor], right_to_left: bool | None = None) -> torch.Tensor:
    """``x @ W.T`` for the MPO ``cores``, without forming ``W``. ``x [..., in]`` -> ``[..., out]``.

    Contracts left to right or right to left, whichever costs fewer multiply-adds (for unbalanced
    factors the two differ by orders of magnitude); right to left is left to right on the mirrored
    MPO (cores reversed, bonds swapped), whose matrix is ``W`` with digit-reversed indices.
    ``right_to_left`` passes a direction planned once (:class:`MPOLinear` does, so its forward has
    no per-call shape arithmetic for ``torch.compile`` to trace); None decides here.
    """
    shapes = [tuple(c.shape) for c in cores]
    if right_to_left is None:
        right_to_left = contract_right_to_left(shapes)
    if not right_to_left:
        return _contract(x, cores)
    mirrored = [c.permute(3, 1, 2, 0) for c in reversed(cores)]
    x_rev = _digit_reverse(x, [s[2] for s in shapes])
    return _digit_reverse(_contract(x_rev, mirrored), [s[1] for s in reversed(shapes)])


def _digit_reverse(x: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """Reorder the last dimension (multi-index over ``factors``, row-major) to reversed digit order."""
    lead, d = x.shape[:-1], len(factors)
    t = x.reshape(-1, *factors).permute(0, *range(d, 0, -1))
    return t.reshape(*lead, x.shape[-1])


def _contract(x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """Left-to-right contraction, one matmul per core. The running tensor is ``[B, P, r, n_k, Q]``:
    ``P`` = output indices produced so far, ``r`` the open bond, ``n_k`` the input index the next
    core consumes, ``Q`` the input indices still to go; core ``k`` as a ``[r n_k, m_k r_k]`` matrix
    consumes ``(r, n_k)``.
    """
    lead = x.shape[:-1]
    rows = math.prod(lead) if lead else 1
    in_features = x.shape[-1]
    n_first = cores[0].shape[2]
    t = x.reshape(rows, 1, 1, n_first, in_features // n_first)
    for k, core in enumerate(cores):
        r, m, n, s = core.shape
        b, p, _, _, q = t.shape
        mat = core.permute(0, 2, 1, 3).reshape(r * n, m * s)
        out = t.permute(0, 1, 4, 2, 3).reshape(b * p * q, r * n) @ mat  # [B P Q, m s]
        t = out.reshape(b, p, q, m, s).permute(0, 1, 3, 4, 2)  # [B, P, m, s, Q]
        if k + 1 < len(cores):
            n_next = cores[k + 1].shape[2]
            t = t.reshape(b, p * m, s, n_next, q // n_next)
        else:
            t = t.reshape(b, p * m)
    return t.reshape(*lead, t.shape[-1])


def contraction_macs(shapes: list[tuple[int, int, int, int]]) -> int:
    """Multiply-adds per input row of :func:`mpo_apply` (the sum over cores of ``P Q r n m s``)."""
    total, p, q = 0, 1, math.prod([s[2] for s in shapes])
    for r, m, n, s in shapes:
        q //= n
        total += p * q * r * n * m * s
        p *= m
    return total


def rebuild_macs(shapes: list[tuple[int, int, int, int]]) -> int:
    """Multiply-adds of :func:`mpo_to_matrix` (left to right)."""
    total, left = 0, 1
    for r, m, n, s in shapes:
        total += left * r * m * n * s
        left *= m * n
    return total


def mpo_to_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """The dense ``W [out, in]`` the cores represent (cores' dtype)."""
    d = len(cores)
    t = cores[0]  # [1, m1, n1, r1]
    for core in cores[1:]:
        t = torch.tensordot(t, core, dims=([t.dim() - 1], [0]))  # [..., m_k, n_k, r_k]
    t = t.reshape(*t.shape[1:-1])  # [m1, n1, m2, n2, ...]
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    t = t.permute(perm)
    out = math.prod([c.shape[1] for c in cores])  # a list: dynamo cannot trace math.prod over a generator
    return t.reshape(out, -1)


def mpo_params(shapes: list[tuple[int, int, int, int]]) -> int:
    return sum(math.prod(s) for s in shapes)


@register_module("mpo")
class MPOLinear(nn.Module):
    """Drop-in ``nn.Linear`` over MPO cores (CompactifAI-style tensor network layer)."""

    kind = "mpo"

    def __init__(self, spec: MPOSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.out_factors, self.in_factors = list(spec.out_factors), list(spec.in_factors)
        self.ranks = list(spec.ranks)
        self.core_bits, self.core_symmetric = spec.core_bits, spec.core_symmetric
        self.core_shapes = spec.core_shapes()
        self.core_group_sizes: list[int] = []
        for k, shape in enumerate(self.core_shapes):
            if self.core_bits is None:
                self.register_parameter(f"core_{k}", nn.Parameter(torch.zeros(shape, dtype=dtype),
                                                                  requires_grad=False))
                continue
            rows, cols = core_matrix_shape(shape)
            group = intquant.effective_group_size(spec.core_group_size, cols)
            self.core_group_sizes.append(group)
            packed_dtype = torch.int8 if self.core_bits == 8 else torch.int32
            self.register_buffer(f"core_{k}_packed", torch.zeros(intquant.packed_shape(rows, cols, self.core_bits),
                                                                 dtype=packed_dtype))
            groups = intquant.num_groups(cols, group)
            self.register_buffer(f"core_{k}_scale", torch.ones(rows, groups, dtype=dtype))
            if not self.core_symmetric:
                self.register_buffer(f"core_{k}_zero_point", torch.zeros(rows, groups, dtype=torch.int8))
        self.core_group_size = spec.core_group_size
        # The forward's plan, fixed by the shapes: planned here so forward does no shape arithmetic
        # (torch.compile broke the graph on it and then recompiled the caller per layer).
        self.right_to_left = contract_right_to_left(self.core_shapes)
        self.contract_macs = contraction_macs(self.core_shapes)
        self.rebuild_macs = rebuild_macs(self.core_shapes)
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=dtype), requires_grad=False) if spec.bias \
            else None

    @classmethod
    def from_spec(cls, spec: MPOSpec, dtype: torch.dtype) -> MPOLinear:
        return cls(spec, dtype)

    @classmethod
    def from_cores(cls, cores: list[torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype) -> MPOLinear:
        """Build from decomposed cores (what the pass produces); cast to ``dtype``."""
        spec = MPOSpec(
            in_features=math.prod(c.shape[2] for c in cores), out_features=math.prod(c.shape[1] for c in cores),
            bias=bias is not None, out_factors=[c.shape[1] for c in cores], in_factors=[c.shape[2] for c in cores],
            ranks=[c.shape[3] for c in cores[:-1]],
        )
        module = cls(spec, dtype)
        with torch.no_grad():
            for k, core in enumerate(cores):
                getattr(module, f"core_{k}").copy_(core.to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach().to(dtype))
        return module

    @classmethod
    def from_quantized_cores(cls, qcores: list[intquant.QuantizedWeight], shapes: list[tuple[int, int, int, int]],
                             group_size: int, bias: torch.Tensor | None, dtype: torch.dtype) -> MPOLinear:
        """Build from quantized cores: ``qcores[k]`` is the ``[r m, n s]`` view of core ``k`` of
        ``shapes``, quantized with the spec's ``group_size`` (-1 = whole rows); one bit width and
        symmetry for all. Scales are cast to ``dtype``."""
        first = qcores[0]
        if any((q.bits, q.zero is None) != (first.bits, first.zero is None) for q in qcores):
            raise ValueError("all cores of one MPO need the same bit width and symmetry")
        spec = MPOSpec(
            in_features=math.prod(s[2] for s in shapes), out_features=math.prod(s[1] for s in shapes),
            bias=bias is not None, out_factors=[s[1] for s in shapes], in_factors=[s[2] for s in shapes],
            ranks=[s[3] for s in shapes[:-1]], core_bits=first.bits, core_group_size=group_size,
            core_symmetric=first.zero is None,
        )
        module = cls(spec, dtype)
        with torch.no_grad():
            for k, (qw, shape) in enumerate(zip(qcores, shapes, strict=True)):
                if qw.shape != core_matrix_shape(shape) or qw.group_size != module.core_group_sizes[k]:
                    raise ValueError(f"quantized core {k} {qw.shape} / group {qw.group_size} does not match {shape}")
                getattr(module, f"core_{k}_packed").copy_(intquant.pack(qw.q, qw.bits))
                getattr(module, f"core_{k}_scale").copy_(qw.scale.to(dtype))
                if qw.zero is not None:
                    getattr(module, f"core_{k}_zero_point").copy_(qw.zero)
            if bias is not None:
                module.bias.copy_(bias.detach().to(dtype))
        return module

    def spec(self) -> MPOSpec:
        return MPOSpec(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                       out_factors=self.out_factors, in_factors=self.in_factors, ranks=self.ranks,
                       core_bits=self.core_bits, core_group_size=self.core_group_size,
                       core_symmetric=self.core_symmetric)

    def quantized_core(self, k: int) -> intquant.QuantizedWeight:
        """Core ``k``'s stored codes and scales, unpacked (quantized cores only)."""
        if self.core_bits is None:
            raise ValueError("this MPO stores float cores")
        cols = core_matrix_shape(self.core_shapes[k])[1]
        q = intquant.unpack(getattr(self, f"core_{k}_packed"), self.core_bits, cols)
        zero = None if self.core_symmetric else getattr(self, f"core_{k}_zero_point")
        return intquant.QuantizedWeight(q=q, scale=getattr(self, f"core_{k}_scale"), zero=zero, bits=self.core_bits,
                                        group_size=self.core_group_sizes[k])

    @property
    def cores(self) -> list[torch.Tensor]:
        """The cores the layer computes with (dequantized from their int codes when quantized)."""
        if self.core_bits is None:
            return [getattr(self, f"core_{k}") for k in range(len(self.out_factors))]
        out = []
        for k, shape in enumerate(self.core_shapes):
            qw = self.quantized_core(k)
            out.append(intquant.dequantize_qw(qw, qw.scale.dtype).reshape(shape))
        return out

    @property
    def num_params(self) -> int:
        """Stored weight parameters (core entries, bias excluded)."""
        return sum(math.prod(s) for s in self.core_shapes)

    @property
    def storage_bytes(self) -> int:
        """Bytes of the stored core tensors (codes, scales, zero points; bias excluded)."""
        return sum(t.numel() * t.element_size() for name, t in self.state_dict().items() if name != "bias")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight the cores represent (for loaders that need one, e.g. vLLM)."""
        with torch.no_grad():
            return mpo_to_matrix([c.to(dtype) for c in self.cores])

    def uses_contraction(self, rows: int) -> bool:
        """Contract row by row (decode, small batches) unless rebuilding the weight once for these
        ``rows`` costs fewer multiply-adds (long prefill, training), or ``LLMCOMP_MPO_FORWARD=contract``."""
        if FORWARD_MODE == "contract":
            return True
        return rows * self.contract_macs <= self.rebuild_macs + rows * self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cores = self.cores
        h = x.to(cores[0].dtype)
        if self.uses_contraction(h.numel() // self.in_features):
            y = mpo_apply(h, cores, self.right_to_left)
        else:  # transient: built for this call and freed after it, never kept
            y = F.linear(h, mpo_to_matrix(cores))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"out_factors={self.out_factors}, in_factors={self.in_factors}, ranks={self.ranks}, "
                f"core_bits={self.core_bits}, bias={self.bias is not None}")
