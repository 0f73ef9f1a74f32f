"""Routed greedy generation on SmolLM2: per request vs token takeover vs per-token deferral vs
window verification, at taus calibrated on the offline validation text (bench/routing.py).

For each mode and tau: the fraction of generated tokens the super model produced, super forwards
per generated token (a catch-up prefill or a decode step each), the tokens the super model had to
prefill, and two agreements with the super model's own greedy decoding: teacher-forced (the share
of generated tokens the super model would itself pick after the same prefix, one super forward
per output) and free-running (tokens equal to the super-only output before the first difference).
Prompts are windows of the offline *evaluation* text; no tau is fitted on them.

    python bench/routing_generation.py --swift /tmp/ck/fq-w4-aw --taus bench/results/routing_w4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llmcomp.hostinfo import cpu_summary
from llmcomp.route_generate import (
    DeferredGeneration,
    generate_with_deferral,
    generate_with_takeover,
    generate_with_verification,
)
from llmcomp.routing import Router, RouterConfig
from llmcomp.runtime import ModelRunner

VARIANT = "normalized T=0.25"  # the best next-token router of bench/routing.py on this pair
VARIANT_SETTINGS = {"temperature": 0.25, "normalize": True}
TARGETS = ("fraction<=0.25", "fraction<=0.5")  # taus picked on the validation text for these super fractions
WINDOWS = (4, 8)


def modes(swift: ModelRunner, super_: ModelRunner, eos: set[int]) -> dict[str, Any]:
    """name -> f(prompt, router, n) -> DeferredGeneration."""
    out: dict[str, Any] = {
        "per request": lambda p, r, n: generate_with_takeover(swift, super_, p, r, n, eos, first_only=True),
        "token takeover": lambda p, r, n: generate_with_takeover(swift, super_, p, r, n, eos),
        "token deferral": lambda p, r, n: generate_with_deferral(swift, super_, p, r, n, eos),
    }
    for k in WINDOWS:
        out[f"verify window {k}"] = lambda p, r, n, k=k: generate_with_verification(swift, super_, p, r, n, k, eos)
    return out


@torch.inference_mode()
def agreement(super_: ModelRunner, prompt: list[int], tokens: list[int]) -> int:
    """How many of ``tokens`` the super model's argmax picks after the same prefix."""
    super_.free(0)
    logits = super_.prefill(0, prompt + tokens[:-1], logits_for_all=True)[len(prompt) - 1:]
    return int((logits.argmax(-1) == torch.tensor(tokens)).sum())


def summarize(gens: list[DeferredGeneration], refs: list[list[int]], agree: list[int], seconds: float) -> dict:
    tokens = sum(len(g.tokens) for g in gens)
    same = [next((i for i, (a, b) in enumerate(zip(g.tokens, ref, strict=False)) if a != b), min(len(g.tokens),
                 len(ref))) for g, ref in zip(gens, refs, strict=True)]
    return {"tokens": tokens, "super_token_fraction": sum(sum(g.by_super) for g in gens) / tokens,
            "super_forwards_per_token": sum(g.super_forwards for g in gens) / tokens,
            "super_prefill_tokens": sum(g.super_prefill_tokens for g in gens),
            "rejected": sum(g.rejected for g in gens), "agreement": sum(agree) / tokens,
            "equal_prefix": statistics.mean(same), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swift", required=True)
    ap.add_argument("--super", dest="super_", default="smollm2-135m")
    ap.add_argument("--taus", type=Path, default=Path("bench/results/routing_w4.json"),
                    help="a bench/routing.py result: its next-token operating points give the taus")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/routing_generation.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmcomp.calibration import offline_evaluation_text
    from llmcomp.eval.perplexity import tokenize_text
    from llmcomp.loading import load_model, resolve_source
    from llmcomp.runtime.stopping import eos_token_ids

    print(f"host: {cpu_summary()}", flush=True)
    swift_model, tok = load_model(resolve_source(args.swift))
    super_model, _ = load_model(resolve_source(args.super_))
    points = json.loads(args.taus.read_text())["next_token"]["variants"][VARIANT]
    taus = {p["target"]: p for p in points if p["target"] in TARGETS}
    ids = tokenize_text(tok, offline_evaluation_text()[0]).tolist()
    step = len(ids) // args.prompts
    prompts = [ids[i * step:i * step + args.prompt_tokens] for i in range(args.prompts)]
    length = args.prompt_tokens + 2 * args.new_tokens + 1
    swift, super_ = (ModelRunner(m, max_batch_size=1, max_model_len=length) for m in (swift_model, super_model))
    eos = eos_token_ids(super_model, tok)
    everything = Router(RouterConfig(tau=-1e9, **VARIANT_SETTINGS))
    refs = [generate_with_takeover(swift, super_, p, everything, args.new_tokens, eos).tokens for p in prompts]
    nothing = Router(RouterConfig(tau=1e9, **VARIANT_SETTINGS))
    runs: dict[str, Any] = {}
    t0 = time.perf_counter()
    swift_only = [generate_with_deferral(swift, super_, p, nothing, args.new_tokens, eos) for p in prompts]
    runs["swift only"] = summarize(swift_only, refs, [agreement(super_, p, g.tokens) for p, g in
                                                      zip(prompts, swift_only, strict=True)], time.perf_counter() - t0)
    for target, point in taus.items():
        router = Router(RouterConfig(tau=point["tau"], **VARIANT_SETTINGS))
        for name, run in modes(swift, super_, eos).items():
            t0 = time.perf_counter()
            gens = [run(p, router, args.new_tokens) for p in prompts]
            seconds = time.perf_counter() - t0
            agree = [agreement(super_, p, g.tokens) for p, g in zip(prompts, gens, strict=True)]
            runs[f"{name} @ {target}"] = {**summarize(gens, refs, agree, seconds), "tau": point["tau"],
                                         "target": target}
            print(name, target, json.dumps(runs[f"{name} @ {target}"]), flush=True)
    result = {"host": cpu_summary(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "swift": args.swift, "super": args.super_, "router": VARIANT, "taus_from": str(args.taus),
              "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "threads": args.threads, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"-> {args.out}")


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['prompts']} prompts of {result['prompt_tokens']} tokens (offline evaluation text), "
             f"{result['new_tokens']} greedy tokens each; router {result['router']}, taus from {result['taus_from']}",
             "", "| run | super tokens | super forwards / token | super prefill tokens | rejected | agreement with "
             "super argmax | tokens equal to super-only before first difference | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['super_token_fraction']:.3f} | {r['super_forwards_per_token']:.3f} | "
                     f"{r['super_prefill_tokens']} | {r['rejected']} | {r['agreement']:.3f} | "
                     f"{r['equal_prefix']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
