"""Activation sparsity on SmolLM2-135M: TEAL vs WINA (all linears / public) vs + allocation / + transform.

Quality: token perplexity on the offline evaluation text (GPL-3, GPL-2, LGPL-2.1 license texts;
windows of ``--seq-len``, fp32), every method at every sparsity, side by side in one run; with
``--sst2-dir`` also 0-shot sst2 accuracy on that folder's validation split (``bench/sentiment_data.py``
writes real Rotten Tomatoes sentences there), scored on the runtime, per-sentence results kept for
paired comparisons.
Calibration (greedy allocation, thresholds) uses the offline *calibration* texts, never the
evaluation text.

Speed: batch-1 decode on the runtime (``ModelRunner``, eager and/or compiled), bf16 and int4
(RTN g32 asymmetric) weights, dense vs each sparsity; all runners built first, then timed in
interleaved rounds so load on a shared machine hits every variant alike (we report the median).

    python bench/activation_sparsity.py --part quality --out bench/results/activation_sparsity_quality.json
    python bench/activation_sparsity.py --part speed --out bench/results/activation_sparsity_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcomp import intquant
from llmcomp.activation_sparsity import apply_activation_sparsity, decoder_linears
from llmcomp.calibration import calibration_batches, offline_calibration_text, offline_evaluation_text
from llmcomp.eval.perplexity import compute_perplexity
from llmcomp.hostinfo import cpu_summary
from llmcomp.loading import load_model
from llmcomp.modules.activation_sparse import ActivationSparseLinear
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.passes.base import set_submodule
from llmcomp.passes.wina import calibrate_in_memory

MODEL = "smollm2-135m"
QUALITY_METHODS = ("teal", "wina", "wina-public", "teal-alloc", "wina-alloc", "wina-transform",
                   "wina-transform-alloc")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def quality(args: argparse.Namespace) -> dict[str, Any]:
    dense, tok = load_model(MODEL, dtype="float32")
    text, text_desc = offline_evaluation_text()
    ids = calibration_batches(tok, offline_calibration_text(), args.cal_samples, args.cal_len, seed=0)
    grid = _floats(args.sparsities)

    def measure(model: nn.Module) -> dict[str, Any]:
        res = compute_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens, progress=False)
        out: dict[str, Any] = {"perplexity": res.perplexity}
        if args.sst2_dir is not None:
            correct = sst2_correct(model, tok, args.sst2_dir)
            out.update(sst2_acc=round(sum(correct) / len(correct), 4), sst2_correct="".join("01"[c] for c in correct))
        return out

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    rows.append({"method": "dense", "sparsity": 0.0, **measure(dense)})
    show(rows[-1])
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in QUALITY_METHODS:
            raise SystemExit(f"unknown method {method}; known: {','.join(QUALITY_METHODS)}")
    calib: dict[str, float] = {}
    for family, crit, transform, allocate in (("plain", "wina", False, False), ("teal-alloc", "teal", False, True),
                                              ("wina-alloc", "wina", False, True),
                                              ("transform", "wina", True, False),
                                              ("transform-alloc", "wina", True, True)):
        wanted = {"plain": ("teal", "wina", "wina-public"), "teal-alloc": ("teal-alloc",),
                  "wina-alloc": ("wina-alloc",), "transform": ("wina-transform",),
                  "transform-alloc": ("wina-transform-alloc",)}[family]
        if not any(m in methods for m in wanted):
            continue
        model = copy.deepcopy(dense)
        t1 = time.perf_counter()
        calibrate_in_memory(model, ids, grid, args.step, crit, transform, allocate)
        calib[family] = round(time.perf_counter() - t1, 1)
        print(f"calibrated {family} in {calib[family]} s", flush=True)
        for method in wanted:
            if method not in methods:
                continue
            criterion = "teal" if method == "teal" or method == "teal-alloc" else "wina"
            norms = "public" if method == "wina-public" else "all"
            for s in grid:
                summary = apply_activation_sparsity(model, s, criterion, norms=norms, allocated=allocate)
                rows.append({"method": method, "sparsity": s, **measure(model),
                             "weighted_sparsity": round(summary["weight_weighted_sparsity"], 4)})
                show(rows[-1])
                if args.partial is not None:  # a long grid keeps what it measured so far
                    args.partial.write_text(json.dumps({"rows": rows, "calibration_seconds": calib}, indent=2))
        del model
    sst2 = {"sst2": {"data": str(args.sst2_dir), "split": "validation", "rows": len(rows[0]["sst2_correct"])}
            } if args.sst2_dir is not None else {}
    return {"text": text_desc, "seq_len": args.seq_len, "max_tokens": args.max_tokens, **sst2,
            "calibration": {"source": "offline calibration license texts", "samples": args.cal_samples,
                            "seq_len": args.cal_len, "step": args.step, "seconds": calib},
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def show(row: dict[str, Any]) -> None:
    """Print a quality row as it is measured, without its per-sentence string."""
    print({k: v for k, v in row.items() if k != "sst2_correct"}, flush=True)


def sst2_correct(model: nn.Module, tok: Any, data_dir: Path) -> list[bool]:
    """Per sentence of ``data_dir/sst2/validation``, whether ``model`` (0-shot, lm-eval's prompt, on the
    runtime: prefill computes densely with each token's unselected inputs zeroed) picks its label."""
    from llmcomp.eval.runtime_lm import RuntimeLM
    from llmcomp.eval.tasks import TASKS
    from llmcomp.route_calibrate import task_samples

    samples = task_samples(RuntimeLM(model, tok, progress=False), [TASKS["sst2"]], data_dir, None)["sst2"]
    return [bool(s["acc"]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def paired_difference(a: str, b: str) -> tuple[float, float]:
    """Accuracy of ``a`` minus that of ``b`` (per-sentence "0"/"1" strings over the same sentences) and
    the standard error of that difference for paired samples (from the discordant pairs)."""
    n = len(a)
    a_only = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    b_only = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    return (a_only - b_only) / n, (a_only + b_only - (a_only - b_only) ** 2 / n) ** 0.5 / n


def sst2_table(result: dict[str, Any]) -> str:
    """Markdown: sst2 accuracy per method and sparsity, each against TEAL at the same sparsity and
    against dense, with 95% intervals of the paired differences."""
    rows = [r for r in result["quality"]["rows"] if "sst2_correct" in r]
    dense = next(r for r in rows if r["method"] == "dense")
    teal = {r["sparsity"]: r for r in rows if r["method"] == "teal"}
    lines = ["| method | sparsity | perplexity | sst2 acc | - TEAL (95% CI) | - dense (95% CI) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for ref in (teal.get(r["sparsity"]), dense):
            if ref is None or ref is r:
                cells.append("-")
            else:
                d, se = paired_difference(r["sst2_correct"], ref["sst2_correct"])
                cells.append(f"{100 * d:+.1f} ({100 * (d - 1.96 * se):+.1f}, {100 * (d + 1.96 * se):+.1f})")
        lines.append(f"| {r['method']} | {r['sparsity']:.2f} | {r['perplexity']:.2f} | {100 * r['sst2_acc']:.1f} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def quantize_int4(model: nn.Module, group: int = 32) -> None:
    """RTN int4, asymmetric, group ``group``, on every decoder linear (bf16 scales)."""
    for name, lin in decoder_linears(model).items():
        qw = intquant.quantize_rtn(lin.weight.detach(), 4, group, False, scale_dtype=lin.weight.dtype)
        set_submodule(model, name, QuantLinear.from_quantized(qw, lin.bias, dtype=lin.weight.dtype))


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from llmcomp.runtime import ModelRunner

    base, tok = load_model(MODEL, dtype="bfloat16")
    prompt = tok("The lighthouse keeper opened the bottle and read the message.")["input_ids"]
    variants: dict[str, tuple[nn.Module, float | None]] = {}
    for weights in args.weights.split(","):
        if weights == "int4" and args.int4_model:  # a checkpoint written by `llmcomp compress`
            model = load_model(args.int4_model, dtype="bfloat16")[0]
        else:
            model = copy.deepcopy(base)
            if weights == "int4":
                quantize_int4(model)
        variants[f"{weights} dense"] = (model, None)
        sparsities = _floats(args.int4_sparsities if weights == "int4" and args.int4_sparsities else args.sparsities)
        for s in sparsities:
            sparse = copy.deepcopy(model)
            apply_activation_sparsity(sparse, s, args.criterion)
            variants[f"{weights} s={s:g}"] = (sparse, s)
    out: dict[str, Any] = {"criterion": args.criterion, "tokens_per_round": args.tokens, "rounds": args.rounds,
                           "results": []}
    for mode in args.modes.split(","):
        runners, kernels = {}, {}
        for name, (model, _) in variants.items():
            t0 = time.perf_counter()
            r = ModelRunner(model, max_batch_size=1, max_model_len=len(prompt) + args.tokens * (args.rounds + 2) + 8,
                            compile=mode == "compiled", buckets=[1])
            r.warm_up()
            runners[name] = r
            used = sorted({m._kernel_state[0].name for m in model.modules()
                           if isinstance(m, ActivationSparseLinear) and m._kernel_state is not None})
            kernels[name] = used
            print(f"{mode} {name}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        times: dict[str, list[float]] = {n: [] for n in runners}
        for r in runners.values():
            r.prefill(0, prompt)
        for _ in range(args.rounds):
            for name, r in runners.items():  # interleaved: every variant once per round
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    r.decode([tok.eos_token_id or 0])
                times[name].append(1000 * (time.perf_counter() - t0) / args.tokens)
        for name, ms in times.items():
            weights = name.split()[0]
            dense_ms = statistics.median(times[f"{weights} dense"])
            med = statistics.median(ms)
            out["results"].append({"mode": mode, "variant": name, "ms_per_token": round(med, 2),
                                   "ms_all_rounds": [round(v, 2) for v in ms],
                                   "speedup_vs_dense": round(dense_ms / med, 3),
                                   "sparse_kernels": kernels.get(name, [])})
            print(out["results"][-1], flush=True)
        if args.partial is not None:  # a long compiled run keeps what it measured so far
            args.partial.write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "speed"))
    parser.add_argument("--sst2-table", type=Path, default=None, help="only print the sst2 table of this result file")
    parser.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    parser.add_argument("--methods", default=",".join(QUALITY_METHODS))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--cal-samples", type=int, default=8)
    parser.add_argument("--cal-len", type=int, default=128)
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--sst2-dir", type=Path, default=None,
                        help="quality: also sst2 accuracy on DIR/sst2/validation.* (bench/sentiment_data.py)")
    parser.add_argument("--weights", default="bf16,int4")
    parser.add_argument("--int4-sparsities", default="", help="speed: int4 sparsities (default: --sparsities)")
    parser.add_argument("--int4-model", default="", help="speed: int4 checkpoint (default: RTN g32 in memory)")
    parser.add_argument("--partial", type=Path, default=None,
                        help="write results so far here (quality: after each row; speed: after each mode)")
    parser.add_argument("--criterion", default="wina")
    parser.add_argument("--modes", default="compiled")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.sst2_table is not None:
        print(sst2_table(json.loads(args.sst2_table.read_text())))
        return
    if args.part is None or args.out is None:
        parser.error("--part and --out are required")
    torch.set_num_threads(args.threads)
    result = {"machine": cpu_summary(), "torch": torch.__version__, "threads": args.threads,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": MODEL, "args": vars(args)}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(result["machine"], flush=True)
    with torch.inference_mode():
        result[args.part] = quality(args) if args.part == "quality" else speed(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
