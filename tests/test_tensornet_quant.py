"""Quantized MPO cores (``core_bits`` 4 / 8): stored codes and scales against a naive float64
dequantization, the forward against the dense product, exact checkpoint round trip, loading in
transformers and the native runtime, and the chained recipe."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp import intquant
from llmcomp.healing import trainable_parameters
from llmcomp.modules.mpo_linear import MPOLinear, MPOSpec, core_matrix_shape, mpo_to_matrix
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.tensornet import mpo_decompose, quantize_cores
from llmcomp.pipeline import compress
from llmcomp.recipes import load_recipe, recipe_from_dict
from llmcomp.runtime import ModelRunner


def float_mpo(seed: int, out_factors: list[int], in_factors: list[int], chi: int, bias: bool = False) -> MPOLinear:
    g = torch.Generator().manual_seed(seed)
    n_out, n_in = torch.tensor(out_factors).prod().item(), torch.tensor(in_factors).prod().item()
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    cores, _ = mpo_decompose(w, out_factors, in_factors, [chi] * (len(out_factors) - 1))
    b = torch.randn(n_out, generator=g) if bias else None
    return MPOLinear.from_cores([c.float() for c in cores], b, torch.float32)


def naive_core(module: MPOLinear, k: int) -> torch.Tensor:
    """Core ``k`` dequantized in float64 by explicit loops: ``(q - z) * s`` with group ``col // g``."""
    shape = module.core_shapes[k]
    rows, cols = core_matrix_shape(shape)
    bits, group = module.core_bits, module.core_group_sizes[k]
    words = getattr(module, f"core_{k}_packed")
    scale = getattr(module, f"core_{k}_scale").double()
    zero = None if module.core_symmetric else getattr(module, f"core_{k}_zero_point")
    out = torch.empty(rows, cols, dtype=torch.float64)
    per_word = 32 // bits
    for r in range(rows):
        for c in range(cols):
            if bits == 8:
                q = int(words[r, c])
            else:  # unsigned value q + 2^(b-1), lowest bits first
                word = int(words[r, c // per_word]) & 0xFFFFFFFF
                q = ((word >> (bits * (c % per_word))) & (2**bits - 1)) - 2 ** (bits - 1)
            z = 0 if zero is None else int(zero[r, c // group])
            out[r, c] = (q - z) * float(scale[r, c // group])
    return out.reshape(shape)


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(8, 16, False), (4, 8, False), (4, -1, True)])
def test_stored_codes_are_finequants_fit_and_dequantize_exactly(bits: int, group: int, symmetric: bool) -> None:
    module = float_mpo(0, [4, 6], [5, 6], chi=7)
    qmod = quantize_cores(module, bits, group, symmetric)
    assert qmod.spec().core_bits == bits and not list(qmod.parameters())
    for k, core in enumerate(module.cores):
        rows, cols = core_matrix_shape(tuple(core.shape))
        ref = fit.fit_quantize(core.reshape(rows, cols), bits, intquant.effective_group_size(group, cols), symmetric,
                               scale_dtype=torch.float32)
        got = qmod.quantized_core(k)
        assert torch.equal(got.q, ref.q) and torch.equal(got.scale, ref.scale)
        assert (got.zero is None) == symmetric and (symmetric or torch.equal(got.zero, ref.zero))
        naive = naive_core(qmod, k)
        torch.testing.assert_close(qmod.cores[k].double(), naive, rtol=1e-6, atol=1e-7)  # fp32 rounding only
    ref_w = mpo_to_matrix([naive_core(qmod, k) for k in range(2)])
    torch.testing.assert_close(qmod.dequantized_weight(torch.float64), ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 64])  # contraction (decode) and transient rebuild (prefill)
def test_forward_is_the_dense_product_of_the_dequantized_cores(rows: int) -> None:
    module = float_mpo(1, [4, 3, 4], [2, 5, 3], chi=6, bias=True)
    qmod = quantize_cores(module, 8, 8)
    x = torch.randn(rows, 30, generator=torch.Generator().manual_seed(rows))
    ref = x.double() @ mpo_to_matrix([naive_core(qmod, k) for k in range(3)]).T + qmod.bias.double()
    torch.testing.assert_close(qmod(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_int8_cores_lose_little_and_int4_more_at_a_fraction_of_the_bytes() -> None:
    module = float_mpo(2, [8, 8], [8, 12], chi=24)
    w = module.dequantized_weight(torch.float64)
    errors, sizes = {}, {}
    for bits in (8, 4):
        qmod = quantize_cores(module, bits, 32)
        errors[bits] = float((qmod.dequantized_weight(torch.float64) - w).norm() / w.norm())
        sizes[bits] = qmod.storage_bytes
    assert 0 < errors[8] < errors[4] < 0.2
    assert sizes[4] < sizes[8] < module.storage_bytes / 3


def test_spec_rebuilds_the_layout_and_refuses_bad_groups() -> None:
    qmod = quantize_cores(float_mpo(3, [4, 6], [5, 6], chi=7), 4, 16)
    spec = MPOSpec.model_validate(json.loads(qmod.spec().model_dump_json()))
    fresh = MPOLinear.from_spec(spec, torch.float32)
    fresh.load_state_dict(qmod.state_dict(), strict=True)
    x = torch.randn(2, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fresh(x), qmod(x))
    with pytest.raises(ValueError, match="core_group_size"):
        MPOSpec(**{**spec.model_dump(), "core_group_size": 0})
    with pytest.raises(ValueError, match="already"):
        quantize_cores(qmod, 8)


@pytest.fixture(scope="module")
def qmpo_ckpt(tiny_llama_dir, tmp_path_factory):
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.5, "num_cores": 2,
                                           "dense_first_blocks": 1, "core_bits": 8, "core_group_size": 32}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path_factory.mktemp("qmpo") / "out", progress=False)
    return out


def test_checkpoint_round_trip_logits_and_runtime(qmpo_ckpt, tiny_llama_dir) -> None:
    ckpt = qmpo_ckpt.output_dir
    mods = qmpo_ckpt.report["modules"]
    assert mods and all(m["core_bits"] == 8 and m["rel_error"] >= m["rel_error_float_cores"] for m in mods.values())
    assert not any(m["balanced_cores"] for m in mods.values())  # balancing is for healable (float) cores
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    buffers = dict(model.named_buffers())
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as fh:
        stored = {n: fh.get_tensor(n) for n in fh.keys() if ".core_" in n}  # noqa: SIM118
    assert any(n.endswith("_packed") for n in stored) and not any(n.endswith(("core_0", "core_1")) for n in stored)
    for name, tensor in stored.items():
        assert buffers[name].dtype == tensor.dtype and torch.equal(buffers[name], tensor), name
    assert not trainable_parameters(model)  # int cores are not healable
    twin = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for name, module in model.named_modules():
        if isinstance(module, MPOLinear):
            assert module.core_bits == 8
            twin.get_submodule(name).weight.data.copy_(module.dequantized_weight(torch.float32))
    ids = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits[0]
        torch.testing.assert_close(twin(ids).logits[0], ref, rtol=1e-4, atol=1e-4)
    runner = ModelRunner(model, max_batch_size=1, max_model_len=32, prefill_chunk=4)
    assert runner.backend.startswith("lean")
    tokens = ids[0].tolist()
    torch.testing.assert_close(runner.prefill(0, tokens[:8], logits_for_all=True), ref[:8], rtol=1e-4, atol=1e-4)
    for t in range(8, 11):
        torch.testing.assert_close(runner.decode([tokens[t]])[0], ref[t], rtol=1e-4, atol=1e-4)


def test_chained_recipe_quantizes_the_cores_too(tiny_llama_dir, tmp_path) -> None:
    out = compress(str(tiny_llama_dir), load_recipe("tensornet-50-fq4"), tmp_path / "c", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    mpos = [m for m in model.modules() if isinstance(m, MPOLinear)]
    assert mpos and all(m.core_bits is not None for m in mpos)
    qc = json.loads((out.output_dir / "config.json").read_text())["quantization_config"]
    from llmcomp.serve.vllm_spec import check_checkpoint

    assert check_checkpoint(qc) == len(qc["modules"])


def test_heal_refuses_int_cores_with_one_line(qmpo_ckpt, tiny_llama_dir, tmp_path) -> None:
    from typer.testing import CliRunner

    from llmcomp.cli.main import app

    res = CliRunner().invoke(app, ["heal", str(qmpo_ckpt.output_dir), "--teacher", str(tiny_llama_dir),
                                   "-o", str(tmp_path / "h")])
    assert res.exit_code == 2 and "quantized MPO cores" in res.output and not (tmp_path / "h").exists()
