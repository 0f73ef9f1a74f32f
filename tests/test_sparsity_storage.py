"""Stored-sparse kinds: exact round trips, checkpoint size, loading in transformers and the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp import intquant
from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.modules.sparse_linear import (
    Sparse2of4Linear,
    SparseLinear,
    SparseQuantLinear,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
)
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.sparsity_masks import holds_pattern, prune_mask
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict

CAL = {"num_samples": 4, "seq_len": 32}


def _weight_and_mask(rows=12, cols=40, pattern="unstructured", dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    keep = prune_mask(torch.rand(rows, cols, generator=g), 0.6 if pattern == "unstructured" else 0.5, pattern)
    return w * keep.to(dtype), keep


def test_bit_and_code_packing_match_naive_layout():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(3, 13, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.shape == (3, 2)
    for i in range(3):
        for j in range(13):
            assert bool(int(packed[i, j // 8]) >> (j % 8) & 1) == bool(mask[i, j])
    assert torch.equal(unpack_bits(packed, 13), mask)
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (37,), generator=g)
        out = pack_codes(codes, bits)
        per = 8 // bits
        for idx, code in enumerate(codes.tolist()):  # code idx: byte idx // per, low bits first
            assert (int(out[idx // per]) >> bits * (idx % per)) & (2**bits - 1) == code
        assert torch.equal(unpack_codes(out, bits, 37).long(), codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitmask_round_trip_is_exact(dtype):
    w, keep = _weight_and_mask(dtype=dtype)
    bias = torch.randn(12).to(dtype)
    mod = SparseLinear.from_dense(w, keep, bias)
    assert mod.spec().nnz == int(keep.sum()) and torch.equal(mod.keep_mask(), keep)
    assert torch.equal(mod.dequantized_weight(dtype), w)
    rebuilt = SparseLinear.from_spec(mod.spec(), dtype)
    rebuilt.load_state_dict(mod.state_dict())
    x = torch.randn(5, 40).to(dtype)
    torch.testing.assert_close(rebuilt(x), torch.nn.functional.linear(x, w, bias), rtol=0, atol=0)


def test_2of4_round_trip_is_exact_and_rejects_other_masks():
    w, keep = _weight_and_mask(pattern="2:4")
    mod = Sparse2of4Linear.from_dense(w, keep)
    assert mod.weight_values.shape == (12, 20) and mod.weight_meta.shape == (12, 5)
    assert torch.equal(mod.keep_mask(), keep) and torch.equal(mod.dequantized_weight(torch.bfloat16), w)
    with pytest.raises(ValueError, match="2:4"):
        Sparse2of4Linear.from_dense(*_weight_and_mask(pattern="1:4"))


@pytest.mark.parametrize("symmetric", [False, True])
def test_sparse_int4_keeps_the_mask_and_decodes_like_quant_linear(symmetric):
    w, keep = _weight_and_mask(rows=8, cols=64, dtype=torch.float32, seed=3)
    qw = fit.fit_quantize(w, 4, 32, symmetric, 2, torch.float32, mask=keep)
    qlin = QuantLinear.from_quantized(qw, None, torch.float32)
    dense = qlin.dequantized_weight()
    assert (dense[~keep] == 0).all()  # pruned weights decode to exactly 0
    sparse = SparseQuantLinear.from_quant_linear(qlin, keep)
    assert torch.equal(sparse.dequantized_weight(), dense)
    # The pruned weights have no say in the scale fit: any values there give the same grid.
    noisy = torch.where(keep, w, torch.full_like(w, 50.0))
    qw2 = fit.fit_quantize(noisy * keep, 4, 32, symmetric, 2, torch.float32, mask=keep)
    torch.testing.assert_close(qw2.scale, qw.scale)
    bpw = sparse.bits_per_weight()
    numel = 8 * 64
    expected = (numel + keep.sum().item() * 4 + 8 * 2 * (32 + (0 if symmetric else 8))) / numel
    assert bpw == pytest.approx(expected)
    assert bpw < intquant.storage_bits_per_weight(64, 32, 4, not symmetric, scale_bits=32)


def _tensor_bytes(path: Path, prefix: str = "model.layers.") -> int:
    info = validate_checkpoint(path)
    return sum(t.dtype.itemsize * torch.Size(t.shape).numel() for n, t in info.tensors.items()
               if n.startswith(prefix) and "norm" not in n)


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("pattern,kind", [("unstructured", "sparse_bitmask"), ("2:4", "sparse_2of4")])
def test_pipeline_stores_sparse_and_loads_in_transformers(tiny_llama_dir, tmp_path, pattern, kind):
    passes = [{"type": "wanda", "sparsity": 0.6, "pattern": pattern}]
    dense = compress(str(tiny_llama_dir), recipe_from_dict({"calibration": CAL, "passes": passes}),
                     tmp_path / "dense", progress=False)
    stored = compress(str(tiny_llama_dir),
                      recipe_from_dict({"calibration": CAL, "passes": [*passes, {"type": "sparse_store"}]}),
                      tmp_path / "sparse", progress=False)
    assert dense and stored
    specs = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]["modules"]
    assert specs and {s["kind"] for s in specs.values()} == {kind}
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tmp_path / "sparse", ids), _logits(tmp_path / "dense", ids), rtol=0, atol=0)
    from llmcomp.cli.inspect_cmd import describe

    summary = describe(tmp_path / "sparse")
    assert summary["average_sparsity"] == pytest.approx(0.6 if pattern == "unstructured" else 0.5, abs=0.01)
    assert {m["kind"] for m in summary["modules"].values()} == {kind}
    bpw = summary["average_bits_per_weight"]  # fp32 values: 1 bit of mask/metadata + 32 per kept weight
    assert bpw == pytest.approx(1 + 32 * (1 - summary["average_sparsity"]), abs=0.05)
    ratio = _tensor_bytes(tmp_path / "sparse") / _tensor_bytes(tmp_path / "dense")
    assert ratio <= (0.47 if pattern == "unstructured" else 0.57)  # 1/16 + kept fraction of fp32 values
    if pattern == "2:4":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
        for name in specs:
            assert holds_pattern(model.get_submodule(name).dequantized_weight() != 0, "2:4"), name


def test_sparse_int4_pipeline_and_native_runtime(tiny_llama_dir, tmp_path):
    from llmcomp.loading import load_model
    from llmcomp.runtime import ModelRunner

    passes = [{"type": "sparsegpt", "sparsity": 0.5},
              {"type": "finequant", "bits": 4, "symmetric": False, "min_group_size": 32}]
    compress(str(tiny_llama_dir), recipe_from_dict({"calibration": CAL, "passes": passes}), tmp_path / "q",
             progress=False)
    compress(str(tiny_llama_dir), recipe_from_dict({"calibration": CAL, "passes": [*passes, {"type": "sparse_store"}]}),
             tmp_path / "sq", progress=False)
    specs = json.loads((tmp_path / "sq" / "config.json").read_text())["quantization_config"]["modules"]
    assert {s["kind"] for s in specs.values()} == {"sparse_int_affine"}
    ref, _ = load_model(str(tmp_path / "q"))
    model, _ = load_model(str(tmp_path / "sq"))
    for name in specs:
        w = model.get_submodule(name).dequantized_weight()
        assert torch.equal(w, ref.get_submodule(name).dequantized_weight())
        assert (w == 0).float().mean() >= 0.5
    assert _tensor_bytes(tmp_path / "sq") < 0.8 * _tensor_bytes(tmp_path / "q")
    ids = [5, 17, 99, 3, 42, 7]
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
    runner = ModelRunner(model, max_batch_size=1, max_model_len=32)
    torch.testing.assert_close(runner.prefill(0, ids[:4], logits_for_all=True), full[:4], rtol=1e-4, atol=1e-4)
    for t in (4, 5):
        torch.testing.assert_close(runner.decode([ids[t]])[0], full[t], rtol=1e-4, atol=1e-4)


def test_cpu_sparse_path_is_chosen_only_when_very_sparse_and_matches_dense():
    from llmcomp.kernels import sparse_cpu

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=g)
    very = SparseLinear.from_dense(w, prune_mask(torch.rand(48, 64, generator=g), 0.95, "unstructured"))
    half = SparseLinear.from_dense(w, prune_mask(torch.rand(48, 64, generator=g), 0.5, "unstructured"))
    x1, x_long = torch.randn(1, 64, generator=g), torch.randn(64, 64, generator=g)
    sparse_cpu.set_enabled(None)
    try:
        assert sparse_cpu.wants(very, x1) and not sparse_cpu.wants(half, x1)
        assert not sparse_cpu.wants(very, x_long)  # prefill-sized inputs stay dense
        out = very(x1)
        assert getattr(very, "_csr", None) is not None  # it really ran sparse
        torch.testing.assert_close(out, x1 @ very.dequantized_weight().T, rtol=1e-5, atol=1e-5)
        sparse_cpu.set_enabled(False)
        assert not sparse_cpu.wants(very, x1)
    finally:
        sparse_cpu.set_enabled(None)
