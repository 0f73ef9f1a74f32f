"""Choose one quantization setting per layer under a global bit budget (multiple-choice knapsack).

Each *item* is a layer, or a set of layers that must share one setting (q/k/v, gate/up: engines
fuse them), with a list of options ``(cost in bits, estimated loss increase)``. The planner
minimises the summed loss increase subject to the summed cost staying within the budget:
a Lagrangian relaxation (each item independently minimises ``loss + lam * cost``; ``lam`` is
bisected until the plan fits) followed by a greedy pass that spends what is left on the upgrades
with the best loss reduction per bit. Pure Python; exact enough at a few hundred items.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcomp.errors import LlmcompError

_BISECTION_STEPS = 100


@dataclass(frozen=True)
class Option:
    cost_bits: float
    loss: float


@dataclass
class Item:
    names: list[str]
    options: list[Option]


def _pick(item: Item, lam: float) -> int:
    return min(range(len(item.options)), key=lambda i: (item.options[i].loss + lam * item.options[i].cost_bits,
                                                        item.options[i].cost_bits))


def _cost(items: list[Item], plan: list[int]) -> float:
    return sum(item.options[i].cost_bits for item, i in zip(items, plan, strict=True))


def solve(items: list[Item], budget_bits: float, numel: int | None = None) -> list[int]:
    """Index of the chosen option per item; raises if even the cheapest plan exceeds the budget.
    ``numel`` (weights covered) only makes the error speak in bits per weight."""
    cheapest = [min(range(len(it.options)), key=lambda i: it.options[i].cost_bits) for it in items]
    if _cost(items, cheapest) > budget_bits * (1 + 1e-12):
        low = _cost(items, cheapest)
        unit = (lambda b: f"{b / numel:.3f} bits/weight") if numel else (lambda b: f"{b / 8e6:.3f} MB")
        raise LlmcompError(
            f"the budget ({unit(budget_bits)}) is below the smallest plan ({unit(low)}): raise the target or "
            "allow fewer bits"
        )
    best = [_pick(it, 0.0) for it in items]
    if _cost(items, best) <= budget_bits:
        return best
    lo, hi = 0.0, 1.0
    while _cost(items, [_pick(it, hi) for it in items]) > budget_bits:
        hi *= 4.0
        if hi > 1e30:
            return cheapest
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if _cost(items, [_pick(it, mid) for it in items]) > budget_bits:
            lo = mid
        else:
            hi = mid
    plan = [_pick(it, hi) for it in items]
    return _spend_leftover(items, plan, budget_bits)


def _spend_leftover(items: list[Item], plan: list[int], budget_bits: float) -> list[int]:
    """Greedy upgrades, best loss reduction per extra bit first, while they fit."""
    left = budget_bits - _cost(items, plan)
    while True:
        best, best_rate = None, 0.0
        for k, item in enumerate(items):
            now = item.options[plan[k]]
            for i, opt in enumerate(item.options):
                extra, gain = opt.cost_bits - now.cost_bits, now.loss - opt.loss
                if gain <= 0 or extra > left:
                    continue
                rate = gain / max(extra, 1e-9)
                if rate > best_rate:
                    best, best_rate = (k, i), rate
        if best is None:
            return plan
        k, i = best
        left -= items[k].options[i].cost_bits - items[k].options[plan[k]].cost_bits
        plan[k] = i
