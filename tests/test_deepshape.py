"""DeepShape: the output-error bound holds exactly, the shape moves toward the target, masks are
kept, and the pass runs in the pipeline before a quantizer (float64 references)."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import llmcomp  # noqa: F401
from llmcomp import gg, intquant
from llmcomp.passes.base import weight_error
from llmcomp.passes.deepshape import DeepShapeConfig, HessianSketch, OutputError, reshape_weight, shape_penalty
from llmcomp.pipeline import compress
from llmcomp.recipes import load_recipe, recipe_from_dict


def correlated_hessian(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(4 * k, k, generator=gen) @ mix * (torch.rand(k, generator=gen) * 3 + 0.1)
    return 2 * x.T @ x / x.shape[0]


def test_output_error_against_float64_trace():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    d = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    h = correlated_hessian(16, 2)
    ref = sum(float(d[i].double() @ h.double() @ d[i].double()) for i in range(6))
    ref /= sum(float(w[i].double() @ h.double() @ w[i].double()) for i in range(6))
    err = OutputError(w, HessianSketch.of(h, rank=4))
    assert err.exact(d) == pytest.approx(ref, rel=1e-5)
    full = OutputError(w, HessianSketch.of(h, rank=16))  # full rank: the sketch is H itself
    assert float(full.approx(d)) == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("bound", [1e-3, 1e-2])
def test_bound_holds_and_shape_moves_toward_target(bound):
    w = gg.sample((48, 128), 1.2, 0.05, generator=torch.Generator().manual_seed(3))
    h = correlated_hessian(128, 4)
    cfg = DeepShapeConfig(target_shape=4.0, max_output_error=bound, steps=60, lr=0.05, rank=16)
    new, err = reshape_weight(w, h, cfg)
    d = (new - w).double()
    exact = float(((d @ h.double()) * d).sum() / ((w.double() @ h.double()) * w.double()).sum())
    assert err == pytest.approx(exact, rel=1e-4)
    assert exact <= bound * (1 + 1e-5)
    assert gg.fit(new).shape > gg.fit(w).shape + 0.02
    assert float(shape_penalty(new, 64, 4.0)) < float(shape_penalty(w, 64, 4.0))
    q = lambda m: weight_error(m, intquant.dequantize_qw(intquant.quantize_rtn(m, 4, 64, True)))  # noqa: E731
    assert q(new) < q(w)


def test_mask_is_kept():
    w = gg.sample((16, 64), 1.0, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(16, 64, generator=torch.Generator().manual_seed(6)) > 0.5
    w = w * mask
    new, _ = reshape_weight(w, correlated_hessian(64, 7), DeepShapeConfig(steps=10, rank=8), mask)
    assert torch.count_nonzero(new[~mask]) == 0
    assert not torch.equal(new[mask], w[mask])


def test_pipeline_deepshape_then_int4(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict({"calibration": {"num_samples": 4, "seq_len": 64},
                               "passes": [{"type": "deepshape", "steps": 15, "rank": 8}]})
    out = compress(str(tiny_llama_dir), recipe, tmp_path / "ds", progress=False)
    reports = {n: r for n, r in out.report["modules"].items() if "output_error" in r}
    assert reports
    for r in reports.values():
        assert r["output_error"] <= DeepShapeConfig().max_output_error * (1 + 1e-5)
        assert {"gg_shape_before", "gg_shape", "entropy_bits_before", "entropy_bits", "int4_error_after"} <= set(r)
    assert sum(r["int4_error_after"] < r["int4_error_before"] for r in reports.values()) > len(reports) / 2
    reshaped = AutoModelForCausalLM.from_pretrained(out.output_dir)
    assert isinstance(reshaped.model.layers[0].mlp.down_proj, nn.Linear)
    for name in ("deepshape-then-int4", "deepshape-then-gg4"):
        assert [p.type for p in load_recipe(name).passes][0] == "deepshape"
