"""MPO (tensor-train matrix) and low-rank decompositions against float64 references and closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmcomp.modules.lowrank_linear import LowRankLinear
from llmcomp.modules.mpo_linear import MPOLinear, MPOSpec, mpo_apply, mpo_to_matrix
from llmcomp.passes.lowrank import FactorizedConfig, energy_rank, truncated_svd
from llmcomp.passes.tensornet import (
    TensorNetConfig,
    auto_factors,
    balanced_factors,
    chi_for_ratio,
    core_shapes,
    decompose_for,
    max_bonds,
    mpo_decompose,
    mpo_params,
    ranks_for_chi,
)

SHAPES = [(48, 40), (36, 60), (35, 22), (64, 64)]  # 35 = 5*7, 22 = 2*11: uneven and prime factors


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def naive_mpo_entry(cores: list[torch.Tensor], row: tuple[int, ...], col: tuple[int, ...]) -> float:
    """W[row, col] = G1[:, i1, j1, :] @ ... @ Gd[:, id, jd, :], written as a loop of matrix products."""
    acc = torch.ones(1, 1, dtype=torch.float64)
    for core, i, j in zip(cores, row, col, strict=True):
        acc = acc @ core[:, i, j, :]
    return float(acc[0, 0])


def multi_index(flat: int, factors: list[int]) -> tuple[int, ...]:
    out = []
    for f in reversed(factors):
        out.append(flat % f)
        flat //= f
    return tuple(reversed(out))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_full_rank_mpo_reconstructs_exactly(shape, d) -> None:
    w = randn(*shape, seed=d)
    out_f, in_f = auto_factors(*shape, d)
    cores, _ = mpo_decompose(w, out_f, in_f)
    assert [c.shape[3] for c in cores[:-1]] == max_bonds(out_f, in_f)
    torch.testing.assert_close(mpo_to_matrix(cores), w, rtol=0, atol=1e-12)


def test_mpo_to_matrix_matches_the_defining_formula() -> None:
    """The dense rebuild against the index definition, entry by entry (random cores, 3 sites)."""
    out_f, in_f, ranks = [3, 2, 4], [2, 5, 3], [4, 3]
    cores = [randn(*s, seed=k) for k, s in enumerate(core_shapes(out_f, in_f, ranks))]
    dense = mpo_to_matrix(cores)
    assert dense.shape == (24, 30)
    for r, c in itertools.product(range(24), range(30)):
        assert dense[r, c].item() == pytest.approx(naive_mpo_entry(cores, multi_index(r, out_f), multi_index(c, in_f)),
                                                   abs=1e-12)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_contraction_equals_dense_matmul(d) -> None:
    out_f, in_f = [4, 3, 2, 2][:d], [2, 5, 1, 3][:d]
    ranks = [3, 5, 2][: d - 1]
    cores = [randn(*s, seed=10 + k) for k, s in enumerate(core_shapes(out_f, in_f, ranks))]
    x = randn(2, 3, math.prod(in_f), seed=99)
    torch.testing.assert_close(mpo_apply(x, cores), x @ mpo_to_matrix(cores).T, rtol=0, atol=1e-12)


def test_two_core_truncation_error_is_the_discarded_singular_values() -> None:
    """Eckart-Young on the (m1 n1) x (m2 n2) unfolding, the unfolding built here by explicit loops."""
    w = randn(24, 30, seed=3)
    out_f, in_f = [4, 6], [5, 6]
    unfold = torch.empty(4 * 5, 6 * 6, dtype=torch.float64)
    for i1, j1, i2, j2 in itertools.product(range(4), range(5), range(6), range(6)):
        unfold[i1 * 5 + j1, i2 * 6 + j2] = w[i1 * 6 + i2, j1 * 6 + j2]
    s = torch.linalg.svdvals(unfold)
    for chi in (1, 4, 11):
        cores, spectra = mpo_decompose(w, out_f, in_f, [chi])
        torch.testing.assert_close(spectra[0], s, rtol=0, atol=1e-10)
        err = (mpo_to_matrix(cores) - w).norm()
        assert err.item() == pytest.approx(s[chi:].pow(2).sum().sqrt().item(), rel=1e-9)


def test_three_core_error_within_the_tt_svd_bound() -> None:
    w = randn(48, 40, seed=4)
    out_f, in_f = auto_factors(48, 40, 3)
    caps = [3, 5]
    cores, spectra = mpo_decompose(w, out_f, in_f, caps)
    err2 = (mpo_to_matrix(cores) - w).pow(2).sum().item()
    bound = sum(s[c:].pow(2).sum().item() for s, c in zip(spectra, caps, strict=True))
    assert 0 < err2 <= bound * (1 + 1e-9)


def test_balanced_factors_multiply_back_and_are_even() -> None:
    for n, d in [(576, 2), (1536, 2), (192, 3), (1536, 4), (97, 2)]:
        f = balanced_factors(n, d)
        assert math.prod(f) == n and len(f) == d
        if n == 576:
            assert f == [24, 24]


def test_chi_for_ratio_is_the_largest_chi_within_budget() -> None:
    out_f, in_f = auto_factors(96, 64, 3)
    for ratio in (0.1, 0.3, 0.5, 0.7):
        chi = chi_for_ratio(out_f, in_f, ratio)
        params = mpo_params(core_shapes(out_f, in_f, ranks_for_chi(out_f, in_f, chi)))
        more = mpo_params(core_shapes(out_f, in_f, ranks_for_chi(out_f, in_f, chi + 1)))
        assert params <= ratio * 96 * 64 < more or chi == max(max_bonds(out_f, in_f))


def test_energy_rank_is_the_smallest_rank_reaching_the_threshold() -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    total = float(s.pow(2).sum())
    for energy in (0.3, 0.7, 0.9, 0.99, 1.0):
        r = energy_rank(s, energy)
        assert float(s[:r].pow(2).sum()) / total >= energy - 1e-12
        assert r == 1 or float(s[: r - 1].pow(2).sum()) / total < energy


def test_energy_rule_keeps_the_energy_at_each_svd() -> None:
    w = randn(36, 60, seed=5)
    cfg = TensorNetConfig(energy=0.8)
    cores, spectra = decompose_for(w, cfg)
    assert cores[0].shape[3] == energy_rank(spectra[0], 0.8)


def test_lowrank_error_equals_discarded_spectrum_and_ratio_sets_rank() -> None:
    w = randn(40, 24, seed=6)
    u, v, s = truncated_svd(w, FactorizedConfig(ratio=0.5))
    rank = int(0.5 * 40 * 24 // (40 + 24))
    assert u.shape == (40, rank) and v.shape == (rank, 24)
    ref = torch.linalg.svdvals(w)
    assert (u @ v - w).norm().item() == pytest.approx(ref[rank:].pow(2).sum().sqrt().item(), rel=1e-9)
    module = LowRankLinear.from_factors(u, v, None, torch.float64)
    x = randn(3, 24, seed=7)
    torch.testing.assert_close(module(x), x @ (u @ v).T, rtol=0, atol=1e-12)


def test_decode_contracts_without_the_matrix_and_prefill_paths_agree(monkeypatch) -> None:
    w, b = randn(48, 40, seed=8), randn(48, seed=9)
    cores, _ = mpo_decompose(w, *auto_factors(48, 40, 3), max_ranks=[3, 4])
    module = MPOLinear.from_cores(cores, b, torch.float64)
    dense = mpo_to_matrix(cores)
    long = randn(4, 64, 40, seed=10)
    assert module.uses_contraction(1) and not module.uses_contraction(long.shape[0] * long.shape[1])
    torch.testing.assert_close(module(long), long @ dense.T + b, rtol=0, atol=1e-10)  # rebuild path
    import llmcomp.modules.mpo_linear as mpo_mod

    def forbidden(*_a, **_k):
        raise AssertionError("decode rebuilt the dense matrix")

    monkeypatch.setattr(mpo_mod, "mpo_to_matrix", forbidden)
    x = randn(1, 1, 40, seed=11)
    torch.testing.assert_close(module(x), x @ dense.T + b, rtol=0, atol=1e-10)
    monkeypatch.setattr(mpo_mod, "FORWARD_MODE", "contract")
    torch.testing.assert_close(module(long), long @ dense.T + b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("out_f,in_f", [([12, 1], [1, 20]), ([1, 12], [20, 1]), ([2, 3, 2], [5, 1, 4])])
def test_both_contraction_directions_are_exact(out_f, in_f) -> None:
    """Unbalanced factors make one direction far cheaper; whichever is taken, the result is x W^T."""
    from llmcomp.modules.mpo_linear import _contract, contraction_macs

    ranks = [3] * (len(out_f) - 1)
    shapes = core_shapes(out_f, in_f, ranks)
    cores = [randn(*s, seed=20 + k) for k, s in enumerate(shapes)]
    mirrored = [tuple(c.permute(3, 1, 2, 0).shape) for c in reversed(cores)]
    assert len(out_f) == 3 or contraction_macs(shapes) != contraction_macs(mirrored)
    x = randn(3, math.prod(in_f), seed=30)
    ref = x @ mpo_to_matrix(cores).T
    torch.testing.assert_close(mpo_apply(x, cores), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(_contract(x, cores), ref, rtol=0, atol=1e-12)


def test_spec_round_trip_and_validation() -> None:
    cores, _ = mpo_decompose(randn(48, 40, seed=11), [8, 6], [5, 8], [7])
    module = MPOLinear.from_cores(cores, None, torch.float32)
    spec = module.spec()
    assert spec == MPOSpec.model_validate(spec.model_dump(mode="json"))
    rebuilt = MPOLinear.from_spec(spec, torch.float32)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
    with pytest.raises(ValueError):
        MPOSpec(in_features=40, out_features=48, out_factors=[8, 6], in_factors=[5, 7], ranks=[7])
    with pytest.raises(ValueError):
        MPOSpec(in_features=40, out_features=48, out_factors=[8, 6], in_factors=[5, 8], ranks=[7, 2])


def bond_unfolding(w: torch.Tensor, out_f: list[int], in_f: list[int], k: int) -> torch.Tensor:
    """``W`` as the matrix (m_1 n_1 .. m_k n_k) x (the rest), from the index definition by reshapes."""
    d = len(out_f)
    t = w.reshape(*out_f, *in_f).permute([i for j in range(d) for i in (j, d + j)])
    return t.reshape(math.prod(out_f[:k]) * math.prod(in_f[:k]), -1)


def bond_grams(cores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices of the left part (cores before bond k) and the right part (cores after it)."""
    left = cores[0].reshape(-1, cores[0].shape[3])
    for core in cores[1:k]:
        left = (left @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[3])
    right = cores[-1].reshape(cores[-1].shape[0], -1)
    for core in reversed(cores[k:-1]):
        right = (core.reshape(-1, core.shape[3]) @ right).reshape(core.shape[0], -1)
    return left.T @ left, right @ right.T


@pytest.mark.parametrize(("d", "caps"), [(2, [5]), (3, [4, 6]), (4, [3, 5, 4]), (3, None)])
def test_balanced_cores_keep_the_product_and_split_each_bond_spectrum(d, caps) -> None:
    from llmcomp.passes.tensornet import balance_cores

    w = randn(48, 40, seed=40 + d)
    out_f, in_f = auto_factors(48, 40, d)
    cores, _ = mpo_decompose(w, out_f, in_f, caps)
    balanced = balance_cores(cores)
    assert [c.shape for c in balanced] == [c.shape for c in cores]
    product = mpo_to_matrix(cores)
    torch.testing.assert_close(mpo_to_matrix(balanced), product, rtol=0, atol=1e-12 * product.abs().max().item())
    for k in range(1, d):
        left, right = bond_grams(balanced, k)
        spectrum = torch.linalg.svdvals(bond_unfolding(product, out_f, in_f, k))[: left.shape[0]]
        scale = spectrum[0].item()
        torch.testing.assert_close(left, torch.diag(spectrum), rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(right, torch.diag(spectrum), rtol=0, atol=1e-10 * scale)
    left, _ = bond_grams(cores, 1)  # unbalanced TT-SVD: orthonormal first core, all the scale further right
    torch.testing.assert_close(left, torch.eye(left.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_balancing_any_cores_keeps_the_product_even_with_a_rank_deficient_bond() -> None:
    """Random (non-canonical) cores, and a bond wider than the rank it can carry (zero singular values)."""
    from llmcomp.passes.tensornet import balance_cores

    cores = [randn(*s, seed=50 + k) for k, s in enumerate(core_shapes([3, 2, 4], [2, 5, 3], [4, 3]))]
    cores[1][:, :, :, 2] = 0  # bond 2 has rank 2 of 3
    balanced = balance_cores([c.float() for c in cores])
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in balanced)
    product = mpo_to_matrix(cores)
    torch.testing.assert_close(mpo_to_matrix([c.double() for c in balanced]), product, rtol=1e-5,
                               atol=1e-5 * product.abs().max().item())
    exact = balance_cores(cores)
    torch.testing.assert_close(mpo_to_matrix(exact), product, rtol=0, atol=1e-12 * product.abs().max().item())
