"""Block-size configs for the Triton kernels, chosen by M bucket, tuned once per shape on CUDA.

Decode (M <= 16) needs many programs over a thin output, so its configs split K across programs
(partial sums in an fp32 workspace, reduced by the host); prefill configs use larger M tiles and
no split. On CUDA the first call for a (bucket, shape, layout) key times each candidate with
``triton.testing.do_bench`` and caches the winner; under the interpreter one small fixed config
per bucket is used (timing there means nothing and costs minutes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

M_BUCKETS = (16, 32, 64, 128, 256)  # M is rounded up to one of these (the last one is open-ended)
DECODE_MAX_M = 16
MIN_DOT = 16  # tl.dot needs every block dimension >= 16
MAX_SPLIT_K = 16
MIN_K_BLOCKS_PER_SPLIT = 4  # each split streams at least this many K blocks
WAVES = 2  # split-K aims at about this many programs per SM
AUTOTUNE_ENV = "LLMCOMP_TRITON_AUTOTUNE"  # "0" disables timing on CUDA (first candidate wins)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1  # 0 = pick from the SM count and the tile count
    num_warps: int = 4
    num_stages: int = 3


def m_bucket(m: int) -> int:
    """Round M up to a bucket, so nearby batch sizes share one tuned config."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


# Candidate lists per bucket for CUDA (H100-class guesses; the tuner picks among them). Buckets
# share configs where they can: every distinct (blocks, warps, stages) is one more compilation.
# split_k is a runtime argument, so split variants cost no compilation.
_P64 = GemmConfig(64, 128, 64, 1, 4, 4)
_P128 = GemmConfig(128, 128, 64, 1, 8, 3)
_CUDA_CANDIDATES: dict[int, tuple[GemmConfig, ...]] = {
    16: (
        GemmConfig(16, 64, 128, 0, 4, 4),
        GemmConfig(16, 128, 128, 0, 4, 4),
        GemmConfig(16, 64, 256, 0, 4, 3),
        GemmConfig(16, 32, 128, 0, 2, 4),
        GemmConfig(16, 64, 128, 1, 4, 4),
    ),
    32: (GemmConfig(32, 64, 128, 0, 4, 4), GemmConfig(32, 128, 64, 0, 4, 4), GemmConfig(32, 64, 64, 1, 4, 5)),
    64: (GemmConfig(64, 64, 64, 0, 4, 4), _P64, GemmConfig(64, 128, 128, 1, 8, 3)),
    128: (_P64, _P128, GemmConfig(128, 64, 64, 1, 4, 4)),
    256: (_P128, GemmConfig(128, 256, 64, 1, 8, 3), _P64),
}

# Interpreter: few, fat programs (each op is a numpy call); split K at decode to cover that path.
_INTERPRETER_CONFIGS = {16: GemmConfig(16, 32, 32, 2), 32: GemmConfig(32, 32, 32, 1)}


def fit_block_k(block_k: int, group_size: int, k: int) -> tuple[int, bool]:
    """Shrink ``block_k`` so a K block never straddles a scale group; return (block_k, aligned).

    A single group (per-channel) is always aligned. When no power of two >= 16 divides the group
    size (e.g. 20), keep ``block_k`` and gather scales per element instead (aligned = False).
    """
    if group_size >= k:
        return block_k, True
    bk = block_k
    while bk > MIN_DOT and group_size % bk:
        bk //= 2
    if group_size % bk == 0:
        return bk, True
    return block_k, False


def auto_split_k(cfg: GemmConfig, m: int, n: int, k: int, num_sms: int) -> int:
    """Split K until about ``WAVES`` programs per SM, keeping several K blocks per split."""
    if cfg.split_k > 0:
        return min(cfg.split_k, max(1, math.ceil(k / cfg.block_k)))
    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    k_blocks = math.ceil(k / cfg.block_k)
    want = max(1, (WAVES * num_sms) // max(tiles, 1))
    return max(1, min(want, k_blocks // MIN_K_BLOCKS_PER_SPLIT, MAX_SPLIT_K))


def candidates(m: int, n: int, k: int, group_size: int, on_cuda: bool, num_sms: int) -> list[GemmConfig]:
    """Concrete configs (split_k resolved, block_k fitted to the groups) for one problem."""
    bucket = m_bucket(m)
    if on_cuda:
        raw = _CUDA_CANDIDATES[bucket]
    else:
        raw = (_INTERPRETER_CONFIGS[16 if m <= DECODE_MAX_M else 32],)
    out: list[GemmConfig] = []
    for cfg in raw:
        bk, _ = fit_block_k(cfg.block_k, group_size, k)
        cfg = replace(cfg, block_k=bk)
        cfg = replace(cfg, split_k=auto_split_k(cfg, m, n, k, num_sms))
        if cfg not in out:
            out.append(cfg)
    return out


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


_TUNED: dict[tuple, GemmConfig] = {}


def tuned_config(
    key: tuple, cands: list[GemmConfig], run: Callable[[GemmConfig], object], on_cuda: bool
) -> GemmConfig:
    """Return the cached best config for ``key``, timing ``cands`` on the first call (CUDA only)."""
    if key in _TUNED:
        return _TUNED[key]
    best = cands[0]
    if on_cuda and len(cands) > 1 and os.environ.get(AUTOTUNE_ENV, "1") != "0":
        from triton.testing import do_bench

        best_ms = math.inf
        for cfg in cands:
            try:
                ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
            except Exception:  # a config the GPU cannot hold (shared memory, registers): skip it
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def clear_cache() -> None:
    _TUNED.clear()
