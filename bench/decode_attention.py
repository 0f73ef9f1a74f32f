"""Compiled decode step: the runtime's fused single-query attention vs SDPA, at several batch sizes
and cached lengths, on one model, in interleaved rounds (one process, same conditions).

Why: for one query per row, torch's CPU SDPA kernel costs about 50 us per call whatever the length,
and far more with many cached tokens; the runtime's compiled step therefore writes decode attention
as products and sums that Inductor fuses (``LlamaForward._decode_attention``). This measures both.

    python bench/decode_attention.py --model CK/fq-w4-aw-head8 --shapes 1x32,8x512,16x1000 \\
        --threads 1 --out bench/results/decode_attention.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcomp.hostinfo import cpu_summary

VARIANTS = ("fused", "sdpa")


def sdpa_attention(self: Any, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """What the compiled step ran before: torch's SDPA on the single query."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.kv_heads != self.num_heads)


def measure(model: Any, batch: int, context: int, rounds: int, steps: int) -> dict[str, Any]:
    """ms per decode step of ``batch`` rows with ``context`` cached tokens, for each variant."""
    from llmcomp.runtime import ModelRunner

    runners = {}
    for variant in VARIANTS:
        runner = ModelRunner(model, batch, context + 2 * steps, compile=True, buckets=[batch])
        if variant == "sdpa":
            runner.forward._decode_attention = types.MethodType(sdpa_attention, runner.forward)
        runner.warm_up()
        for slot in range(batch):
            runner.prefill(slot, [(slot + i) % 1000 + 10 for i in range(context)])
        runners[variant] = runner
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant, runner in runners.items():
            for slot in range(batch):
                runner.rewind(slot, context)
            runner.decode([5] * batch)  # untimed
            t0 = time.perf_counter()
            for _ in range(steps):
                runner.decode([5] * batch)
            times[variant].append((time.perf_counter() - t0) / steps * 1000)
    row: dict[str, Any] = {"batch_size": batch, "context": context}
    for variant, ts in times.items():
        row[f"{variant}_median_ms"] = round(statistics.median(ts), 2)
        row[f"{variant}_best_ms"] = round(min(ts), 2)
    row["sdpa_over_fused"] = round(row["sdpa_median_ms"] / row["fused_median_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias, HF dir or llmcomp checkpoint")
    ap.add_argument("--shapes", default="1x32,8x512,16x1000", help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per round")
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode_attention.json"))
    args = ap.parse_args(argv)
    from llmcomp.loading import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    rows = []
    for shape in args.shapes.split(","):
        batch, context = (int(v) for v in shape.lower().split("x"))
        rows.append(measure(model, batch, context, args.rounds, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    result = {"meta": {"machine": cpu_summary(), "threads": args.threads, "torch": torch.__version__,
                       "date": dt.datetime.now().isoformat(timespec="minutes"), "command": " ".join(sys.argv)},
              "model": args.model, "dtype": args.dtype, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
