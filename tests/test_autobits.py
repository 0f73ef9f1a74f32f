"""Budgeted mixed precision: the knapsack planner, the KL probe, and the autobits pass end to end."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from llmcomp.cli.main import app
from llmcomp.errors import LlmcompError
from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.passes.budget import Item, Option, solve
from llmcomp.passes.sensitivity import KLProbe, probe_layers
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict
from llmcomp.scheme import fused_key

CALIBRATION = {"num_samples": 4, "seq_len": 64}


def _random_items(rng: random.Random, n_items: int, n_options: int) -> list[Item]:
    items = []
    for i in range(n_items):
        size = rng.uniform(1, 10)
        # More bits, less loss (as quantization options behave), with noise.
        options = [Option(size * (b + rng.uniform(0, 0.5)), size * rng.uniform(0.5, 2.0) * 2.0 ** (-2 * b))
                   for b in range(1, n_options + 1)]
        items.append(Item([f"m{i}"], options))
    return items


def _loss(items: list[Item], plan: list[int]) -> float:
    return sum(it.options[i].loss for it, i in zip(items, plan, strict=True))


def _cost(items: list[Item], plan: list[int]) -> float:
    return sum(it.options[i].cost_bits for it, i in zip(items, plan, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_solver_is_feasible_and_near_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    items = _random_items(rng, 5, 3)
    lo = sum(min(o.cost_bits for o in it.options) for it in items)
    hi = sum(max(o.cost_bits for o in it.options) for it in items)
    budget = lo + rng.uniform(0.2, 0.8) * (hi - lo)
    plan = solve(items, budget)
    assert _cost(items, plan) <= budget + 1e-9
    best = min((p for p in itertools.product(range(3), repeat=5) if _cost(items, list(p)) <= budget),
               key=lambda p: _loss(items, list(p)))
    assert _loss(items, plan) <= 1.05 * _loss(items, list(best)) + 1e-12


def test_solver_refuses_an_impossible_budget() -> None:
    items = _random_items(random.Random(0), 3, 2)
    with pytest.raises(LlmcompError, match=r"budget \(.* bits/weight\) is below the smallest plan"):
        solve(items, 0.5 * sum(min(o.cost_bits for o in it.options) for it in items), numel=100)


def test_kl_probe_matches_a_full_forward(tiny_llama_factory, tmp_path) -> None:
    """KL from layer i on (recorded inputs) equals the KL of a whole forward of the perturbed model."""
    model = tiny_llama_factory(tmp_path / "m", seed=3)
    ids = torch.randint(0, 2000, (3, 24), generator=torch.Generator().manual_seed(0))
    layers, head = probe_layers(model, "model.layers")
    probe = KLProbe(model, layers, head, ids)
    assert abs(probe.kl_from(0)) < 1e-4
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        w = model.model.layers[1].mlp.down_proj.weight
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
        new = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    expected = float((ref.exp() * (ref - new)).sum(-1).mean())
    assert expected > 1e-4
    assert probe.kl_from(1) == pytest.approx(expected, rel=0.02)


@pytest.fixture(scope="module")
def planned(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ab") / "q"
    recipe = recipe_from_dict({"name": "ab", "calibration": CALIBRATION,
                               "passes": [{"type": "autobits", "target_bits": 4.4, "probe_samples": 2}]})
    result = compress(str(tiny_llama_dir), recipe, out, progress=False)
    return out, result.report


def test_plan_meets_the_budget_and_is_in_the_report(planned) -> None:
    out, report = planned
    summary = report["passes"]["autobits"]
    assert report["average_bits_per_weight"] <= 4.4 + 1e-9
    assert summary["planned_bits_per_weight"] == pytest.approx(report["average_bits_per_weight"], abs=1e-3)
    info = validate_checkpoint(out)
    assert set(summary["plan"]) == set(info.modules) and len(info.modules) == 21
    for name, choice in summary["plan"].items():
        spec = info.modules[name]
        assert (spec.bits, spec.group_size, spec.symmetric) == (choice["bits"], choice["group_size"],
                                                              choice["symmetric"])
    # Fused siblings share one setting (engines run them as one matmul).
    by_group: dict[str, set] = {}
    for name, spec in info.modules.items():
        by_group.setdefault(fused_key(name), set()).add((spec.bits, spec.group_size))
    assert all(len(v) == 1 for v in by_group.values())
    assert set(summary["sensitivity"]) == set(by_group) and all(v >= 0 for v in summary["sensitivity"].values())


def test_a_tighter_budget_gives_fewer_bits(tiny_llama_dir, planned, tmp_path) -> None:
    recipe = recipe_from_dict({"name": "ab", "calibration": CALIBRATION,
                               "passes": [{"type": "autobits", "target_bits": 4.0, "probe_samples": 2}]})
    report = compress(str(tiny_llama_dir), recipe, tmp_path / "q3", progress=False).report
    assert report["average_bits_per_weight"] <= 4.0 + 1e-9  # (float32 scales: int3 per channel is 3.8 here)
    assert report["average_bits_per_weight"] < planned[1]["average_bits_per_weight"]


def test_target_size_bounds_the_tensor_bytes(tiny_llama_dir, planned, tmp_path) -> None:
    target = planned[1]["compressed_bytes"] - 4096  # the embedding (12.6 MB) dwarfs the tiny linears
    recipe = recipe_from_dict({"name": "ab", "calibration": CALIBRATION,
                               "passes": [{"type": "autobits", "target_bytes": target, "probe_samples": 2}]})
    report = compress(str(tiny_llama_dir), recipe, tmp_path / "qs", progress=False).report
    # safetensors headers and the metadata are the only bytes the planner does not see
    assert report["compressed_bytes"] <= target + 64 * 1024


def test_cli_targets_are_exclusive_and_checked(tiny_llama_dir, tmp_path) -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["compress", str(tiny_llama_dir), "--recipe", "rtn-w8", "--target-bits", "4",
                               "-o", str(tmp_path / "x")])
    assert both.exit_code == 2 and "exactly one of --recipe, --target-bits and --target-size" in both.output
    bad = runner.invoke(app, ["compress", str(tiny_llama_dir), "--target-bits", "40", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--target-bits must be in" in bad.output
    tiny = runner.invoke(app, ["compress", str(tiny_llama_dir), "--target-size", "1KB", "-o", str(tmp_path / "x")])
    assert tiny.exit_code == 2 and "stay dense" in tiny.output and "Traceback" not in tiny.output


def test_inspect_shows_the_plan(planned) -> None:
    out, _ = planned
    result = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    data = json.loads(result.output)
    assert data["plan"]["autobits"]["plan"] and all(m["passes"][0]["pass"] == "autobits"
                                                     for m in data["modules"].values())
