"""Sparsity on SmolLM2: perplexity, pass run time and bytes on disk per mask, pattern and DSnoT.

Every method is a recipe run through the real pipeline (bf16, reduced calibration on the offline
calibration text), stored with ``sparse_store``, reloaded in float32 and evaluated on the
held-out offline evaluation text (``llmcomp.calibration.offline_evaluation_text``), exactly like
``bench/quant_quality.py``. Results are merged into one JSON file, one entry per method, so a long
sweep can be split across invocations.

    python bench/sparsity.py --methods dense,wanda-60,dsnot-wanda-60 --out bench/results/sparsity.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcomp.calibration import offline_evaluation_text
from llmcomp.eval.perplexity import compute_perplexity
from llmcomp.hostinfo import cpu_summary
from llmcomp.loading import load_model, resolve_source
from llmcomp.pipeline import compress
from llmcomp.recipes import Recipe

SPECS = {"50": {"sparsity": 0.5}, "60": {"sparsity": 0.6}, "70": {"sparsity": 0.7}, "2of4": {"pattern": "2:4"},
         "4of8": {"pattern": "4:8"}}
MASKS = ("magnitude", "wanda", "sparsegpt")
STORE = {"type": "sparse_store"}
ATTENTION = ["*.self_attn.*"]
FQ4_AW = {"type": "finequant", "bits": 4, "symmetric": False, "min_group_size": 32, "activation_aware": True,
          "threshold": 0.025}


def methods() -> dict[str, list[dict[str, Any]]]:
    """name -> passes. ``M-S``: mask M at spec S; ``dsnot-M-S``: the same refined by DSnoT."""
    out: dict[str, list[dict[str, Any]]] = {"dense": []}
    for spec, fields in SPECS.items():
        for mask in MASKS:
            out[f"{mask}-{spec}"] = [{"type": mask, **fields}, STORE]
            out[f"dsnot-{mask}-{spec}"] = [{"type": "dsnot", "initial": mask, **fields}, STORE]
    # The public code's choices, one at a time and together (Wanda 60% initial mask).
    for mask in ("wanda", "sparsegpt"):
        base = {"type": "dsnot", "initial": mask, "sparsity": 0.6}
        mask_only = {"type": mask, "sparsity": 0.6}
        out[f"dsnot-{mask}-60-nosign"] = [{**base, "sign_rule": False}, STORE]
        out[f"dsnot-{mask}-60-attn"] = [{**base, "targets": ATTENTION}, {**mask_only, "ignore": ATTENTION}, STORE]
        out[f"dsnot-{mask}-60-public"] = [{**base, "targets": ATTENTION, "sign_rule": False},
                                          {**mask_only, "ignore": ATTENTION}, STORE]
    # Beyond the paper (DSnoT on SparseGPT): per-row guard by output error; eps of the compensated layer.
    for spec, fields in SPECS.items():
        out[f"guarded-dsnot-sparsegpt-{spec}"] = [{"type": "dsnot", "initial": "sparsegpt", **fields, "guard": True},
                                                  STORE]
    out["guarded-cdsnot-sparsegpt-60"] = [{**out["guarded-dsnot-sparsegpt-60"][0], "error_reference": "compensated"},
                                          STORE]
    out["sparsegpt-50-w4"] = [{"type": "sparsegpt", "sparsity": 0.5}, FQ4_AW, STORE]
    out["sparsegpt-50-w4-dense"] = [{"type": "sparsegpt", "sparsity": 0.5}, FQ4_AW]  # same, int4 stored dense
    out["fq-w4-aw"] = [FQ4_AW]
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def linear_stats(reports: dict[str, Any]) -> dict[str, Any]:
    """Weighted sparsity and stored bits/weight over the compressed modules (decoder linears)."""
    numel = sum(r["numel"] for r in reports.values())
    out: dict[str, Any] = {"modules": len(reports)}
    if not numel:
        return out
    if all("sparsity" in r for r in reports.values()):
        out["sparsity"] = sum(r["sparsity"] * r["numel"] for r in reports.values()) / numel
    if all("bits_per_weight" in r for r in reports.values()):
        out["bits_per_weight"] = sum(r["bits_per_weight"] * r["numel"] for r in reports.values()) / numel
    swaps = [r["dsnot_swaps"] for r in reports.values() if "dsnot_swaps" in r]
    if swaps:
        out["dsnot_swaps_per_row"] = sum(swaps) / len(swaps)
        out["dsnot_eps_ratio"] = sum(r["dsnot_eps_after"] / max(r["dsnot_eps_before"], 1e-30)
                                     for r in reports.values() if "dsnot_swaps" in r) / len(swaps)
    guarded = [r["dsnot_guarded_rows"] for r in reports.values() if "dsnot_guarded_rows" in r]
    if guarded:
        out["dsnot_guarded_rows"] = sum(guarded) / len(guarded)
    return out


def run(name: str, passes: list[dict[str, Any]], args: argparse.Namespace, text: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"method": name, "passes": passes}
    with tempfile.TemporaryDirectory(prefix="llmcomp-sparsity-") as tmp:
        if passes:
            recipe = Recipe(name=name, calibration={"num_samples": args.samples, "seq_len": args.cal_len},
                            passes=passes)
            t0 = time.perf_counter()
            result = compress(args.model, recipe, Path(tmp) / "ckpt", dtype="bfloat16", progress=False)
            entry["compress_seconds"] = round(time.perf_counter() - t0, 1)
            entry["layer_seconds"] = round(sum(result.report.get("layer_seconds", [])), 1)
            path = Path(result.output_dir)
            entry.update(linear_stats(result.report["modules"]))
            entry["kinds"] = sorted({r.get("stored", "") for r in result.report["modules"].values()} - {""})
        else:
            path = resolve_source(args.model).path
        entry["bytes"] = dir_bytes(path)
        model, tok = load_model(str(path), dtype="float32")
    t0 = time.perf_counter()
    res = compute_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                             progress=False)
    entry.update(perplexity=res.perplexity, tokens=res.tokens, eval_seconds=round(time.perf_counter() - t0, 1))
    return entry


def gather_2of4(x: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """``y = x @ W^T`` from the 2:4 layout by gathering the kept inputs (no dense weight)."""
    return (x[:, pos] * vals).sum(-1)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Dense vs CSR vs 2:4 gather matmul on SmolLM2-sized matrices, interleaved, best of N (µs)."""
    from llmcomp.kernels import sparse_cpu
    from llmcomp.modules.sparse_linear import Sparse2of4Linear
    from llmcomp.passes.sparsity_masks import prune_mask

    def best(fn, reps: int = args.reps) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e6

    rows_out: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in ((1536, 576), (576, 1536)):
        w = torch.randn(out_f, in_f, generator=gen)
        for rows in (1, 8):
            x = torch.randn(rows, in_f, generator=gen)
            for density in (0.5, 0.4, 0.3, 0.2, 0.1, 0.05):
                keep = prune_mask(torch.rand(out_f, in_f, generator=gen), 1 - density, "unstructured")
                ws = w * keep
                csr = sparse_cpu.csr_weight(ws)
                wb, xb = ws.bfloat16(), x.bfloat16()
                t = {"shape": [out_f, in_f], "rows": rows, "density": density}
                for _ in range(2):  # interleaved rounds; keep each method's best
                    for key, fn in (("dense_fp32_us", partial(F.linear, x, ws)),
                                    ("dense_bf16_us", partial(F.linear, xb, wb)),
                                    ("csr_fp32_us", partial(sparse_cpu.csr_linear, csr, x, None))):
                        t[key] = min(t.get(key, float("inf")), round(best(fn), 1))
                rows_out.append(t)
                print(json.dumps(t), flush=True)
            keep = prune_mask(torch.rand(out_f, in_f, generator=gen), 0.5, "2:4")
            wk = w * keep
            mod = Sparse2of4Linear.from_dense(wk, keep)
            pos, vals = mod.positions(), mod.weight_values.float()
            t = {"shape": [out_f, in_f], "rows": rows, "density": 0.5, "pattern": "2:4"}
            for _ in range(2):
                for key, fn in (("dense_fp32_us", partial(F.linear, x, wk)),
                                ("gather_2of4_us", partial(gather_2of4, x, pos, vals))):
                    t[key] = min(t.get(key, float("inf")), round(best(fn), 1))
            rows_out.append(t)
            print(json.dumps(t), flush=True)
    return {"machine": f"{cpu_summary()}, {torch.get_num_threads()} threads", "date": dt.date.today().isoformat(),
            "command": " ".join(sys.argv), "rows": rows_out}


def table(paths: list[Path]) -> str:
    """Markdown tables (perplexity grid, then every run) from result files, merged in order."""
    runs: dict[str, Any] = {}
    for path in paths:
        runs.update(json.loads(path.read_text())["runs"])
    dense = runs.get("dense", {})
    lines = ["| mask | spec | perplexity | with DSnoT | change | DSnoT swaps/row | pass time (s) | with DSnoT (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for spec in SPECS:
        for mask in MASKS:
            a, b = runs.get(f"{mask}-{spec}"), runs.get(f"dsnot-{mask}-{spec}")
            if not a and not b:
                continue
            pa = f"{a['perplexity']:.2f}" if a else "-"
            pb = f"{b['perplexity']:.2f}" if b else "-"
            change = f"{100 * (b['perplexity'] / a['perplexity'] - 1):+.1f}%" if a and b else "-"
            swaps = f"{b.get('dsnot_swaps_per_row', 0):.1f}" if b else "-"
            ta = f"{a['compress_seconds']:.0f}" if a else "-"
            tb = f"{b['compress_seconds']:.0f}" if b else "-"
            lines.append(f"| {mask} | {spec} | {pa} | {pb} | {change} | {swaps} | {ta} | {tb} |")
            g = runs.get(f"guarded-dsnot-{mask}-{spec}")
            if a and g:  # DSnoT with the per-row output-error guard (initial=sparsegpt only)
                lines.append(f"| {mask}, DSnoT + guard | {spec} | {pa} | {g['perplexity']:.2f} | "
                             f"{100 * (g['perplexity'] / a['perplexity'] - 1):+.1f}% | "
                             f"{g.get('dsnot_swaps_per_row', 0):.1f} | {ta} | {g['compress_seconds']:.0f} |")
    lines += ["", "| method | perplexity | sparsity | bits/weight (linears) | bytes on disk | vs dense | kinds |",
              "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ratio = r["bytes"] / dense["bytes"] if dense.get("bytes") else float("nan")
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ("16" if name == "dense" else "-")
        lines.append(f"| `{name}` | {r['perplexity']:.2f} | {sp} | {bpw} | {r['bytes']:,} | {ratio:.3f} | "
                     f"{', '.join(r.get('kinds', [])) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="dense,magnitude-60,dsnot-magnitude-60,wanda-60,dsnot-wanda-60",
                    help=f"comma-separated; known: {', '.join(methods())}")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (the recipes use 128)")
    ap.add_argument("--cal-len", type=int, default=512, help="calibration window length (the recipes use 2048)")
    ap.add_argument("--seq-len", type=int, default=512, help="evaluation window length")
    ap.add_argument("--max-tokens", type=int, default=8192, help="0 = the whole evaluation text")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("bench/results/sparsity.json"))
    ap.add_argument("--speed", action="store_true", help="only the dense vs sparse matmul timing (into --out)")
    ap.add_argument("--reps", type=int, default=50, help="timing repetitions (--speed)")
    ap.add_argument("--table", type=Path, nargs="*", help="print markdown tables from these result files and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    if args.speed:
        with torch.no_grad():
            data = speed(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))
        return
    known = methods()
    wanted = args.methods.split(",")
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    text, text_desc = offline_evaluation_text()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results["meta"] = {
        "model": args.model, "eval_text": text_desc, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
        "calibration": f"{args.samples} x {args.cal_len} tokens of the offline calibration text",
        "machine": f"{cpu_summary()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
    }
    print(results["meta"]["machine"], flush=True)
    for name in wanted:
        with torch.no_grad():
            entry = run(name, known[name], args, text)
        results["runs"][name] = entry
        print(json.dumps({k: v for k, v in entry.items() if k != "passes"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
