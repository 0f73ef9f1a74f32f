"""Codebook formats (RF8, FP8 E4M3/E5M2, gg4, NF4-style) and the ``codebook`` module kind.

References are independent: torch's own float8 casts, scipy's normal quantiles, brute-force
nearest-level search and plain Python packing, float64 matmuls.
"""

import math

import pytest
import torch

from llmcomp import codebook as cb
from llmcomp import gg
from llmcomp.errors import CheckpointError
from llmcomp.modules.codebook_linear import CodebookLinear
from llmcomp.scheme import parse_module_spec


def gg_weight(n: int, k: int, nu: float, seed: int) -> torch.Tensor:
    return gg.sample((n, k), nu, 0.02, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_matches_torch_float8_cast(fmt):
    w = gg_weight(32, 96, 1.2, seed=1)
    codes, scale, table = cb.quantize(w, fmt, -1)
    dtype = cb.FP8_DTYPES[fmt]
    fmax = torch.finfo(dtype).max
    assert float(table.abs().max()) == fmax
    ref_scale = w.abs().amax(dim=1, keepdim=True) / fmax
    ref = (w / ref_scale).to(dtype).to(torch.float64) * ref_scale.double()
    got = cb.decode(codes, table, scale, w.shape[1], torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert bool(table.isfinite().all())


def test_nf4_table_against_scipy_normal_quantiles():
    norm = pytest.importorskip("scipy.stats").norm
    pos = [norm.ppf(p) for p in torch.linspace(cb.NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1].tolist()]
    neg = [-norm.ppf(p) for p in torch.linspace(cb.NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1].tolist()]
    values = sorted(pos + neg + [0.0])
    top = max(abs(v) for v in values)
    ref = torch.tensor([v / top for v in values])
    torch.testing.assert_close(cb.nf4_table(), ref.float(), rtol=1e-6, atol=1e-7)


def test_float_grid_is_a_float_code():
    """E4M3 as a grid, scaled to E4M3's top code (480), is every finite float8_e4m3fn value plus 480
    (the fn variant spends that code on NaN)."""
    grid = cb.float_grid(4, 3)
    assert grid.numel() == 256 and float(grid.max()) == 1.0
    mags = (grid.double() * 480).abs().unique()
    fp8 = cb.fp8_table("fp8-e4m3").double().abs().unique()
    torch.testing.assert_close(mags, torch.cat([fp8, torch.tensor([480.0], dtype=torch.float64)]))


@pytest.mark.parametrize("nu", [1.0, 1.8])
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 576)])
def test_gg_table_beats_fixed_tables_on_gg_data(nu, bits, group):
    table = cb.gg_table(nu, bits, group)
    assert table.numel() == 2**bits and float(table.abs().max()) == pytest.approx(1.0)
    torch.testing.assert_close(table, -table.flip(0))  # symmetric
    w = gg_weight(64, 576, nu, seed=7)  # fresh samples, not the table's Monte-Carlo sample
    fmt = "gg4" if bits == 4 else "rf8"

    def err(t):
        codes, scale = cb.encode(w, fmt, t, group)
        return cb.mse(w, cb.decode(codes, t, scale, group))

    rivals = [cb.nf4_table()] if bits == 4 else [cb.fp8_table("fp8-e4m3"), cb.float_grid(3, 4),
                                                 torch.linspace(-1, 1, 255)]
    assert all(err(table) < err(r) for r in rivals)


def test_lloyd_max_centroid_condition():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20000, generator=gen, dtype=torch.float64)
    levels = cb.lloyd_max(x, torch.linspace(-2, 2, 8, dtype=torch.float64), steps=200)
    edges = (levels[1:] + levels[:-1]) / 2
    for i, level in enumerate(levels.tolist()):
        lo = -math.inf if i == 0 else float(edges[i - 1])
        hi = math.inf if i == len(levels) - 1 else float(edges[i])
        cell = x[(x > lo) & (x <= hi)]
        assert level == pytest.approx(float(cell.mean()), abs=2e-3)


def test_nearest_codes_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(16, generator=gen)[torch.randperm(16, generator=gen)]  # unsorted on purpose
    u = torch.randn(40, 7, generator=gen) * 2
    got = cb.nearest_codes(u, table)
    brute = (u.double().unsqueeze(-1) - table.double()).abs().argmin(dim=-1)
    torch.testing.assert_close(table[got], table[brute])


@pytest.mark.parametrize("fmt,group", [("rf8", -1), ("gg4", 32), ("nf4", 48), ("fp8-e4m3", 40)])
def test_encode_decode_idempotent_with_short_last_group(fmt, group):
    w = gg_weight(12, 100, 1.4, seed=4)  # 100 is no multiple of the groups: a short last group
    codes, scale, table = cb.quantize(w, fmt, group)
    w1 = cb.decode(codes, table, scale, group)
    codes2, scale2 = cb.encode(w1, fmt, table, group)
    torch.testing.assert_close(cb.decode(codes2, table, scale2, group), w1, rtol=1e-6, atol=1e-9)
    assert cb.mse(w, w1) < 0.1 * float(w.pow(2).mean())


def naive_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    vpw = 32 // bits
    n, k = codes.shape
    words = [[0] * -(-k // vpw) for _ in range(n)]
    for i in range(n):
        for j in range(k):
            words[i][j // vpw] |= int(codes[i, j]) << ((j % vpw) * bits)
    return torch.tensor([[v - 2**32 if v >= 2**31 else v for v in row] for row in words], dtype=torch.int32)


@pytest.mark.parametrize("fmt,group", [("rf8", -1), ("gg4", 16), ("nf4", 64)])
def test_module_forward_and_storage_against_float64(fmt, group):
    n, k = 20, 70
    w = gg_weight(n, k, 1.3, seed=5)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(6))
    codes, scale, table = cb.quantize(w, fmt, group)
    bits = cb.FORMAT_BITS[fmt]
    mod = CodebookLinear.from_codes(codes, scale, table, bits, group, bias, torch.float32, fmt=fmt)
    if bits == 8:
        assert mod.weight_packed.dtype == torch.uint8 and torch.equal(mod.weight_packed.long(), codes)
    else:
        assert torch.equal(mod.weight_packed, naive_pack(codes, bits))
    g = min(k, group) if group > 0 else k
    w64 = torch.tensor([[float(table[codes[i, j]]) * float(scale[i, j // g]) for j in range(k)] for i in range(n)],
                       dtype=torch.float64)
    torch.testing.assert_close(mod.dequantized_weight(torch.float64), w64)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(8))
    ref = x.double() @ w64.T + bias.double()
    torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-5)
    rebuilt = CodebookLinear.from_spec(parse_module_spec("m", mod.spec().model_dump()), torch.float32)
    rebuilt.load_state_dict(mod.state_dict())
    torch.testing.assert_close(rebuilt(x), mod(x))


def test_spec_validation_is_one_line():
    good = {"kind": "codebook", "in_features": 64, "out_features": 8, "bits": 4, "group_size": 64}
    assert parse_module_spec("m", good).format == "custom"
    for bad in ({**good, "bits": 5}, {**good, "group_size": 128}, {**good, "format": "fp4"}, {**good, "extra": 1}):
        with pytest.raises(CheckpointError, match="module 'm' \\(codebook\\)"):
            parse_module_spec("m", bad)


def test_bits_per_weight_counts_codes_scales_and_table():
    n, k = 64, 576
    assert cb.bits_per_weight(k, 576, 8, 16, 256, n) == pytest.approx(8 + 16 / 576 + 256 * 32 / (n * k))
    assert cb.bits_per_weight(k, 64, 4, 16, 16, n) == pytest.approx(4 + 16 / 64 + 16 * 32 / (n * k))
