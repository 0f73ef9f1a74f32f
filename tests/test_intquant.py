"""Integer quantization primitives against float64 references and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from llmcomp import intquant


def naive_dequant(q, scale, zero, group):
    n, k = q.shape
    out = torch.empty(n, k, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            z = 0.0 if zero is None else float(zero[i, j // group])
            out[i, j] = (float(q[i, j]) - z) * float(scale[i, j // group])
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [7, 32, 70, 129])
def test_pack_unpack_roundtrip(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    qmin, qmax = intquant.qrange(bits)
    q = torch.randint(qmin, qmax + 1, (5, k), generator=gen, dtype=torch.int64).to(torch.int8)
    packed = intquant.pack(q, bits)
    assert tuple(packed.shape) == intquant.packed_shape(5, k, bits)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.int32)
    assert torch.equal(intquant.unpack(packed, bits, k), q)


def test_int4_packing_matches_compressed_tensors_layout():
    # value j of a word sits at bits [4j, 4j+4), stored as q + 8
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4]], dtype=torch.int8)
    word = intquant.pack(q, 4)[0, 0].item() & 0xFFFFFFFF
    expected = sum(((v + 8) & 0xF) << (4 * j) for j, v in enumerate(q[0].tolist()))
    assert word == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_bound_float64(bits, group, symmetric):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(6, 100, generator=gen, dtype=torch.float64)
    qw = intquant.quantize_rtn(w.float(), bits, group, symmetric)
    g = intquant.effective_group_size(group, 100)
    assert qw.scale.shape == (6, math.ceil(100 / g))
    ref = naive_dequant(qw.q, qw.scale.double(), None if qw.zero is None else qw.zero.double(), g)
    assert torch.allclose(intquant.dequantize_qw(qw).double(), ref, atol=1e-6)
    # Round-to-nearest inside the representable range: error at most half a step (+ float32 slack).
    step = qw.scale.double().repeat_interleave(g, dim=1)[:, :100]
    assert ((w - ref).abs() <= step / 2 + 1e-5).all()


def test_storage_bits_per_weight_counts_metadata():
    # 4-bit, group 64, fp16 scales, asymmetric int8 zeros: 4 + (16 + 8) / 64
    assert intquant.storage_bits_per_weight(4096, 64, 4, asymmetric=True) == pytest.approx(4 + 24 / 64)
    # K=576 with 3-bit packing: 58 words of 10 values (580 slots)
    bpw = intquant.storage_bits_per_weight(576, -1, 3, asymmetric=False)
    assert bpw == pytest.approx((58 * 32 + 16) / 576)


def test_codes_chosen_against_stored_scale_precision():
    """With bf16 scale storage, codes picked against the rounded scale reconstruct better."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=gen)
    naive = intquant.quantize_rtn(w, 8, -1, True)
    naive_err = (intquant.dequantize(naive.q, naive.scale.to(torch.bfloat16), None, 256) - w).pow(2).sum()
    aware = intquant.quantize_rtn(w, 8, -1, True, scale_dtype=torch.bfloat16)
    assert torch.equal(aware.scale, aware.scale.to(torch.bfloat16).float())
    aware_err = (intquant.dequantize_qw(aware) - w).pow(2).sum()
    assert aware_err < naive_err
