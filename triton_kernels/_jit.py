"""Triton device code for the mixed-precision GEMM and the sparse GEMV.

Only :func:`llmcomp.kernels.triton_gemm.jit_kernels` imports this module: ``@triton.jit`` reads
``TRITON_INTERPRET`` when a function is decorated, so the host code imports (and, if the mode
changed, reloads) this module on first launch instead of at ``import llmcomp``. Host wrappers
own every layout decision; see docs/KERNELS.md for the tensor layouts these kernels read.

Arithmetic is done in fp32 (dequantization, accumulation); ``COMPUTE`` is the dtype fed to
``tl.dot`` (fp16, bf16 or fp32 as chosen by the host; never bf16 under the interpreter, whose
bf16 arithmetic is wrong).

Only builtins of ``triton.language`` are used (``tl.full``, not ``tl.zeros``): helpers such as
``tl.zeros`` or ``tl.sum`` are themselves ``@triton.jit`` functions, decorated once when
``triton`` is first imported, so they break the interpreter if ``triton`` was imported before
``TRITON_INTERPRET`` was set (as happens in a long pytest run).
"""

import os

import triton
import triton.language as tl

# The mode these kernels were decorated in; the host reloads the module when it differs.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _dequant(u, s, z, lut_ptr, lut_off, HAS_ZERO: tl.constexpr, USE_LUT: tl.constexpr, OFFSET: tl.constexpr):
    """Integer codes ``u`` -> fp32 weights: ``lut[u] * s`` or ``(u - zero - offset) * s``."""
    if USE_LUT:
        w = tl.load(lut_ptr + lut_off + u.to(tl.int32))
    elif HAS_ZERO:
        w = u.to(tl.float32) - z  # z already holds zero point + storage offset
    else:
        w = u.to(tl.float32) - OFFSET
    return w * s


@triton.jit(do_not_specialize=["M"])  # one compiled variant for every M (no M == 1 special case)
def gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_wk, stride_sg, stride_lut, stride_om, stride_os,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, USE_LUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr, WORD_TILE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[split] = x[:, ks] @ dequant(W)[ks, :]`` for the K slice ``ks`` of program axis 2.

    W is K-major: int8/uint8 ``[K, N]`` (8 bits) or int32 words ``[ceil(K / vpw), N]`` holding
    ``vpw = 32 // BITS`` consecutive k per word, lowest bits first. Scales (and zeros) are
    ``[groups, N]``. With ``GROUP_ALIGNED`` a K-block never straddles a group, so one scale row
    per block is loaded; otherwise scales are gathered per element. ``WORD_TILE`` (vpw a power of
    two dividing BLOCK_K) loads the ``[BLOCK_K / vpw, BLOCK_N]`` words once and unpacks in registers.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    VPW: tl.constexpr = 1 if BITS == 8 else 32 // BITS
    OFFSET: tl.constexpr = 0 if (BITS == 8 or USE_LUT) else 1 << (BITS - 1)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(COMPUTE)
        mask_w = mask_k[:, None] & mask_n[None, :]
        if BITS == 8:
            u = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=mask_w, other=0)
        elif WORD_TILE:  # load each word once, then spread its VPW values along K in registers
            rows = k0 // VPW + tl.arange(0, BLOCK_K // VPW)
            mask_r = (rows < (K + VPW - 1) // VPW)[:, None] & mask_n[None, :]
            words = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=mask_r, other=0)
            shifts = tl.arange(0, VPW) * BITS
            u = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            u = tl.reshape(u, (BLOCK_K, BLOCK_N))
        else:  # VPW not a power of two (3 bits): each k reads its word (repeated loads hit L1)
            w_off = (offs_k // VPW)[:, None] * stride_wk + offs_n[None, :]
            words = tl.load(w_ptr + w_off, mask=mask_w, other=0)
            u = (words >> ((offs_k % VPW) * BITS)[:, None]) & ((1 << BITS) - 1)
        if GROUP_ALIGNED:
            s_off = (k0 // group_size) * stride_sg + offs_n[None, :]
            s_mask = mask_n[None, :]
        else:
            s_off = (offs_k // group_size)[:, None] * stride_sg + offs_n[None, :]
            s_mask = mask_w
        s = tl.load(s_ptr + s_off, mask=s_mask, other=0.0)
        z = 0.0
        if HAS_ZERO:
            z = tl.load(z_ptr + s_off, mask=s_mask, other=0.0)
        w = _dequant(u, s, z, lut_ptr, offs_n[None, :] * stride_lut, HAS_ZERO, USE_LUT, OFFSET)
        acc += tl.dot(x, w.to(COMPUTE), input_precision=PRECISION)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def sparse_gemv_kernel(
    x_ptr, idx_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, nnz, group_size, nnz_per_split,
    stride_xm, stride_wk, stride_sg, stride_om, stride_os,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, WORD_TILE: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[split] = x[:, idx] @ W^T[idx, :]`` over a slice of the selected input columns.

    W rows are indexed by k so a selected column is one contiguous read: dense ``[K, N]``
    (``BITS == 16``, any float dtype), int8 ``[K, N]`` or int32 words ``[K, ceil(N / vpw)]``
    packed along N (``WORD_TILE``: vpw a power of two dividing BLOCK_N, each word loaded once).
    Scales/zeros are ``[groups, N]``, gathered per selected k.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    VPW: tl.constexpr = 1 if BITS >= 8 else 32 // BITS
    OFFSET: tl.constexpr = 0 if BITS >= 8 else 1 << (BITS - 1)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    j_start = pid_k * nnz_per_split
    j_stop = tl.minimum(j_start + nnz_per_split, nnz)
    for j0 in range(j_start, j_stop, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        mask_j = offs_j < nnz
        kk = tl.load(idx_ptr + offs_j, mask=mask_j, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=mask_m[:, None] & mask_j[None, :], other=0.0).to(COMPUTE)
        mask_w = mask_j[:, None] & mask_n[None, :]
        if BITS == 16:
            w = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :], mask=mask_w, other=0.0)
            w = w.to(tl.float32)
        else:
            if BITS == 8:
                u = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :], mask=mask_w, other=0)
            elif WORD_TILE:  # load each word once, then spread its VPW values along N in registers
                cols = pid_n * (BLOCK_N // VPW) + tl.arange(0, BLOCK_N // VPW)
                mask_c = mask_j[:, None] & (cols < (N + VPW - 1) // VPW)[None, :]
                words = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :], mask=mask_c, other=0)
                shifts = tl.arange(0, VPW) * BITS
                u = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
                u = tl.reshape(u, (BLOCK_K, BLOCK_N))
            else:
                w_off = kk[:, None] * stride_wk + (offs_n // VPW)[None, :]
                words = tl.load(w_ptr + w_off, mask=mask_w, other=0)
                u = (words >> ((offs_n % VPW) * BITS)[None, :]) & ((1 << BITS) - 1)
            s_off = (kk // group_size)[:, None] * stride_sg + offs_n[None, :]
            s = tl.load(s_ptr + s_off, mask=mask_w, other=0.0)
            z = 0.0
            if HAS_ZERO:
                z = tl.load(z_ptr + s_off, mask=mask_w, other=0.0)
            w = _dequant(u, s, z, s_ptr, 0, HAS_ZERO, False, OFFSET)
        acc += tl.dot(x, w.to(COMPUTE), input_precision=PRECISION)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
