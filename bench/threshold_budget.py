"""Average bits per weight that each FineQuant ``threshold`` would give, from one threshold-0 run.

A FineQuant checkpoint compressed with ``threshold: 0`` records every matrix's error at every rung
of its group-size ladder (``ladder_rel_error`` in llmcomp_report.json). The greedy walk only needs
those errors, so the group sizes and bits for any other price follow without recompressing (up to
the small change in later layers' calibration inputs). This is how the ``-aw`` recipes' price was
set to a bit budget without looking at any evaluation text.

    python bench/threshold_budget.py CKPT --thresholds 0.015,0.02,0.025,0.03
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmcomp import intquant
from llmcomp.formats.checkpoint import REPORT_FILE
from llmcomp.passes import finequant_fit as fit
from llmcomp.passes.finequant import DEFAULT_FUSED_SETS, DEFAULT_MIN_GROUP, fused_groups


def walk(errors: dict[int, float], in_features: int, bits_meta: tuple[bool, int], threshold: float, floor: int) -> int:
    """The pass's own ladder walk (:func:`finequant_fit.walk_ladder`) on recorded errors."""
    asymmetric, scale_bits = bits_meta

    def error_at(group: int) -> float:
        if group not in errors:
            raise SystemExit(f"rung {group} missing: compress with threshold 0 so every rung is recorded")
        return errors[group]

    return fit.walk_ladder(fit.group_ladder(in_features, floor), error_at, in_features, asymmetric, scale_bits,
                           threshold)


def budget(report: dict, threshold: float, floor: int, scale_bits: int = 16) -> tuple[float, dict[int, int]]:
    total_bits = total = 0.0
    hist: dict[int, int] = {}
    for members in fused_groups(report, DEFAULT_FUSED_SETS):
        k = {n: max(int(g) for g in report[n]["ladder_rel_error"]) for n in members}
        meta = (not report[members[0]]["symmetric"], scale_bits)
        tied = min(walk({int(g): e for g, e in report[n]["ladder_rel_error"].items()}, k[n], meta, threshold, floor)
                   for n in members)
        for n in members:
            group = min(tied, k[n])
            bits = intquant.storage_bits_per_weight(k[n], group, report[n]["bits"], meta[0], scale_bits)
            total_bits += bits * report[n]["numel"]
            total += report[n]["numel"]
            hist[group] = hist.get(group, 0) + 1
    return total_bits / total, dict(sorted(hist.items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="FineQuant checkpoint compressed with threshold 0")
    ap.add_argument("--thresholds", default="0.01,0.015,0.02,0.025,0.03,0.05")
    ap.add_argument("--min-group-size", type=int, default=DEFAULT_MIN_GROUP)
    args = ap.parse_args(argv)
    modules = json.loads((args.checkpoint / REPORT_FILE).read_text())["modules"]
    report = {n: r for n, r in modules.items() if r.get("pass") == "finequant"}
    for t in (float(x) for x in args.thresholds.split(",")):
        bpw, hist = budget(report, t, args.min_group_size)
        print(json.dumps({"threshold": t, "avg_bits_per_weight": round(bpw, 4), "group_sizes": hist}))


if __name__ == "__main__":
    main()
