"""The pass contract inside the pipeline: declared needs, shared input-group statistics, sequential
groups, model-level hooks, capability targeting and the per-module state (mask, pass history).

Statistics are checked against independent float64 recomputations from plain forward hooks on a
whole in-memory model, never against llmcomp's own statistics code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import llmcomp  # noqa: F401  (registers the checkpoint format with transformers)
from llmcomp.calibration import InputStats, calibration_batches, offline_calibration_text
from llmcomp.cli.inspect_cmd import describe
from llmcomp.cli.main import app
from llmcomp.errors import RecipeError
from llmcomp.formats.partial import partial_dir
from llmcomp.modules import QuantLinear
from llmcomp.passes.base import CompressionPass, LayerWork, Needs, PassConfig, pass_registry, register_pass
from llmcomp.passes.wanda import wanda_mask, wanda_scores
from llmcomp.pipeline import CALIBRATION_BATCH, Pipeline, compress
from llmcomp.recipes import recipe_from_dict

CALIBRATION = {"num_samples": 4, "seq_len": 32}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Input groups in forward order: modules of one group read the very same tensor.
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
PROBE = "test_lifecycle_probe"


# -- a recording test pass ---------------------------------------------------------------------
class ProbeConfig(PassConfig):
    moments: bool = False
    hessian: bool = False
    sequential: bool = False
    scale: float = 1.0  # multiply every target's weight by this (1.0 leaves the model unchanged)


@dataclass
class Call:
    prefix: str
    targets: list[str]
    stats: dict[str, InputStats] | None


class ProbePass(CompressionPass):
    """Declares what its config says and records every hook call it gets."""

    name = PROBE
    Config = ProbeConfig

    def __init__(self, config: PassConfig) -> None:
        super().__init__(config)
        self.calls: list[Call] = []
        self.begun: list[Any] = []
        self.ended = 0

    def needs(self) -> Needs:
        cfg: ProbeConfig = self.config  # type: ignore[assignment]
        return Needs(moments=cfg.moments, hessian=cfg.hessian, sequential=cfg.sequential)

    def begin_model(self, model: Any) -> None:
        self.begun.append(model)

    def end_model(self, model: Any) -> dict[str, Any]:
        self.ended += 1
        return {"calls": len(self.calls), "layers": sorted({c.prefix for c in self.calls})}

    def process_layer(self, work: LayerWork) -> None:
        scale = self.config.scale  # type: ignore[attr-defined]
        self.calls.append(Call(work.prefix, list(work.targets), work.stats))
        for name, module in work.targets.items():
            with torch.no_grad():
                module.weight.mul_(scale)
            work.states[name].passes.append({"pass": self.name, "scale": scale})


def _register(cls: type[CompressionPass]) -> type[CompressionPass]:
    """Register once, even if pytest imports this module twice."""
    return pass_registry().get(cls.name) or register_pass(cls)


_register(ProbePass)


def _probe_pipeline(src: Path, **probe: Any) -> tuple[Pipeline, ProbePass]:
    recipe = recipe_from_dict({"calibration": CALIBRATION, "passes": [{"type": PROBE, **probe}]})
    pipe = Pipeline(str(src), recipe, progress=False)
    (p,) = pipe.passes
    return pipe, p  # type: ignore[return-value]


# -- independent references ----------------------------------------------------------------------
def _calibration_ids(model_dir: Path) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(model_dir)
    return calibration_batches(tok, offline_calibration_text(), CALIBRATION["num_samples"], CALIBRATION["seq_len"])


def _capture_inputs(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every input row each module receives in a forward of ``model`` over ``ids``, as float64."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = []
    for name, module in modules.items():
        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            rows[_name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double().clone())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for s in range(0, ids.shape[0], CALIBRATION_BATCH):
                model(input_ids=ids[s : s + CALIBRATION_BATCH], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def _load(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _count_layer_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from transformers.models.llama import modeling_llama

    calls = [0]
    original = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)
    return calls


# -- declared needs ------------------------------------------------------------------------------
def test_no_needs_means_no_calibration_forward(tiny_llama_dir, tmp_path, monkeypatch):
    """A calibration-free pass must not pay for calibration: no text is tokenized, no layer runs."""
    import llmcomp.pipeline as pipeline_mod

    forwards = _count_layer_forwards(monkeypatch)
    tokenized = [0]
    real_batches = pipeline_mod.calibration_batches

    def counting_batches(*args, **kwargs):
        tokenized[0] += 1
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "calibration_batches", counting_batches)
    pipe, probe = _probe_pipeline(tiny_llama_dir)
    pipe.run(tmp_path / "out")
    assert forwards[0] == 0 and tokenized[0] == 0
    assert len(probe.calls) == 3 and all(c.stats is None for c in probe.calls)

    # The counters do see a pass that asks for statistics (so the check above can fail).
    pipe, probe = _probe_pipeline(tiny_llama_dir, moments=True)
    pipe.run(tmp_path / "out2")
    assert forwards[0] > 0 and tokenized[0] == 1
    assert all(c.stats is not None for c in probe.calls)


def test_moments_only_collects_no_hessian(tiny_llama_dir, tmp_path):
    pipe, probe = _probe_pipeline(tiny_llama_dir, moments=True)
    pipe.run(tmp_path / "out")
    stats = [s for c in probe.calls for s in c.stats.values()]
    assert stats and all(s.xtx is None for s in stats)
    with pytest.raises(RuntimeError, match="hessian was not collected"):
        _ = stats[0].hessian


def test_hessian_is_shared_per_input_group_and_matches_float64_reference(tiny_llama_dir, tmp_path):
    pipe, probe = _probe_pipeline(tiny_llama_dir, hessian=True)
    pipe.run(tmp_path / "out")
    assert [c.prefix for c in probe.calls] == [f"model.layers.{i}" for i in range(3)]

    model = _load(tiny_llama_dir)
    ids = _calibration_ids(tiny_llama_dir)
    n_rows = ids.numel()
    for i, call in enumerate(probe.calls):
        prefix = f"model.layers.{i}"
        stats = call.stats
        assert set(stats) == {f"{prefix}.{n}" for n in LINEARS}
        # q/k/v share one object, gate/up another; o_proj and down_proj have their own.
        q, k, v, o, g, u, d = (stats[f"{prefix}.{n}"] for n in LINEARS)
        assert q is k is v and g is u
        assert len({id(q), id(o), id(g), id(d)}) == 4
        assert q.modules == [f"{prefix}.{n}" for n in GROUPS[0]]

        layer = model.model.layers[i]
        inputs = _capture_inputs(model, {n: layer.get_submodule(n) for n in LINEARS}, ids)
        for group in GROUPS:
            for n in group[1:]:  # the reference agrees that the group reads one tensor
                assert torch.equal(inputs[n], inputs[group[0]])
            x = inputs[group[0]]
            got = stats[f"{prefix}.{group[0]}"]
            assert got.count == n_rows == x.shape[0]
            want = 2.0 / n_rows * (x.T @ x)
            torch.testing.assert_close(got.hessian.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
            torch.testing.assert_close(got.sum_sq, (x * x).sum(0), rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(got.sum, x.sum(0), rtol=1e-5, atol=1e-6)


# -- sequential groups -----------------------------------------------------------------------------
SCALE = 0.5


def test_sequential_pass_sees_statistics_after_earlier_groups_changed(tiny_llama_dir, tmp_path):
    """Each group's statistics come from a forward in which the groups before it were already
    rewritten (o_proj sees the scaled q/k/v); the reference scales a whole model step by step."""
    pipe, probe = _probe_pipeline(tiny_llama_dir, moments=True, sequential=True, scale=SCALE)
    out = pipe.run(tmp_path / "out").output_dir
    expected_calls = [[f"model.layers.{i}.{n}" for n in group] for i in range(3) for group in GROUPS]
    assert [c.targets for c in probe.calls] == expected_calls
    for call in probe.calls:
        assert set(call.stats) == set(call.targets)
        assert len({id(s) for s in call.stats.values()}) == 1  # one group, one object

    model = _load(tiny_llama_dir)
    ids = _calibration_ids(tiny_llama_dir)
    calls = iter(probe.calls)
    for i, layer in enumerate(model.model.layers):
        modules = {n: layer.get_submodule(n) for n in LINEARS}
        before = _capture_inputs(model, modules, ids)  # this layer untouched (earlier layers done)
        for k, group in enumerate(GROUPS):
            x = _capture_inputs(model, {group[0]: modules[group[0]]}, ids)[group[0]]
            got = next(calls).stats[f"model.layers.{i}.{group[0]}"]
            torch.testing.assert_close(got.sum_sq, (x * x).sum(0), rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(got.sum, x.sum(0), rtol=1e-5, atol=1e-6)
            stale = (before[group[0]] ** 2).sum(0)
            if k == 0:
                torch.testing.assert_close(stale, (x * x).sum(0), rtol=1e-6, atol=0)
            else:  # the statistics before the earlier groups changed are clearly different
                assert float((got.sum_sq - stale).abs().max() / stale.abs().max()) > 0.05
            with torch.no_grad():
                for n in group:
                    modules[n].weight.mul_(SCALE)

    # And the written model is the scaled reference.
    written = _load(out)
    for i in range(3):
        for n in LINEARS:
            torch.testing.assert_close(written.model.layers[i].get_submodule(n).weight,
                                       model.model.layers[i].get_submodule(n).weight, rtol=0, atol=0)


# -- model-level hooks -----------------------------------------------------------------------------
def test_begin_and_end_model_run_once_and_end_summary_is_reported(tiny_llama_dir, tmp_path):
    pipe, probe = _probe_pipeline(tiny_llama_dir)
    result = pipe.run(tmp_path / "out")
    assert len(probe.begun) == 1 and probe.ended == 1
    info = probe.begun[0]
    model = _load(tiny_llama_dir)
    expected = {f"model.layers.{i}.{n}": tuple(m.weight.shape)
                for i, layer in enumerate(model.model.layers)
                for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert len(expected) == 3 * 7
    assert info.module_shapes == expected
    assert info.num_layers == 3 and info.layer_prefix == "model.layers"

    summary = {"calls": 3, "layers": ["model.layers.0", "model.layers.1", "model.layers.2"]}
    assert result.report["passes"] == {PROBE: summary}
    on_disk = json.loads((result.output_dir / "llmcomp_report.json").read_text())
    assert on_disk["passes"][PROBE] == summary


# -- capability targeting --------------------------------------------------------------------------
def test_pass_on_an_already_quantized_module_is_a_one_line_recipe_error(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict({"calibration": CALIBRATION,
                               "passes": [{"type": "finequant", "bits": 4}, {"type": "wanda", "sparsity": 0.5}]})
    with pytest.raises(RecipeError) as err:
        compress(str(tiny_llama_dir), recipe, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "'wanda'" in message and "already a int_affine module (after finequant)" in message
    assert "model.layers.0." in message
    assert not (tmp_path / "out").exists()


def test_targets_selecting_nothing_fail_before_any_layer(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict({"passes": [{"type": "rtn", "bits": 8},
                                          {"type": "rtn", "bits": 4, "targets": ["*.nonexistent"]}]})
    layers_seen: list[int] = []
    pipe = Pipeline(str(tiny_llama_dir), recipe, progress=False)
    with pytest.raises(RecipeError, match=r"passes\[1\] \(rtn\).*select no module") as err:
        pipe.run(tmp_path / "out", on_layer=lambda i, n: layers_seen.append(i))
    assert "\n" not in str(err.value)
    assert layers_seen == []
    assert not partial_dir(tmp_path / "out").exists() and not (tmp_path / "out").exists()


# -- module state: the mask survives quantization ---------------------------------------------------
WANDA = {"type": "wanda", "sparsity": 0.5}
FINEQUANT = {"type": "finequant", "bits": 4}


@pytest.fixture(scope="module")
def pruned_then_quantized(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Runs on the same calibration: wanda alone, wanda + finequant, the same with
    ``respect_mask: false``, and finequant alone."""
    root = tmp_path_factory.mktemp("mask")
    recipes = {
        "wanda": [WANDA],
        "both": [WANDA, FINEQUANT],
        "ignore_mask": [WANDA, {**FINEQUANT, "respect_mask": False}],
        "alone": [FINEQUANT],
    }
    return {key: compress(str(tiny_llama_dir), recipe_from_dict({"calibration": CALIBRATION, "passes": passes}),
                          root / key, progress=False).output_dir
            for key, passes in recipes.items()}


def _reference_masks(src: Path, compressed: Path) -> dict[str, torch.Tensor]:
    """Wanda's keep-masks recomputed from scratch: layer i is scored on the original weights with
    the inputs that the already compressed layers before it produce (as the pipeline does)."""
    comp, orig = _load(compressed), _load(src)
    ids = _calibration_ids(src)
    masks = {}
    for i in range(len(orig.model.layers)):
        compressed_layer = comp.model.layers[i]
        comp.model.layers[i] = orig.model.layers[i]
        try:
            layer = comp.model.layers[i]
            inputs = _capture_inputs(comp, {n: layer.get_submodule(n) for n in LINEARS}, ids)
        finally:
            comp.model.layers[i] = compressed_layer
        for n in LINEARS:
            w = orig.model.layers[i].get_submodule(n).weight.detach()
            masks[f"model.layers.{i}.{n}"] = wanda_mask(wanda_scores(w, (inputs[n] ** 2).sum(0)), 0.5, "unstructured")
    return masks


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return {f"model.layers.{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(model.model.layers)
            for n in LINEARS}


def test_quantized_weights_are_exactly_zero_where_wanda_pruned(pruned_then_quantized, tiny_llama_dir):
    masks = _reference_masks(tiny_llama_dir, pruned_then_quantized["both"])
    # Layer 0 sees identical inputs in the wanda-only run: its zero pattern is the same mask.
    dense = _modules(_load(pruned_then_quantized["wanda"]))
    for name in (n for n in masks if n.startswith("model.layers.0.")):
        assert torch.equal(dense[name].weight != 0, masks[name]), name

    quantized = _modules(_load(pruned_then_quantized["both"]))
    for name, keep in masks.items():
        module = quantized[name]
        assert isinstance(module, QuantLinear), name
        w = module.dequantized_weight(torch.float64)
        k = w.shape[1]
        assert torch.equal((~keep).sum(1), torch.full((w.shape[0],), k // 2)), name  # 50% per row
        assert _pruned_nonzeros({name: module}, {name: keep}) == 0, f"{name}: a pruned weight decodes to non-zero"
        assert float((w[keep] != 0).float().mean()) > 0.9, name  # the kept weights are really quantized


def _pruned_nonzeros(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> int:
    """How many weights at pruned positions decode to something other than exactly 0."""
    return sum(int(torch.count_nonzero(modules[n].dequantized_weight(torch.float64)[~keep]))
               for n, keep in masks.items())


def test_mask_positions_check_detects_unpruned_weights(pruned_then_quantized):
    """Control for the test above: finequant alone (no mask) leaves many of the same positions non-zero
    (the pruned weights are the smallest ones, so some round to 0 anyway)."""
    dense = _modules(_load(pruned_then_quantized["wanda"]))
    layer0 = {n: m.weight != 0 for n, m in dense.items() if n.startswith("model.layers.0.")}
    pruned = sum(int((~k).sum()) for k in layer0.values())
    assert _pruned_nonzeros(_modules(_load(pruned_then_quantized["alone"])), layer0) > 0.25 * pruned
    assert _pruned_nonzeros(_modules(_load(pruned_then_quantized["both"])), layer0) == 0


def test_pruned_zeros_stay_exact_even_without_respect_mask(pruned_then_quantized):
    """``respect_mask: false`` only drops the mask from the fit (the report says so); the pruned
    weights still decode to exactly 0, because wanda zeroed them in place and every grid contains 0
    (symmetric, or an integer zero point inside the code range)."""
    dense = _modules(_load(pruned_then_quantized["wanda"]))
    layer0 = {n: m.weight != 0 for n, m in dense.items() if n.startswith("model.layers.0.")}  # same mask in all runs
    assert _pruned_nonzeros(_modules(_load(pruned_then_quantized["ignore_mask"])), layer0) == 0
    report = json.loads((pruned_then_quantized["ignore_mask"] / "llmcomp_report.json").read_text())["modules"]
    assert report and all(r["passes"][1]["kept_mask"] is False for r in report.values())


def test_inspect_and_report_list_every_pass_in_order(pruned_then_quantized):
    out = pruned_then_quantized["both"]
    summary = describe(out)
    cli = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["modules"] == summary["modules"]
    names = [f"model.layers.{i}.{n}" for i in range(3) for n in LINEARS]
    assert sorted(summary["modules"]) == sorted(names)
    for name in names:
        m = summary["modules"][name]
        assert [p["pass"] for p in m["passes"]] == ["wanda", "finequant"], name
        assert m["kind"] == "int_affine" and m["bits"] == 4

    report = json.loads((out / "llmcomp_report.json").read_text())
    config = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    for name in names:
        r = report["modules"][name]
        wanda, finequant = r["passes"]
        assert wanda["pass"] == "wanda" and finequant["pass"] == "finequant"
        assert wanda["sparsity"] == pytest.approx(0.5) and "sparsity" not in finequant
        assert finequant["kept_mask"] is True
        # The flat fields merge both passes, later ones winning where both report a field.
        assert r["pass"] == "wanda+finequant"
        assert r["sparsity"] == wanda["sparsity"] and r["pattern"] == "unstructured"
        assert r["rel_error"] == finequant["rel_error"] != wanda["rel_error"]
        assert r["bits"] == 4 and r["group_size"] == finequant["group_size"] == config[name]["group_size"]
        assert r["shape"] == [config[name]["out_features"], config[name]["in_features"]]

