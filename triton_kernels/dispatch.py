"""One dispatch point between compressed modules and GEMM kernels, keyed by the *kind* of a layout.

A layout describes one compressed linear layer; its ``kind`` names the scheme family and is the
first thing kernels are matched on:

* :class:`QuantLayout` (``"int_affine"``): integer codes, ``w = (q - z) * s`` (:mod:`llmcomp.intquant`).
* :class:`CodebookLayout` (``"codebook"``): unsigned codes into a float table, ``w = lut[code] * s``.
* :class:`ActivationSparseLayout` (``"activation_sparse"``): a dense or int_affine weight of which
  only the input columns that matter for the current activations are read (TEAL / WINA).

Each kernel declares the kinds it runs (``kinds``, default ``{"int_affine"}``) and answers
``can_implement(layout, device, dtype) -> (ok, reason)``. Selection walks the per-device priority
list, skipping kernels of other kinds, and ends with the reference kernel of the layout's kind;
when nothing fits the error lists every candidate's reason. Kernels may repack weights once
(``prepare``) into whatever layout they run fastest on.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

from llmcomp import intquant

DENSE_BITS = 16  # marks an unquantized float weight (the base of an activation-sparse layer)
CODEBOOK_BITS = (2, 3, 4, 8)
CRITERIA = ("teal", "wina")
DEFAULT_KINDS = frozenset({"int_affine"})  # what a kernel without a ``kinds`` attribute runs


# -- layouts and tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantLayout:
    """What a kernel needs to know about one integer-quantized linear layer."""

    kind: ClassVar[str] = "int_affine"
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


@dataclass(frozen=True)
class DenseLayout:
    """An unquantized float weight ``[N, K]`` (only used as the base of an activation-sparse layer)."""

    kind: ClassVar[str] = "dense"
    bits: ClassVar[int] = DENSE_BITS
    out_features: int
    in_features: int


@dataclass(frozen=True)
class CodebookLayout:
    """A codebook layer: ``w[n, k] = lut[n or 0, code[n, k]] * scale[n, k // group_size]``."""

    kind: ClassVar[str] = "codebook"
    out_features: int
    in_features: int
    bits: int  # code width, one of CODEBOOK_BITS (the table has 2**bits entries)
    group_size: int  # effective group length along K of the scales (in_features for per-channel)
    per_row_table: bool  # lut is [N, 2**bits] (else one table [2**bits] for the whole tensor)

    def __post_init__(self) -> None:
        if self.bits not in CODEBOOK_BITS:
            raise ValueError(f"codebook codes must have one of {CODEBOOK_BITS} bits, got {self.bits}")
        if not 1 <= self.group_size <= self.in_features:
            raise ValueError(f"group_size must be in [1, {self.in_features}], got {self.group_size}")

    @property
    def num_groups(self) -> int:
        return intquant.num_groups(self.in_features, self.group_size)


@dataclass
class CodebookTensors:
    """Codes stored as in :mod:`llmcomp.kernels.lut_gemm` (uint8 ``[N, K]`` for 8 bits, else int32
    ``[N, ceil(K / (32 // bits))]`` packed along K, lowest bits first, codes as is)."""

    codes: torch.Tensor
    lut: torch.Tensor  # [2**bits] or [N, 2**bits], float
    scale: torch.Tensor | None  # [N, groups], or None: the table holds the weight values


@dataclass(frozen=True)
class ActivationSparseLayout:
    """A linear layer that reads only ``keep = ceil(density * K)`` input columns per call.

    Selection (the semantics every kernel of this kind implements, see :func:`select_columns`):
    flatten the leading dims of ``x`` to ``[M, K]``, score column k by ``max_m |x[m, k]|`` (teal)
    or ``max_m |x[m, k]| * ||W[:, k]||_2`` (wina), keep the ``keep`` best-scored columns, drop the
    rest *for all M rows*, then ``y = x[:, idx] @ W[:, idx].T + bias``. At M = 1 (decode) this is
    exactly per-token TEAL / WINA; for M > 1 the selection is shared by the rows of one call.
    """

    kind: ClassVar[str] = "activation_sparse"
    base: QuantLayout | DenseLayout
    density: float  # fraction of input columns kept, in (0, 1]
    criterion: Literal["teal", "wina"] = "teal"

    def __post_init__(self) -> None:
        if self.base.kind not in ("int_affine", "dense"):
            raise ValueError(f"an activation-sparse base must be int_affine or dense, got {self.base.kind!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def bits(self) -> int:
        return self.base.bits  # DENSE_BITS for a dense base

    @property
    def dense(self) -> bool:
        return self.base.kind == "dense"

    @property
    def keep(self) -> int:
        """Columns kept per call: ``ceil(density * K)`` (float noise below 1e-9 ignored), >= 1."""
        k = self.in_features
        return max(1, min(k, math.ceil(self.density * k - 1e-9)))


@dataclass
class ActivationSparseTensors:
    """The base layer's tensors plus, optionally, the column norms WINA scores with."""

    base: torch.Tensor | QuantTensors  # dense float [N, K], or the int_affine tensors
    col_norms: torch.Tensor | None = None  # [K] = ||W[:, k]||_2; computed from the weight when None


# -- pure-torch helpers shared by the reference kernels and the fast ones ---------------------------
def quant_weight(layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` weight of an int_affine layer, in ``dtype`` (unpacked on the CPU, where intquant runs)."""
    q = intquant.unpack(tensors.packed.cpu(), layout.bits, layout.in_features).to(tensors.packed.device)
    return intquant.dequantize(q, tensors.scale, tensors.zero, layout.group_size, dtype=dtype).contiguous()


def unpack_codes(codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Stored codebook codes -> int64 ``[N, K]`` in ``[0, 2**bits)``."""
    if bits == 8:
        return codes.to(torch.int64)  # uint8 storage; intquant.unpack would read it as signed
    return intquant.unpack(codes.cpu(), bits, in_features).to(codes.device, torch.int64) + 2 ** (bits - 1)


def check_codebook(layout: CodebookLayout, tensors: CodebookTensors) -> None:
    entries, n = 2**layout.bits, layout.out_features
    want = (n, entries) if layout.per_row_table else (entries,)
    if tuple(tensors.lut.shape) != want:
        got = list(tensors.lut.shape)
        raise ValueError(f"lut must be {list(want)} (per_row_table={layout.per_row_table}), got {got}")
    if tensors.scale is not None and tuple(tensors.scale.shape) != (n, layout.num_groups):
        raise ValueError(f"scale must be [{n}, {layout.num_groups}], got {list(tensors.scale.shape)}")


def codebook_weight(layout: CodebookLayout, tensors: CodebookTensors, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` weight ``lut[code] * scale`` (computed in float32), in ``dtype``."""
    check_codebook(layout, tensors)
    codes = unpack_codes(tensors.codes, layout.bits, layout.in_features)
    table = tensors.lut.float().reshape(-1, 2**layout.bits).expand(layout.out_features, -1)
    w = torch.gather(table.to(codes.device), 1, codes)
    if tensors.scale is not None:
        group = torch.arange(layout.in_features, device=w.device) // layout.group_size
        w = w * tensors.scale.float().to(w.device)[:, group]
    return w.to(dtype).contiguous()


def sparse_base_weight(layout: ActivationSparseLayout, tensors: ActivationSparseTensors, dtype: torch.dtype):
    """The dense ``[N, K]`` weight behind an activation-sparse layer, in ``dtype``."""
    if layout.dense:
        if not isinstance(tensors.base, torch.Tensor):
            raise TypeError("a dense activation-sparse layer needs a float weight tensor as its base")
        return tensors.base.to(dtype).contiguous()
    if not isinstance(tensors.base, QuantTensors):
        raise TypeError("an int_affine activation-sparse layer needs QuantTensors as its base")
    return quant_weight(layout.base, tensors.base, dtype)


def column_norms(layout: ActivationSparseLayout, tensors: ActivationSparseTensors) -> torch.Tensor | None:
    """float32 ``[K]`` column norms ``||W[:, k]||_2`` for wina (given or computed), None for teal."""
    if layout.criterion == "teal":
        return None
    norms = tensors.col_norms
    if norms is None:
        norms = sparse_base_weight(layout, tensors, torch.float32).norm(dim=0)
    if tuple(norms.shape) != (layout.in_features,):
        raise ValueError(f"col_norms must be [{layout.in_features}], got {list(norms.shape)}")
    return norms.float().contiguous()


def select_columns(x: torch.Tensor, keep: int, col_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int32, ascending) of the ``keep`` input columns with the largest score.

    Score = ``max over rows |x|`` (TEAL), times ``col_norms[k] = ||W[:, k]||`` when given (WINA),
    computed in float32; ties go to ``torch.topk``'s choice. One selection for all rows of ``x``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:  # nothing to multiply; any selection will do
        score = torch.zeros(x2.shape[1], device=x.device)
    else:
        score = x2.abs().amax(dim=0).float()
    if col_norms is not None:
        score = score * col_norms.to(score.device).float()
    keep = max(0, min(keep, score.numel()))
    return torch.topk(score, keep).indices.sort().values.to(torch.int32)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = w.to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# -- kernels ----------------------------------------------------------------------------------------
class Kernel(Protocol):
    name: str
    kinds: frozenset[str]  # layout kinds this kernel runs (DEFAULT_KINDS when absent)

    def can_implement(self, layout: Any, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]: ...

    def prepare(self, layout: Any, tensors: Any, dtype: torch.dtype) -> Any: ...

    def apply(self, x: torch.Tensor, layout: Any, state: Any, bias: torch.Tensor | None) -> torch.Tensor: ...


def kernel_kinds(kernel: Kernel) -> frozenset[str]:
    return frozenset(getattr(kernel, "kinds", DEFAULT_KINDS))


class ReferenceKernel:
    """Dequantize the whole matrix, then a plain matmul: slow, obviously correct, runs anywhere."""

    name = "reference"
    kinds = frozenset({"int_affine"})

    def can_implement(self, layout: Any, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return True, ""

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
        return quant_weight(layout, tensors, dtype)

    def apply(self, x: torch.Tensor, layout: Any, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        return _linear(x, state, bias)


class CodebookReferenceKernel(ReferenceKernel):
    """``lut[code] * scale`` into a dense matrix once, then a plain matmul."""

    name = "reference_codebook"
    kinds = frozenset({"codebook"})

    def prepare(self, layout: CodebookLayout, tensors: CodebookTensors, dtype: torch.dtype) -> torch.Tensor:
        return codebook_weight(layout, tensors, dtype)


@dataclass
class SparseReferenceState:
    weight: torch.Tensor  # dense [N, K], activation dtype
    col_norms: torch.Tensor | None  # float32 [K] (wina) or None (teal)


class ActivationSparseReferenceKernel:
    """The semantics of :class:`ActivationSparseLayout`, spelled out: select, zero the rest of x, dense matmul."""

    name = "reference_activation_sparse"
    kinds = frozenset({"activation_sparse"})

    def can_implement(self, layout: Any, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return True, ""

    def prepare(self, layout: ActivationSparseLayout, tensors: ActivationSparseTensors, dtype: torch.dtype):
        return SparseReferenceState(sparse_base_weight(layout, tensors, dtype), column_norms(layout, tensors))

    def apply(self, x: torch.Tensor, layout: ActivationSparseLayout, state: SparseReferenceState, bias):
        idx = select_columns(x, layout.keep, state.col_norms).to(x.device, torch.int64)
        keep = torch.zeros(layout.in_features, dtype=torch.bool, device=x.device)
        keep[idx] = True
        return _linear(x.masked_fill(~keep, 0), state.weight, bias)


# -- registry and selection -------------------------------------------------------------------------
_KERNELS: dict[str, Kernel] = {}
_PRIORITY: dict[str, list[str]] = {"cuda": [], "cpu": [], "other": []}
_REFERENCES: dict[str, str] = {}  # kind -> name of its last-resort kernel (any device)


def register_kernel(kernel: Kernel, devices: tuple[str, ...], first: bool = True, reference: bool = False) -> None:
    """Add a kernel to the priority lists of ``devices`` ("cuda", "cpu", "other").

    ``reference=True`` makes it the last resort of its kinds on every device.
    """
    if kernel.name in _KERNELS and _KERNELS[kernel.name] is not kernel:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    for dev in devices:
        order = _PRIORITY[dev]
        if kernel.name not in order:
            order.insert(0, kernel.name) if first else order.append(kernel.name)
    if reference:
        for kind in kernel_kinds(kernel):
            _REFERENCES[kind] = kernel.name


def _device_key(device: torch.device) -> str:
    return device.type if device.type in ("cuda", "cpu") else "other"


_OVERRIDE: list[list[str]] = []  # stack of preferred_kernels() lists, innermost last


@contextlib.contextmanager
def preferred_kernels(names: str | list[str] | None) -> Iterator[None]:
    """Within the block, kernels are selected as if ``LLMCOMP_KERNEL`` held ``names``.

    Lets one process build models that run different kernels side by side (a benchmark); a
    module keeps the kernel it selected on its first forward until its weights change.
    """
    _OVERRIDE.append(_parse_names(names) if names else [])
    try:
        yield
    finally:
        _OVERRIDE.pop()


def check_kernel_names(names: str) -> str:
    """``names`` (comma-separated) normalised, or a ValueError naming an unknown kernel (for CLIs)."""
    _load_builtin_kernels()
    return ",".join(_parse_names(names))


def _parse_names(names: str | list[str]) -> list[str]:
    items = names.split(",") if isinstance(names, str) else names
    found = [n.strip() for n in items if n.strip()]
    for name in found:
        if name not in _KERNELS:
            raise ValueError(f"unknown kernel {name!r}; registered: {sorted(_KERNELS)}")
    return found


def _preference(kind: str, prefer: str | list[str] | None) -> list[str]:
    """The named kernels (``prefer``, else the innermost preferred_kernels(), else ``LLMCOMP_KERNEL``)
    that run ``kind``, in order. Names of kernels of other kinds are skipped, so one setting can name
    e.g. ``triton,triton_lut`` for a model that mixes kinds; an unknown name is an error."""
    if prefer:
        names = _parse_names(prefer)
        for name in names:
            kinds = kernel_kinds(_KERNELS[name])
            if len(names) == 1 and kind not in kinds:
                raise ValueError(f"kernel {name!r} runs {'/'.join(sorted(kinds))} layouts, not {kind!r}")
    elif _OVERRIDE and _OVERRIDE[-1]:
        names = _OVERRIDE[-1]
    else:
        names = _parse_names(os.environ.get("LLMCOMP_KERNEL", ""))
    return [n for n in names if kind in kernel_kinds(_KERNELS[n])]


def select_kernel(
    layout: Any, device: torch.device, dtype: torch.dtype, prefer: str | list[str] | None = None
) -> Kernel:
    """Pick the first kernel of ``device``'s priority list that runs ``layout.kind`` and can run ``layout``.

    ``prefer`` (or :func:`preferred_kernels`, or the ``LLMCOMP_KERNEL`` environment variable) names
    kernels to force, comma-separated: the first of them that runs the layout's kind and can run the
    layout is used (so ``cpu_w4a8,cpu_int8pack`` serves a model mixing int4 and int8 layers); when
    none of the named kernels of that kind can, it is a ValueError. Kernels registered without a
    device (opt-in ones) are only ever chosen this way.
    """
    _load_builtin_kernels()
    kind = layout.kind
    named = _preference(kind, prefer)
    if named:
        why = []
        for name in named:
            ok, reason = _KERNELS[name].can_implement(layout, device, dtype)
            if ok:
                return _KERNELS[name]
            why.append(f"{name}: {reason}")
        raise ValueError(f"kernel {' / '.join(named)} cannot run {layout}: " + "; ".join(why))
    reasons = []
    candidates = _PRIORITY[_device_key(device)] + ([_REFERENCES[kind]] if kind in _REFERENCES else [])
    for name in candidates:
        kernel = _KERNELS[name]
        if kind not in kernel_kinds(kernel):
            reasons.append(f"{name}: runs {'/'.join(sorted(kernel_kinds(kernel)))}, not {kind}")
            continue
        ok, reason = kernel.can_implement(layout, device, dtype)
        if ok:
            return kernel
        reasons.append(f"{name}: {reason}")
    if kind not in _REFERENCES:
        reasons.append(f"no reference kernel for kind {kind!r} (kinds with one: {', '.join(sorted(_REFERENCES))})")
    raise RuntimeError(f"no kernel can run {layout} on {device}: " + "; ".join(reasons))


_BUILTINS_LOADED = False
_BUILTIN_MODULES = ("llmcomp.kernels.cpu", "llmcomp.kernels.triton_gemm", "llmcomp.kernels.lut_gemm",
                    "llmcomp.kernels.sparse_gemv", "llmcomp.kernels.codebook_cpu", "llmcomp.kernels.act_sparse_cpu",
                    "llmcomp.kernels.w4a8_cpu")


def _load_builtin_kernels() -> None:
    """Import kernel modules lazily so ``import llmcomp`` stays light and triton stays optional."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for ref in (ReferenceKernel(), CodebookReferenceKernel(), ActivationSparseReferenceKernel()):
        register_kernel(ref, devices=(), reference=True)
    import importlib

    for module in _BUILTIN_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # the module itself not written yet / triton missing
            if exc.name not in (module, "triton"):
                raise
            continue
        mod.register()
