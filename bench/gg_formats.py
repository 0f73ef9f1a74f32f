"""GG formats on one model (CPU): weight MSE and perplexity of RF8 vs FP8 E4M3 / E5M2 vs int8, gg4 vs
NF4-style vs int4 at stated bits, and DeepShape then int4 / gg4 vs int4 / gg4 alone.

Weight MSE (``--part weights``): every linear inside the decoder layers of the bf16 model, each
format with bf16 scales, summed squared error over summed squared weight (relative MSE), plus the
mean fitted GG shape. Perplexity (``--part ppl``): as bench/quant_quality.py, the held-out offline
text, fp32 evaluation, windows of ``--seq-len``. DeepShape runs once through the real pipeline
(calibration on the offline calibration text, never the evaluation text) into a dense checkpoint;
the calibration-free quantizers then run on that checkpoint and on the source alike.

    python bench/gg_formats.py --part weights --out bench/results/gg_formats.json
    python bench/gg_formats.py --part ppl --methods bf16,rf8,fp8-e4m3 --out bench/results/gg_formats.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcomp import codebook as cb
from llmcomp import gg, intquant
from llmcomp.calibration import offline_evaluation_text
from llmcomp.eval.perplexity import compute_perplexity
from llmcomp.hostinfo import cpu_summary
from llmcomp.loading import load_model
from llmcomp.passes import pass_registry
from llmcomp.passes.base import apply_to_layer
from llmcomp.pipeline import compress, find_decoder_layers
from llmcomp.recipes import recipe_from_dict

SCALE_BITS = 16
BF16_BITS = 16.0
# Weight-MSE rows: name -> (kind, format or bits, group size, extra).
WEIGHT_ROWS: dict[str, tuple[str, Any, int, Any]] = {
    "rf8 (GG table, per channel)": ("codebook", "rf8", -1, "gg"),
    "E3M4 grid (sign/3 exp/4 man), per channel": ("grid", (3, 4), -1, None),
    "E2M5 grid (sign/2 exp/5 man), per channel": ("grid", (2, 5), -1, None),
    "fp8-e4m3 (torch float8_e4m3fn), per channel": ("codebook", "fp8-e4m3", -1, None),
    "fp8-e5m2 (torch float8_e5m2), per channel": ("codebook", "fp8-e5m2", -1, None),
    "int8 RTN symmetric, per channel": ("int", 8, -1, True),
    "gg4 g64": ("codebook", "gg4", 64, "gg"),
    "nf4 g64": ("codebook", "nf4", 64, None),
    "int4 RTN symmetric g64": ("int", 4, 64, True),
    "int4 RTN asymmetric g64": ("int", 4, 64, False),
    "int4 RTN asymmetric g128": ("int", 4, 128, False),
    "gg4 g32": ("codebook", "gg4", 32, "gg"),
    "nf4 g32": ("codebook", "nf4", 32, None),
    "int4 RTN asymmetric g32": ("int", 4, 32, False),
}
# Perplexity methods: name -> (recipe passes applied calibration-free, deepshape first?).
PPL_METHODS: dict[str, tuple[list[dict[str, Any]], bool]] = {
    "bf16": ([], False),
    "rf8": ([{"type": "codebook", "format": "rf8"}], False),
    "fp8-e4m3": ([{"type": "codebook", "format": "fp8-e4m3"}], False),
    "fp8-e5m2": ([{"type": "codebook", "format": "fp8-e5m2"}], False),
    "rtn-w8": ([{"type": "rtn", "bits": 8, "group_size": -1, "symmetric": True}], False),
    "gg4": ([{"type": "codebook", "format": "gg4"}], False),
    "nf4": ([{"type": "codebook", "format": "nf4"}], False),
    "int4-sym-g64": ([{"type": "rtn", "bits": 4, "group_size": 64, "symmetric": True}], False),
    "int4-asym-g128": ([{"type": "rtn", "bits": 4, "group_size": 128, "symmetric": False}], False),
    "deepshape": ([], True),
    "deepshape+int4-sym-g64": ([{"type": "rtn", "bits": 4, "group_size": 64, "symmetric": True}], True),
    "deepshape+gg4": ([{"type": "codebook", "format": "gg4"}], True),
}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    handle = find_decoder_layers(model, model.config.num_hidden_layers)
    return {n: m for n, m in model.named_modules() if n.startswith(handle.prefix + ".") and isinstance(m, nn.Linear)}


def approximate(w: torch.Tensor, row: tuple[str, Any, int, Any]) -> tuple[torch.Tensor, float]:
    """(dequantized weight, stored bits per weight) of one weight-MSE row."""
    kind, what, group, extra = row
    n, k = w.shape
    g = intquant.effective_group_size(group, k)
    if kind == "int":
        qw = intquant.quantize_rtn(w, what, group, extra, scale_dtype=torch.bfloat16)
        return intquant.dequantize_qw(qw), intquant.storage_bits_per_weight(k, g, what, not extra, SCALE_BITS)
    if kind == "grid":
        table = cb.float_grid(*what)
        codes, scale = cb.encode(w, "grid", table, group, torch.bfloat16)
        return cb.decode(codes, table, scale, group), cb.bits_per_weight(k, g, 8, SCALE_BITS, table.numel(), n)
    codes, scale, table = cb.quantize(w, what, group, extra or "gg", scale_dtype=torch.bfloat16)
    bits = cb.FORMAT_BITS[what]
    return cb.decode(codes, table, scale, group), cb.bits_per_weight(k, g, bits, SCALE_BITS, table.numel(), n)


def weights_part(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load_model(args.model, dtype="bfloat16")
    linears = decoder_linears(model)
    shapes = [gg.fit(m.weight.detach().float()).shape for m in linears.values()]
    rows = {}
    for name, row in WEIGHT_ROWS.items():
        t0 = time.perf_counter()
        err = ref = bits = numel = 0.0
        for lin in linears.values():
            w = lin.weight.detach().float()
            approx, bpw = approximate(w, row)
            err += float(((approx - w).double() ** 2).sum())
            ref += float((w.double() ** 2).sum())
            bits += bpw * w.numel()
            numel += w.numel()
        rows[name] = {"rel_mse": err / ref, "bits_per_weight": bits / numel,
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(rows[name]), flush=True)
    return {"modules": len(linears), "gg_shape_mean": sum(shapes) / len(shapes), "gg_shape_min": min(shapes),
            "gg_shape_max": max(shapes), "rows": rows}


def apply_passes(model: nn.Module, passes: list[dict[str, Any]]) -> dict[str, Any]:
    handle = find_decoder_layers(model, model.config.num_hidden_layers)
    layers = model.get_submodule(handle.prefix)
    reports: dict[str, Any] = {}
    for entry in passes:
        cls = pass_registry()[entry["type"]]
        p = cls(cls.Config.model_validate({k: v for k, v in entry.items() if k != "type"}))
        for i, layer in enumerate(layers):
            reports.update(apply_to_layer(p, layer, f"{handle.prefix}.{i}"))
    return reports


def deepshape_checkpoint(args: argparse.Namespace, workdir: Path) -> tuple[Path, dict[str, Any], float]:
    out = workdir / "deepshape"
    recipe = recipe_from_dict({"calibration": {"num_samples": args.calib_samples, "seq_len": args.calib_seq_len},
                               "passes": [{"type": "deepshape", "targets": args.deepshape_targets.split(",")}]})
    t0 = time.perf_counter()
    result = compress(args.model, recipe, out, dtype="bfloat16", progress=False)
    return result.output_dir, result.report["modules"], time.perf_counter() - t0


def summarise_deepshape(reports: dict[str, Any]) -> dict[str, Any]:
    rs = [r for r in reports.values() if "gg_shape_before" in r]
    mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    return {k: mean(k) for k in ("gg_shape_before", "gg_shape", "entropy_bits_before", "entropy_bits",
                                 "int4_error_before", "int4_error_after", "output_error", "weight_change")}


def ppl_part(args: argparse.Namespace, results: dict[str, Any]) -> None:
    text, _ = offline_evaluation_text()
    with tempfile.TemporaryDirectory(prefix="llmcomp-gg-") as tmp:
        ds_dir: Path | None = None
        for name in args.methods.split(","):
            passes, reshape = PPL_METHODS[name]
            source = args.model
            entry: dict[str, Any] = {"method": name, "passes": passes, "deepshape": reshape}
            if reshape:
                if ds_dir is None:
                    ds_dir, ds_reports, ds_seconds = deepshape_checkpoint(args, Path(tmp))
                    results["deepshape"] = {"seconds": round(ds_seconds, 1), **summarise_deepshape(ds_reports),
                                            "targets": args.deepshape_targets, "modules": len(ds_reports),
                                            "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens"}
                source = str(ds_dir)
            model, tok = load_model(source, dtype="bfloat16")
            t0 = time.perf_counter()
            reports = apply_passes(model, passes)
            entry["quantize_seconds"] = round(time.perf_counter() - t0, 1)
            items = [(r["bits_per_weight"], r["numel"]) for r in reports.values() if "bits_per_weight" in r]
            if not items and passes:  # rtn reports no numel: count it from the model
                mods = dict(model.named_modules())
                items = [(r["bits_per_weight"], mods[n].in_features * mods[n].out_features) for n, r in reports.items()]
            total = sum(n for _, n in items)
            entry["avg_bits_per_weight"] = sum(b * n for b, n in items) / total if items else BF16_BITS
            nn.Module.float(model)  # transformers refuses .float() on a loaded llmcomp checkpoint
            res = compute_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens, progress=False)
            entry.update(perplexity=res.perplexity, tokens=res.tokens)
            results["runs"][name] = entry
            print(json.dumps(entry), flush=True)
            args.out.write_text(json.dumps(results, indent=2))


SPEED_SHAPE = (1536, 576)  # SmolLM2's gate/up projection
SPEED_REPS = 30


def speed_part(args: argparse.Namespace) -> dict[str, Any]:
    """The codebook CPU kernels on one rf8 / gg4 layer, interleaved (alternating calls, so load
    changes hit all alike): median ms per call, and the ratio to the cached-dense reference."""
    import statistics

    from llmcomp.kernels.dispatch import _KERNELS, select_kernel
    from llmcomp.modules.codebook_linear import CodebookLinear

    n, k = SPEED_SHAPE
    w = gg.sample((n, k), 1.6, 0.02, generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for fmt in ("rf8", "gg4"):
        group = -1 if cb.FORMAT_BITS[fmt] == 8 else 64
        codes, scale, table = cb.quantize(w, fmt, group, scale_dtype=torch.bfloat16)
        mod = CodebookLinear.from_codes(codes, scale, table, cb.FORMAT_BITS[fmt], group, None, torch.bfloat16, fmt)
        select_kernel(mod.layout, torch.device("cpu"), torch.float32)  # loads the kernel modules
        for dtype in (torch.bfloat16, torch.float32):
            names = [nm for nm in ("reference_codebook", "cpu_codebook_int8x2", "cpu_codebook_blocked")
                     if _KERNELS[nm].can_implement(mod.layout, torch.device("cpu"), dtype)[0]]
            states = {nm: _KERNELS[nm].prepare(mod.layout, mod.kernel_tensors(), dtype) for nm in names}
            for m in (1, 32):
                x = torch.randn(m, k).to(dtype)
                times: dict[str, list[float]] = {nm: [] for nm in names}
                for _ in range(SPEED_REPS):
                    for nm in names:
                        t0 = time.perf_counter()
                        _KERNELS[nm].apply(x, mod.layout, states[nm], None)
                        times[nm].append((time.perf_counter() - t0) * 1e3)
                med = {nm: statistics.median(v) for nm, v in times.items()}
                key = f"{fmt} {str(dtype).split('.')[-1]} M={m}"
                out[key] = {**{f"{nm}_ms": round(v, 3) for nm, v in med.items()},
                            **{f"{nm}_over_reference": round(v / med["reference_codebook"], 2)
                               for nm, v in med.items() if nm != "reference_codebook"}}
                print(key, json.dumps(out[key]), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--part", choices=("weights", "ppl", "speed"), required=True)
    ap.add_argument("--methods", default=",".join(PPL_METHODS))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--deepshape-targets", default="*", help="comma-separated globs of the modules DeepShape reshapes")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("bench/results/gg_formats.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results.setdefault("meta", {})[args.part] = {
        "model": args.model, "machine": f"{cpu_summary()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
        "command": "python " + " ".join(sys.argv), "eval_text": offline_evaluation_text()[1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.part in ("weights", "speed"):
        results[args.part] = weights_part(args) if args.part == "weights" else speed_part(args)
        args.out.write_text(json.dumps(results, indent=2))
    else:
        ppl_part(args, results)


if __name__ == "__main__":
    main()
