"""DSnoT on a SparseGPT mask, layer by layer: which variant lowers SparseGPT's own objective?

Cheap check (no pipeline, no perplexity): inputs of 20 SmolLM2 linears (q/o/gate/down of blocks
0, 8, 16, 24, 29) from the dense model on the calibration windows; per matrix the output error
``sum_i delta_i H delta_i^T`` of each variant relative to SparseGPT's, and the mean error
``|delta E[x]|`` that DSnoT itself minimises. Variants:

* ``ds``: DSnoT as shipped (eps of the pruned dense weights), then OBS with the refined mask;
* ``comp_nocomp``: eps of the OBS-updated layer (kept weights at updated values), no re-compensation;
* ``comp``: the same refined mask, then OBS re-compensation (``error_reference="compensated"``);
* ``guard_ds`` / ``guard_comp``: per row the lower-error of SparseGPT and ``ds`` / ``comp`` (``guard``);
* ``guard_all``: per row the lowest of the three.

    python bench/dsnot_layer_error.py --sparsity 0.6 --out bench/results/dsnot_layer_error.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llmcomp.calibration import InputStats, calibration_batches, offline_calibration_text
from llmcomp.hostinfo import cpu_summary
from llmcomp.loading import load_model, resolve_source
from llmcomp.passes.dsnot import dsnot_refine, row_output_error
from llmcomp.passes.sparsegpt import sparsegpt_prune

LAYERS = (0, 8, 16, 24, 29)
TARGETS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def collect(model, ids: torch.Tensor) -> dict[str, tuple[torch.nn.Linear, InputStats]]:
    out, hooks = {}, []
    for li in LAYERS:
        for name in TARGETS:
            mod = model.model.layers[li].get_submodule(name)
            st = InputStats(mod.in_features, with_hessian=True)
            out[f"{li}.{name}"] = (mod, st)
            hooks.append(mod.register_forward_hook(lambda m, a, o, st=st: st.update(a[0])))
    with torch.no_grad():
        for batch in ids.split(4):
            model(batch)
    for h in hooks:
        h.remove()
    return out


def compare(w: torch.Tensor, st: InputStats, sparsity: float, pattern: str) -> dict[str, float]:
    h, mean, var, sq = st.hessian.float(), st.mean, st.var, st.sq_norm
    w_sg, keep = sparsegpt_prune(w, h, sparsity, pattern)
    ref, _ = dsnot_refine(w, keep, mean, var, sq, pattern)
    w_ds, _ = sparsegpt_prune(w, h, sparsity, pattern, fixed_keep=ref)
    hybrid = torch.where(keep, w_sg, w)
    offset = ((w - w_sg) * keep * mean.float()).sum(1)
    ref_c, _ = dsnot_refine(hybrid, keep, mean, var, sq, pattern, offset=offset)
    w_c, _ = sparsegpt_prune(w, h, sparsity, pattern, fixed_keep=ref_c)
    err = {k: row_output_error(v, w, h.double()) for k, v in
           (("sg", w_sg), ("ds", w_ds), ("comp_nocomp", hybrid * ref_c), ("comp", w_c))}
    err["guard_ds"] = torch.minimum(err["sg"], err["ds"])
    err["guard_comp"] = torch.minimum(err["sg"], err["comp"])
    err["guard_all"] = torch.minimum(err["guard_ds"], err["comp"])
    base = float(err["sg"].sum())
    row = {f"err_{k}": float(v.sum()) / base for k, v in err.items() if k != "sg"}
    for k, v in (("sg", w_sg), ("ds", w_ds), ("comp_nocomp", hybrid * ref_c), ("comp", w_c)):
        row[f"mean_err_{k}"] = float(((w - v).double() @ mean.double()).abs().mean())
    row["rows_ds_better"] = float((err["ds"] < err["sg"]).float().mean())
    row["rows_comp_better"] = float((err["comp"] < err["sg"]).float().mean())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--cal-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/dsnot_layer_error.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(str(resolve_source("smollm2-135m").path), dtype="float32")
    ids = calibration_batches(tok, offline_calibration_text(), args.samples, args.cal_len)
    rows = {}
    for name, (mod, st) in collect(model, ids).items():
        rows[name] = compare(mod.weight.data.float(), st, args.sparsity, args.pattern)
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in next(iter(rows.values()))}
    print("MEAN", {k: round(v, 4) for k, v in mean.items()})
    key = args.pattern if args.pattern != "unstructured" else f"{args.sparsity:g}"
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[key] = {"machine": cpu_summary(), "calibration": f"{args.samples} x {args.cal_len}", "mean": mean,
                 "matrices": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
