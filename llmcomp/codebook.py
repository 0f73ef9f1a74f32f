"""Codebook weight formats (pure functions): RF8, FP8 E4M3 / E5M2, gg4, NF4-style; encode / decode.

Every format here is one layout, the ``codebook`` module kind: ``w[n, k] = table[code[n, k]] *
scale[n, k // group_size]`` with a per-(row, group) absmax scale (``scale = max|w_group| /
max|table|``) and a small table stored in the checkpoint. What differs is the table:

* ``fp8-e4m3`` / ``fp8-e5m2``: the 256 values of torch's ``float8_e4m3fn`` / ``float8_e5m2``
  (code = the raw fp8 byte; NaN / inf codes decode to 0 and are never produced), encoded with
  torch's own round-to-nearest-even cast.
* ``rf8`` (our design, docs/GG.md): 256 levels that minimise the expected squared error of a
  group-absmax-normalised generalized Gaussian of the tensor's fitted shape nu (Lloyd-Max on a
  fixed-seed Monte-Carlo sample of that distribution, started from the companded quantiles,
  whose point density ``f^(1/3)`` is asymptotically optimal). A float (sign / exponent / mantissa)
  grid is available as :func:`float_grid` for comparison; the bench picked the GG table.
* ``gg4``: the same construction with 16 levels.
* ``nf4``: NF4-style table (normal quantiles, 7 negative levels, 0, 8 positive, max 1).

Encoding to a non-float table is nearest-level (ties to the lower code).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from llmcomp import gg, intquant

FORMATS = ("rf8", "fp8-e4m3", "fp8-e5m2", "gg4", "nf4")
FORMAT_BITS = {"rf8": 8, "fp8-e4m3": 8, "fp8-e5m2": 8, "gg4": 4, "nf4": 4}
FP8_DTYPES = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}
TABLE_BITS = 32  # table entries are stored as float32
SHAPE_GRID = 0.1  # fitted shapes are rounded to this grid before a table is built (tables are cached)
LLOYD_SAMPLES = 1 << 18
LLOYD_STEPS = 30
LLOYD_SEED = 0
NF4_OFFSET = 0.9677083  # outermost probability of NF4's normal quantiles (bitsandbytes' construction)
COMPANDING_POWER = 3.0  # optimal point density of a fine quantizer is f^(1/3)


# -- tables ---------------------------------------------------------------------------------------
def fp8_table(fmt: str) -> torch.Tensor:
    """float32 ``[256]``: the value of every fp8 byte (non-finite codes decode to 0)."""
    raw = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(FP8_DTYPES[fmt]).float()
    return torch.where(raw.isfinite(), raw, torch.zeros_like(raw))


def float_grid(exp_bits: int, man_bits: int) -> torch.Tensor:
    """Sorted ``[2**(1+e+m)]`` values of a sign/exponent/mantissa code with subnormals and no
    NaN/inf codes, normalised to max 1 (bias is irrelevant under an absmax scale)."""
    mags = []
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            frac = m / 2**man_bits
            mags.append(2 * frac if e == 0 else (1 + frac) * 2.0**e)  # bias 0; subnormals at e = 0
    mag = torch.tensor(mags, dtype=torch.float64)
    mag = mag / mag.max()
    return torch.cat([-mag.flip(0), mag]).float()


def nf4_table() -> torch.Tensor:
    """NF4-style ``[16]``: normal quantiles, 8 positive and 7 negative levels plus an exact 0, max 1."""
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return (values / values.abs().max()).sort().values.float()


def _normalised_gg_sample(nu: float, group_size: int) -> torch.Tensor:
    """Monte-Carlo sample of ``w / max|w_group|`` for GG(nu) weights in groups of ``group_size``."""
    groups = max(1, LLOYD_SAMPLES // group_size)
    x = gg.sample((groups, group_size), nu, generator=torch.Generator().manual_seed(LLOYD_SEED), dtype=torch.float64)
    return (x / x.abs().amax(dim=1, keepdim=True)).reshape(-1)


def lloyd_max(samples: torch.Tensor, init: torch.Tensor, steps: int = LLOYD_STEPS) -> torch.Tensor:
    """1-D Lloyd-Max (k-means) from ``init``: sorted levels minimising the samples' squared error."""
    x = samples.double().sort().values
    levels = init.double().sort().values.clone()
    for _ in range(steps):
        idx = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros_like(levels).scatter_add_(0, idx, x)
        counts = torch.zeros_like(levels).scatter_add_(0, idx, torch.ones_like(x))
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels).sort().values
    return levels


@lru_cache(maxsize=256)
def _gg_table_cached(nu: float, bits: int, group_size: int) -> torch.Tensor:
    u = _normalised_gg_sample(nu, group_size)
    fit = gg.fit(u, zero_mean=True)
    companded = gg.GGFit(fit.shape, fit.scale * COMPANDING_POWER ** (1 / fit.shape))
    lo, hi = companded.cdf(torch.tensor([-1.0, 1.0], dtype=torch.float64)).tolist()
    n = 2**bits
    init = companded.quantile(lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    levels = lloyd_max(u, init)
    levels = (levels - levels.flip(0)) / 2  # the distribution is symmetric: so is the table
    return (levels / levels.abs().max()).float()


def gg_table(nu: float, bits: int, group_size: int) -> torch.Tensor:
    """Sorted ``[2**bits]`` MSE-optimal levels for group-absmax-normalised GG(nu) weights, max 1.

    ``nu`` is rounded to :data:`SHAPE_GRID` (tables are cached); ``group_size`` matters because
    the group maximum that normalises the weights grows with the group."""
    nu = max(gg.SHAPE_MIN, min(gg.SHAPE_MAX, round(nu / SHAPE_GRID) * SHAPE_GRID))
    return _gg_table_cached(round(nu, 4), bits, group_size).clone()


def data_table(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Levels fitted by Lloyd-Max to this tensor's own normalised values (the measured upper bound)."""
    u = normalise(w.float(), group_size)[0].reshape(-1)
    if u.numel() > LLOYD_SAMPLES:
        u = u[torch.randperm(u.numel(), generator=torch.Generator().manual_seed(LLOYD_SEED))[:LLOYD_SAMPLES]]
    init = torch.quantile(u.double(), (torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2**bits)
    levels = lloyd_max(u, init)
    return (levels / levels.abs().max()).float()


def table_for(fmt: str, w: torch.Tensor | None = None, group_size: int = -1, fit: str = "gg") -> torch.Tensor:
    """The table of a format (``w`` is needed by the shape-fitted ones, rf8 and gg4)."""
    if fmt in FP8_DTYPES:
        return fp8_table(fmt)
    if fmt == "nf4":
        return nf4_table()
    if fmt not in ("rf8", "gg4"):
        raise ValueError(f"unknown codebook format {fmt!r}; known: {', '.join(FORMATS)}")
    if w is None:
        raise ValueError(f"format {fmt} fits its table to the weight: pass w")
    group = intquant.effective_group_size(group_size, w.shape[1])
    if fit == "data":
        return data_table(w, FORMAT_BITS[fmt], group)
    return gg_table(gg.fit(w, zero_mean=True).shape, FORMAT_BITS[fmt], group)


# -- encode / decode ------------------------------------------------------------------------------
def group_index(in_features: int, group_size: int) -> torch.Tensor:
    return torch.arange(in_features) // intquant.effective_group_size(group_size, in_features)


def normalise(w: torch.Tensor, group_size: int, table_max: float = 1.0,
              scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w / scale, scale)`` with ``scale = max|w_group| / table_max``, rounded to ``scale_dtype``
    first (so encoding sees the scale the checkpoint holds); an all-zero group gets scale 1."""
    n, k = w.shape
    group = intquant.effective_group_size(group_size, k)
    groups = intquant.num_groups(k, group)
    pad = groups * group - k
    wf = w.float()
    padded = torch.cat([wf, wf[:, -1:].expand(n, pad)], dim=1) if pad else wf
    amax = padded.reshape(n, groups, group).abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / table_max, torch.ones_like(amax)).to(scale_dtype)
    return wf / scale.float()[:, group_index(k, group)], scale


def nearest_codes(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for every value of ``u`` (table in any order)."""
    values, order = table.float().sort()
    idx = torch.bucketize(u.float().contiguous(), (values[1:] + values[:-1]) / 2)
    return order[idx]


def encode(w: torch.Tensor, fmt: str, table: torch.Tensor, group_size: int,
           scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int64 [N, K], scale [N, groups])`` of ``w`` in ``fmt`` with ``table``."""
    table_max = float(table.abs().max())
    u, scale = normalise(w, group_size, table_max, scale_dtype)
    if fmt in FP8_DTYPES:
        u = u.clamp(-table_max, table_max)
        codes = u.to(FP8_DTYPES[fmt]).view(torch.uint8).to(torch.int64)
    else:
        codes = nearest_codes(u, table)
    return codes, scale


def decode(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, group_size: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``table[codes] * scale`` (float32 math), ``[N, K]`` in ``dtype``."""
    k = codes.shape[1]
    w = table.float()[codes] * scale.float()[:, group_index(k, group_size)]
    return w.to(dtype)


def quantize(w: torch.Tensor, fmt: str, group_size: int = -1, fit: str = "gg",
             scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, table)`` of ``w`` in ``fmt``; the one call passes and benchmarks make."""
    table = table_for(fmt, w, group_size, fit)
    codes, scale = encode(w, fmt, table, group_size, scale_dtype)
    return codes, scale, table


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes -> storage: uint8 ``[N, K]`` (8 bits) or int32 words packed along K."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    return intquant.pack(codes.to(torch.int64) - 2 ** (bits - 1), bits)


def bits_per_weight(in_features: int, group_size: int, bits: int, scale_bits: int, table_entries: int,
                    out_features: int) -> float:
    """Stored bits per weight: codes (with packing waste), per-group scales and the table."""
    words = intquant.storage_bits_per_weight(in_features, group_size, bits, False, scale_bits)
    return words + table_entries * TABLE_BITS / (in_features * out_features)


def mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((w.double() - w_hat.double()) ** 2).mean())
