"""Mixed-precision GEMM on CUDA with Triton: int2/3/4/8 weights (or LUT codes) x fp16/bf16/fp32.

``prepare_weights`` repacks a layer once from the storage layout of :mod:`llmcomp.intquant`
(N-major, packed along K) into K-major tensors, so every K block of the kernel reads whole,
contiguous rows of N. ``quant_matmul`` dequantizes each weight tile in fp32 inside the K loop
right before ``tl.dot`` (fp32 accumulation). For M <= 16 it splits K across programs (decode).

The Triton kernels are decorated lazily (:func:`jit_kernels`) because ``TRITON_INTERPRET`` is read
at decoration time; tests set it before the first launch and run everything on the CPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch
import triton

from llmcomp import intquant
from llmcomp.kernels import triton_configs as tc
from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, register_kernel

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_BITS = (2, 3, 4, 8)
MIN_BF16_CAPABILITY = 8  # bf16 tl.dot needs Ampere or newer


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_JIT: ModuleType | None = None


def jit_kernels() -> ModuleType:
    """The module of ``@triton.jit`` kernels, decorated in the current interpreter mode."""
    global _JIT
    if _JIT is None:
        _JIT = importlib.import_module("llmcomp.kernels._jit")
    if _JIT.INTERPRETED != interpreting():
        _JIT = importlib.reload(_JIT)
    return _JIT


def dot_types(dtype: torch.dtype) -> tuple[Any, str]:
    """``(tl dtype fed to tl.dot, input_precision)`` for activations of ``dtype``.

    bf16 runs bf16 tensor-core dots on CUDA but fp32 dots under the interpreter (whose bf16
    arithmetic is wrong); fp32 activations use exact fp32 dots ("ieee"), not TF32. The precision
    flag only matters for fp32 operands; "tf32" is Triton's default and ignored for 16-bit ones.
    """
    tl = triton.language
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


@dataclass
class PackedWeights:
    """One layer repacked for :func:`quant_matmul` (all tensors on one device).

    ``weight``: int8 ``[K, N]`` (8-bit ints), uint8 ``[K, N]`` (8-bit LUT codes) or int32
    ``[ceil(K / (32 // bits)), N]`` (each word: ``32 // bits`` consecutive k, lowest bits first).
    ``scale``: fp32 ``[groups, N]``. ``zero``: fp32 ``[groups, N]`` = zero point + storage offset
    (asymmetric only). ``lut``: fp32 ``[1 or N, 2**bits]`` codebook; when set, ``weight`` holds
    unsigned codes and ``w = lut[code] * scale``.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    lut: torch.Tensor | None
    out_features: int
    in_features: int
    bits: int
    group_size: int

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeights:
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(
            self, weight=fn(self.weight), scale=fn(self.scale), zero=opt(self.zero), lut=opt(self.lut)
        )

    def to(self, device: torch.device | str) -> PackedWeights:
        return self._map(lambda t: t.to(device))

    def clone(self) -> PackedWeights:
        return self._map(torch.clone)


def prepare_weights(layout: QuantLayout, tensors: QuantTensors) -> PackedWeights:
    """Repack checkpoint tensors (storage layout of :mod:`llmcomp.intquant`) to K-major, once."""
    n, k, bits = layout.out_features, layout.in_features, layout.bits
    expected = intquant.packed_shape(n, k, bits)
    if tuple(tensors.packed.shape) != expected:
        raise ValueError(f"packed weight has shape {tuple(tensors.packed.shape)}, expected {expected}")
    group = intquant.effective_group_size(layout.group_size, k)
    weight = tensors.packed.to(torch.int8 if bits == 8 else torch.int32).t().contiguous()
    scale = tensors.scale.float().t().contiguous()
    zero = None
    if tensors.zero is not None:
        offset = 0 if bits == 8 else 2 ** (bits - 1)
        zero = (tensors.zero.float() + offset).t().contiguous()
    return PackedWeights(weight, scale, zero, None, n, k, bits, group)


def _check_input(x: torch.Tensor, w: PackedWeights) -> None:
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"activations must be fp16/bf16/fp32, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {w.in_features}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weights are on {w.device}")


def _launch(
    x2: torch.Tensor, w: PackedWeights, bias: torch.Tensor | None, cfg: tc.GemmConfig
) -> torch.Tensor:
    """Run the GEMM kernel once with ``cfg``; split-K partial sums are reduced here in fp32."""
    m, k = x2.shape
    n = w.out_features
    aligned = w.group_size >= k or w.group_size % cfg.block_k == 0  # else: gather scales per element
    vpw = 32 // w.bits
    word_tile = w.bits < 8 and vpw & (vpw - 1) == 0 and cfg.block_k % vpw == 0
    split = cfg.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), split) * cfg.block_k
    if split > 1:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    else:
        out = torch.empty((1, m, n), dtype=x2.dtype, device=x2.device)
    compute, precision = dot_types(x2.dtype)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    dummy = w.scale  # any valid pointer for arguments a constexpr switch leaves unused
    lut = w.lut if w.lut is not None else dummy
    jit_kernels().gemm_kernel[grid](
        x2, w.weight, w.scale, w.zero if w.zero is not None else dummy, lut,
        bias if bias is not None else dummy, out,
        m, n, k, w.group_size, k_per_split,
        x2.stride(0), w.weight.stride(0), w.scale.stride(0),
        lut.stride(0) if lut.shape[0] > 1 else 0, out.stride(1), out.stride(0),
        BITS=w.bits, HAS_ZERO=w.zero is not None, USE_LUT=w.lut is not None, HAS_BIAS=bias is not None,
        GROUP_ALIGNED=aligned, WORD_TILE=word_tile, COMPUTE=compute, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        return out.sum(dim=0).to(x2.dtype)
    return out[0]


def choose_config(x2: torch.Tensor, w: PackedWeights, bias: torch.Tensor | None) -> tc.GemmConfig:
    """Best config for this problem from the per-M-bucket candidates (timed once on CUDA)."""
    m, k = x2.shape
    on_cuda = x2.device.type == "cuda" and not interpreting()
    cands = tc.candidates(m, w.out_features, k, w.group_size, on_cuda, tc.num_sms(x2.device))
    key = (tc.m_bucket(m), w.out_features, k, w.bits, w.group_size, w.zero is not None, w.lut is not None,
           x2.dtype, x2.device, interpreting())
    return tc.tuned_config(key, cands, lambda cfg: _launch(x2, w, bias, cfg), on_cuda)


def quant_matmul(
    x: torch.Tensor, w: PackedWeights, bias: torch.Tensor | None = None, config: tc.GemmConfig | None = None
) -> torch.Tensor:
    """``x @ dequant(w).T + bias`` for ``x`` of shape ``[..., K]``; returns ``[..., N]`` in x's dtype.

    ``config`` forces block sizes (tests, benchmarks; ``split_k=0`` = automatic); by default one is
    chosen per M bucket.
    """
    _check_input(x, w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*lead, w.out_features))
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32).contiguous()
    if config is None:
        cfg = choose_config(x2, w, b)
    else:
        auto = tc.auto_split_k(config, x2.shape[0], w.out_features, w.in_features, tc.num_sms(x.device))
        cfg = replace(config, split_k=auto)
    return _launch(x2, w, b, cfg).reshape(*lead, w.out_features)


def runs_here(device: torch.device, dtype: torch.dtype, bits: int, allowed_bits: tuple[int, ...]) -> tuple[bool, str]:
    """The ``can_implement`` rules every Triton dispatch entry shares.

    CUDA (or any device under ``TRITON_INTERPRET=1``, for tests), ``bits`` in ``allowed_bits``,
    fp16/bf16/fp32 activations, bf16 only on compute capability >= 8.0.
    """
    if device.type != "cuda" and not interpreting():
        return False, f"needs a CUDA device (got {device.type}; TRITON_INTERPRET=1 allows CPU for tests)"
    if bits not in allowed_bits:
        return False, f"bits must be one of {allowed_bits}, got {bits}"
    if dtype not in ACT_DTYPES:
        return False, f"activation dtype must be fp16/bf16/fp32, got {dtype}"
    if device.type == "cuda" and dtype == torch.bfloat16 and not interpreting():
        major, _ = torch.cuda.get_device_capability(device)
        if major < MIN_BF16_CAPABILITY:
            return False, f"bf16 needs compute capability >= {MIN_BF16_CAPABILITY}.0, GPU has {major}.x"
    return True, ""


def move_state(state: Any, device: torch.device) -> None:
    """Move prepared weights to ``device`` in place (once: modules may prepare before ``.to(device)``)."""
    if state.device != device:
        moved = state.to(device)
        state.__dict__.update(moved.__dict__)


class TritonGemmKernel:
    """Dispatch entry (:mod:`llmcomp.kernels.dispatch`) for the Triton mixed-precision GEMM."""

    name = "triton"
    kinds = frozenset({"int_affine"})

    def can_implement(
        self, layout: QuantLayout, device: torch.device, dtype: torch.dtype
    ) -> tuple[bool, str]:
        return runs_here(device, dtype, layout.bits, INT_BITS)

    def prepare(self, layout: QuantLayout, tensors: QuantTensors, dtype: torch.dtype) -> PackedWeights:
        return prepare_weights(layout, tensors)

    def apply(
        self, x: torch.Tensor, layout: QuantLayout, state: Any, bias: torch.Tensor | None
    ) -> torch.Tensor:
        move_state(state, x.device)
        return quant_matmul(x, state, bias)


KERNEL = TritonGemmKernel()


def register() -> None:
    """Called by :func:`llmcomp.kernels.dispatch._load_builtin_kernels` (CUDA priority list)."""
    register_kernel(KERNEL, devices=("cuda",))
