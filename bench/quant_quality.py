"""Perplexity vs average bits per weight: FineQuant vs RTN vs HQQ on one model (CPU).

Each method quantizes every linear inside the decoder layers of a freshly loaded bf16 model
(scales stored in bf16, exactly what a checkpoint holds), then the model is evaluated in float32
on the held-out offline text (``llmcomp.calibration.offline_evaluation_text``): token-level
perplexity over non-overlapping windows. Results are appended to a JSON file, one entry per method,
so long runs can be split across invocations.

    python bench/quant_quality.py --model smollm2-135m --methods bf16,fq-w4,rtn-w4-g64,hqq-w4-g64 \\
        --out bench/results/quant_quality.json
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

from llmcomp.calibration import offline_evaluation_text
from llmcomp.eval.perplexity import compute_perplexity
from llmcomp.hostinfo import cpu_summary
from llmcomp.loading import load_model
from llmcomp.passes import pass_registry
from llmcomp.passes.base import apply_to_layer
from llmcomp.pipeline import compress, find_decoder_layers
from llmcomp.recipes import Recipe

BF16_BITS = 16.0

# name -> (pass type, pass config); FineQuant uses its defaults unless stated.
PASS_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fq-w8": ("finequant", {"bits": 8, "symmetric": True, "min_group_size": 64, "threshold": 0.0}),  # recipe
    "fq-w8-pc": ("finequant", {"bits": 8, "symmetric": True}),  # default price: per-channel (int8pack)
    "fq-w4": ("finequant", {"bits": 4}),
    "fq-w4-t0.03": ("finequant", {"bits": 4, "threshold": 0.03}),
    "fq-w4-t0.008": ("finequant", {"bits": 4, "threshold": 0.008}),
    "fq-w4-sym": ("finequant", {"bits": 4, "symmetric": True}),
    "fq-w4-div": ("finequant", {"bits": 4, "require_divisible": True}),
    "fq-w4-g64": ("finequant", {"bits": 4, "min_group_size": 64, "max_group_size": 64}),
    "fq-w4-g128": ("finequant", {"bits": 4, "min_group_size": 128, "max_group_size": 128}),
    "fq-w4-g32": ("finequant", {"bits": 4, "min_group_size": 32, "max_group_size": 32}),
    "fq-w3": ("finequant", {"bits": 3}),
    "fq-w3-g32": ("finequant", {"bits": 3, "min_group_size": 32, "max_group_size": 32}),
    # Activation-aware (calibrated on the offline calibration text, run through the real pipeline).
    "fq-w4-aw": ("finequant", {"bits": 4, "activation_aware": True, "threshold": 0.025}),  # recipe
    "fq-w4-aw-t0.015": ("finequant", {"bits": 4, "activation_aware": True}),
    "fq-w4-aw-g128": ("finequant", {"bits": 4, "activation_aware": True, "min_group_size": 128,
                                    "max_group_size": 128}),
    "fq-w4-aw-g64": ("finequant", {"bits": 4, "activation_aware": True, "min_group_size": 64,
                                   "max_group_size": 64}),
    "fq-w3-aw": ("finequant", {"bits": 3, "activation_aware": True, "threshold": 0.025}),  # recipe
    "fq-w8-aw-pc": ("finequant", {"bits": 8, "symmetric": True, "activation_aware": True}),
    # Budgeted auto-recipe (llmcomp compress --target-bits B): mixed int3/int4/int8 from measured sensitivity.
    "auto-4.25": ("autobits", {"target_bits": 4.25}),
    "auto-4.2": ("autobits", {"target_bits": 4.197}),  # finequant-w4-aw's own bits
    "auto-3.5": ("autobits", {"target_bits": 3.5}),
    "auto-3.6": ("autobits", {"target_bits": 3.615}),  # finequant-w3-aw's own bits
    "rtn-w8": ("rtn", {"bits": 8, "group_size": -1, "symmetric": True}),
    "rtn-w4-pc": ("rtn", {"bits": 4, "group_size": -1, "symmetric": False}),
    "rtn-w4-g128": ("rtn", {"bits": 4, "group_size": 128, "symmetric": False}),
    "rtn-w4-g64": ("rtn", {"bits": 4, "group_size": 64, "symmetric": False}),
    "rtn-w4-g32": ("rtn", {"bits": 4, "group_size": 32, "symmetric": False}),
    "rtn-w3-g32": ("rtn", {"bits": 3, "group_size": 32, "symmetric": False}),
}
# Stacked recipes (run through the pipeline): name -> passes in order.
STACKED_METHODS: dict[str, list[dict[str, Any]]] = {
    "wanda50-fq4": [{"type": "wanda", "sparsity": 0.5}, {"type": "finequant", "bits": 4}],
    "wanda50-fq4-nomask": [{"type": "wanda", "sparsity": 0.5}, {"type": "finequant", "bits": 4, "respect_mask": False}],
    "wanda50": [{"type": "wanda", "sparsity": 0.5}],
}
HQQ_METHODS = {"hqq-w4-g64": (4, 64), "hqq-w4-g32": (4, 32), "hqq-w3-g32": (3, 32), "hqq-w8-g64": (8, 64)}
HQQ_META_BITS = 32  # HQQ keeps a float16 scale and a float16 zero per group


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    handle = find_decoder_layers(model, model.config.num_hidden_layers)
    return handle.prefix, model.get_submodule(handle.prefix)


def apply_pass(model: nn.Module, pass_type: str, config: dict[str, Any]) -> dict[str, Any]:
    cls = pass_registry()[pass_type]
    p = cls(cls.Config.model_validate(config))
    prefix, layers = decoder_layers(model)
    reports: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        reports.update(apply_to_layer(p, layer, f"{prefix}.{i}"))
    return reports


def apply_hqq(model: nn.Module, bits: int, group: int) -> dict[str, Any]:
    """HQQ (half-quadratic optimiser, float zero points) as fake quantization of each linear."""
    from hqq.core.quantize import Quantizer

    prefix, layers = decoder_layers(model)
    reports = {}
    for i, layer in enumerate(layers):
        for sub, mod in layer.named_modules():
            if type(mod) is not nn.Linear:
                continue
            w = mod.weight.data
            wq, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, optimize=True, axis=1,
                                          bitpack=False, compute_dtype=torch.float32, device="cpu")
            mod.weight.data = Quantizer.dequantize(wq, meta).reshape(w.shape).to(w.dtype)
            reports[f"{prefix}.{i}.{sub}"] = {"bits_per_weight": bits + HQQ_META_BITS / group,
                                              "numel": w.numel(), "group_size": group}
    return reports


def average_bits(reports: dict[str, Any]) -> float | None:
    items = [(r["bits_per_weight"], r["numel"]) for r in reports.values() if "numel" in r and "bits_per_weight" in r]
    if not items:
        return None
    return sum(b * n for b, n in items) / sum(n for _, n in items)


def rtn_numel(model: nn.Module, reports: dict[str, Any]) -> None:
    """The rtn pass does not report sizes; fill them in from the model."""
    modules = dict(model.named_modules())
    for name, rep in reports.items():
        rep.setdefault("numel", modules[name].in_features * modules[name].out_features)


def group_histogram(reports: dict[str, Any]) -> dict[str, int]:
    hist: dict[str, int] = {}
    for rep in reports.values():
        key = str(rep.get("group_size"))
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -int(kv[0]) if kv[0].lstrip("-").isdigit() else 0))


def compress_calibrated(args: argparse.Namespace, pass_type: str, config: dict[str, Any],
                        passes: list[dict[str, Any]] | None = None):
    """Passes that need calibration run through the real pipeline (sequential, layer by layer)."""
    recipe = Recipe(passes=passes or [{"type": pass_type, **config}])
    with tempfile.TemporaryDirectory(prefix="llmcomp-qq-") as tmp:
        result = compress(args.model, recipe, Path(tmp) / "ckpt", dtype="bfloat16", progress=False)
        # A quantized transformers model refuses .float(); load it in float32 directly.
        model, tok = load_model(str(result.output_dir), dtype="float32")
    return model, tok, result.report["modules"]


def _needs_calibration(pass_type: str, config: dict[str, Any]) -> bool:
    cls = pass_registry()[pass_type]
    return cls(cls.Config.model_validate(config)).needs().calibration


def run_method(name: str, args: argparse.Namespace, text: str) -> dict[str, Any]:
    if name in STACKED_METHODS:
        t0 = time.perf_counter()
        model, tok, reports = compress_calibrated(args, "", {}, passes=STACKED_METHODS[name])
        return _evaluate(name, model, tok, reports, time.perf_counter() - t0, args, text)
    if name in PASS_METHODS and _needs_calibration(*PASS_METHODS[name]):
        t0 = time.perf_counter()  # includes the checkpoint round trip: the pipeline writes one
        model, tok, reports = compress_calibrated(args, *PASS_METHODS[name])
        return _evaluate(name, model, tok, reports, time.perf_counter() - t0, args, text)
    model, tok = load_model(args.model, dtype="bfloat16")
    t0 = time.perf_counter()
    reports: dict[str, Any] = {}
    if name in PASS_METHODS:
        reports = apply_pass(model, *PASS_METHODS[name])
        rtn_numel(model, reports)
    elif name in HQQ_METHODS:
        reports = apply_hqq(model, *HQQ_METHODS[name])
    elif name != "bf16":
        raise SystemExit(f"unknown method {name!r}; known: bf16, {', '.join([*PASS_METHODS, *HQQ_METHODS])}")
    return _evaluate(name, model, tok, reports, time.perf_counter() - t0, args, text)


def _evaluate(name: str, model: nn.Module, tok: Any, reports: dict[str, Any], quant_s: float,
              args: argparse.Namespace, text: str) -> dict[str, Any]:
    if next(model.parameters()).dtype != torch.float32:
        model.float()
    res = compute_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                             progress=False)
    return {
        "method": name,
        "config": PASS_METHODS.get(name) or HQQ_METHODS.get(name) or STACKED_METHODS.get(name),
        "perplexity": res.perplexity,
        "tokens": res.tokens,
        "avg_bits_per_weight": BF16_BITS if name == "bf16" else average_bits(reports),
        "group_sizes": group_histogram(reports),
        "quantize_seconds": round(quant_s, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="bf16,fq-w8,rtn-w8,fq-w4,rtn-w4-g64,rtn-w4-g128,hqq-w4-g64")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=0, help="0 = the whole evaluation text")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_quality.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    text, text_desc = offline_evaluation_text()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results["meta"] = {
        "model": args.model, "eval_text": text_desc, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
        "machine": f"{cpu_summary()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
    }
    for name in args.methods.split(","):
        entry = run_method(name, args, text)
        results["runs"][name] = entry
        print(json.dumps(entry), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    base = results["runs"].get("bf16", {}).get("perplexity")
    if base:
        for entry in results["runs"].values():
            entry["ppl_increase_pct"] = round(100 * (entry["perplexity"] / base - 1), 2)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
