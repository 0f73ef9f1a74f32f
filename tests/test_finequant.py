"""The FineQuant pass on tiny models: adaptivity, fused-projection tying, overrides, reports."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_llama
from torch import nn

from llmcomp import intquant
from llmcomp.modules import QuantLinear
from llmcomp.passes import pass_registry
from llmcomp.passes.base import apply_to_layer
from llmcomp.passes.finequant import FineQuantConfig, FineQuantPass, _Search, fused_groups


def _tiny_model(seed: int = 0):

    return random_llama(seed, hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)


def _run(model, **cfg):
    p = FineQuantPass(FineQuantConfig(**cfg))
    reports = {}
    for i, layer in enumerate(model.model.layers):
        reports.update(apply_to_layer(p, layer, f"model.layers.{i}"))
    return reports


def _outlier_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian rows with a few huge entries per row: coarse grids waste their range on them."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    cols = torch.randint(0, k, (n, 3), generator=gen)
    w.scatter_(1, cols, 0.5 * torch.randn(n, 3, generator=gen).sign())
    return w


def test_registered_and_config_forbids_typos() -> None:
    assert pass_registry()["finequant"] is FineQuantPass
    with pytest.raises(ValueError):
        FineQuantConfig(bitz=4)
    with pytest.raises(ValueError):
        FineQuantConfig(bits=5)


def test_granularity_adapts_to_outliers() -> None:
    cfg = FineQuantConfig(bits=4, fit_iters=2)
    smooth = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    spiky = _outlier_weight(64, 512, seed=2)
    g_smooth = _Search(smooth, cfg, None).choose(4, False)
    g_spiky = _Search(spiky, cfg, None).choose(4, False)
    assert g_spiky < g_smooth
    assert g_spiky >= cfg.min_group_size
    # threshold 0 refines whenever error drops at all: down to the floor.
    assert _Search(smooth, FineQuantConfig(threshold=0.0, fit_iters=1), None).choose(4, False) == 32


def test_target_error_stops_refinement() -> None:
    spiky = _outlier_weight(32, 512, seed=3)
    free = _Search(spiky, FineQuantConfig(bits=8, fit_iters=1, threshold=0.0), None)
    assert free.choose(8, True) < 512
    per_channel_err = free.errors[512]
    capped_cfg = FineQuantConfig(bits=8, fit_iters=1, threshold=0.0, target_error=per_channel_err * 1.01)
    capped = _Search(spiky, capped_cfg, None)
    assert capped.choose(8, True) == 512 and list(capped.errors) == [512]


def test_floor_and_ceiling_are_respected() -> None:
    spiky = _outlier_weight(32, 512, seed=3)
    assert _Search(spiky, FineQuantConfig(min_group_size=128, fit_iters=1), None).choose(4, False) >= 128
    search = _Search(spiky, FineQuantConfig(max_group_size=64, min_group_size=64, fit_iters=1), None)
    assert search.choose(4, False) == 64 and list(search.errors) == [64]


def test_fused_groups_partition() -> None:
    names = [f"m.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
        f"m.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    groups = fused_groups(names, FineQuantConfig().fused_sets)
    as_sets = sorted(sorted(g) for g in groups)
    assert sorted(names[:3]) in as_sets and sorted(names[4:6]) in as_sets
    assert [names[3]] in as_sets and [names[6]] in as_sets and len(groups) == 4


def test_pass_ties_fused_projections_and_reports_choices() -> None:
    model = _tiny_model()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # make k_proj outlier-heavy: its siblings must follow its finer grid
        attn.k_proj.weight.copy_(_outlier_weight(*attn.k_proj.weight.shape, seed=4))
    reports = _run(model, bits=4, fit_iters=2)
    assert len(reports) == 2 * 7
    layer0 = "model.layers.0"
    qkv = [reports[f"{layer0}.self_attn.{p}_proj"] for p in "qkv"]
    assert len({(r["bits"], r["group_size"], r["symmetric"]) for r in qkv}) == 1
    assert qkv[0]["group_size"] == min(r["own_group_size"] for r in qkv)
    assert reports[f"{layer0}.self_attn.k_proj"]["own_group_size"] < reports[f"{layer0}.self_attn.q_proj"][
        "own_group_size"
    ]
    gate, up = reports[f"{layer0}.mlp.gate_proj"], reports[f"{layer0}.mlp.up_proj"]
    assert gate["group_size"] == up["group_size"]
    for name, rep in reports.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and module.group_size == rep["group_size"]
        assert rep["numel"] == module.in_features * module.out_features
        assert str(rep["group_size"]) in rep["ladder_rel_error"]
        expect = intquant.storage_bits_per_weight(module.in_features, rep["group_size"], 4, True, 32)
        assert rep["bits_per_weight"] == pytest.approx(expect)
    assert isinstance(model.lm_head, nn.Linear) and type(model.lm_head) is nn.Linear


def test_untied_siblings_may_differ() -> None:
    model = _tiny_model()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.copy_(_outlier_weight(*attn.k_proj.weight.shape, seed=4))
    reports = _run(model, bits=4, fit_iters=2, tie_fused=False)
    k = reports["model.layers.0.self_attn.k_proj"]
    q = reports["model.layers.0.self_attn.q_proj"]
    assert k["group_size"] < q["group_size"] and k["tied_with"] == []


def test_ignore_and_overrides() -> None:
    model = _tiny_model()
    down_override = {"*.mlp.down_proj": {"bits": 8, "symmetric": True}}
    reports = _run(model, bits=4, fit_iters=1, ignore=["*.layers.1.*"], overrides=down_override)
    assert not any(".layers.1." in n for n in reports)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    down = reports["model.layers.0.mlp.down_proj"]
    assert down["bits"] == 8 and down["symmetric"]
    # Overrides on one fused sibling lift the whole group to the most precise choice.
    model = _tiny_model()
    reports = _run(model, bits=4, fit_iters=1, overrides={"*.v_proj": {"bits": 8}})
    assert {reports[f"model.layers.0.self_attn.{p}_proj"]["bits"] for p in "qkv"} == {8}
    assert reports["model.layers.0.self_attn.o_proj"]["bits"] == 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_model_stays_close_to_original(bits: int, symmetric: bool) -> None:
    model = _tiny_model(seed=5)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        _run(model, bits=bits, symmetric=symmetric, fit_iters=3)
        out = model(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    # Relative logit error shrinks with each extra bit (measured ~2x per bit; generous bounds).
    bound = {2: 0.8, 3: 0.4, 4: 0.2, 8: 0.02}[bits]
    assert rel < bound


def test_k_not_divisible_by_group() -> None:
    """intermediate 320 = 2.5 groups of 128: the short last group must be handled end to end."""
    model = _tiny_model(seed=6)
    reports = _run(model, bits=4, fit_iters=1, min_group_size=128, threshold=0.0)
    down = reports["model.layers.0.mlp.down_proj"]
    assert down["group_size"] == 128
    module = model.model.layers[0].mlp.down_proj
    assert module.weight_scale.shape == (128, 3)


def test_require_divisible_avoids_short_groups() -> None:
    model = _tiny_model(seed=7)  # K = 128 (attention, gate/up) and 320 (down): 320 % 64 == 0, % 128 != 0
    reports = _run(model, bits=4, fit_iters=1, threshold=0.0, min_group_size=64, require_divisible=True)
    for name, rep in reports.items():
        k = model.get_submodule(name).in_features
        assert k % rep["group_size"] == 0
    assert reports["model.layers.0.mlp.down_proj"]["group_size"] == 64


def test_activation_aware_option_declares_calibration() -> None:
    assert not FineQuantPass(FineQuantConfig()).needs().calibration
    assert FineQuantPass(FineQuantConfig(activation_aware=True)).needs().calibration


@pytest.mark.parametrize(
    ("name", "bits"),
    [("finequant-w8", 8), ("finequant-w4", 4), ("finequant-w3", 3), ("rtn-w8", 8), ("rtn-w4-g32", 4),
     ("rtn-w4-g64", 4), ("rtn-w4-g128", 4), ("rtn-w4-pc", 4)],
)
def test_builtin_recipes(name: str, bits: int) -> None:
    from llmcomp.recipes import load_recipe

    (p,) = load_recipe(name).build_passes()
    assert p.config.bits == bits and not p.needs().calibration
    assert not getattr(p.config, "activation_aware", False)
    if name in ("finequant-w4", "finequant-w3"):
        # The adaptive recipes must really adapt: an outlier-heavy matrix leaves per-channel.
        spiky = _outlier_weight(64, 512, seed=8)
        assert _Search(spiky, p.config, None).choose(bits, p.config.symmetric) < 512


@pytest.mark.parametrize(("name", "bits"), [("finequant-w4-aw", 4), ("finequant-w3-aw", 3)])
def test_activation_aware_recipes_request_calibration(name: str, bits: int) -> None:
    from llmcomp.recipes import load_recipe

    recipe = load_recipe(name)
    (p,) = recipe.build_passes()
    assert p.config.bits == bits and p.config.activation_aware and p.needs().calibration
    assert recipe.calibration.num_samples > 0 and recipe.calibration.data_file is None  # offline text by default


def test_activation_aware_fit_lowers_the_real_output_error() -> None:
    """LLM inputs carry a few channels with hundreds of times the energy of the rest; weighting the
    fit by E[x_j^2] must lower the error of W x on those inputs, measured directly."""
    from llmcomp.calibration import collect_input_stats

    model = _tiny_model(seed=3)
    gen = torch.Generator().manual_seed(4)
    for layer in model.model.layers:  # outlier channels, as RMSNorm gains create them in real LLMs
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[torch.randperm(128, generator=gen)[:3]] = 25.0
    ids = torch.randint(0, 256, (6, 40), generator=gen)
    layer = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    targets = {f"model.layers.0.{n}": layer.get_submodule(n) for n in names}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in targets.items()]
    with collect_input_stats(targets) as stats, torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    weights = {n: m.weight.detach().clone() for n, m in targets.items()}

    def output_error(aware: bool) -> dict[str, float]:
        cfg = FineQuantConfig(bits=4, min_group_size=32, max_group_size=32, activation_aware=aware, tie_fused=False)
        fresh = _tiny_model(seed=3).model.layers[0]
        for n, w in weights.items():
            fresh.get_submodule(n.removeprefix("model.layers.0.")).weight.data.copy_(w)
        apply_to_layer(FineQuantPass(cfg), fresh, "model.layers.0", stats if aware else None)
        errs = {}
        for n, w in weights.items():
            q = fresh.get_submodule(n.removeprefix("model.layers.0.")).dequantized_weight(torch.float64)
            x = inputs[n].double()
            errs[n] = float((x @ (q - w.double()).T).norm() / (x @ w.double().T).norm())
        return errs

    plain, aware = output_error(False), output_error(True)
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"):  # the outlier inputs
        assert aware[n] < 0.9 * plain[n], (n, aware[n], plain[n])
    for n in plain:  # and no module gets worse
        assert aware[n] < plain[n], (n, aware[n], plain[n])


def test_threshold_budget_replays_the_ladder_walk() -> None:
    """bench/threshold_budget.py predicts, from one threshold-0 report, the bits any price gives."""
    from bench_modules import load_bench

    tool = load_bench("threshold_budget")

    model = _tiny_model(seed=6)
    for layer in model.model.layers:  # a few outliers so different prices pick different rungs
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lin.weight.data.copy_(_outlier_weight(*lin.weight.shape, seed=lin.weight.shape[0]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full = _run(model, bits=4, threshold=0.0)
    seen = set()
    for threshold in (0.002, 0.01, 0.05):
        fresh = _tiny_model(seed=6)
        fresh.load_state_dict(state)
        real = _run(fresh, bits=4, threshold=threshold)
        numel = sum(r["numel"] for r in real.values())
        real_bits = sum(r["bits_per_weight"] * r["numel"] for r in real.values()) / numel
        predicted, hist = tool.budget(full, threshold, floor=32, scale_bits=32)  # float32 model: fp32 scales
        assert predicted == pytest.approx(real_bits, rel=1e-12)
        assert sum(hist.values()) == len(real)
        seen.add(round(predicted, 9))
    assert len(seen) > 1  # the prices really pick different grids here
