"""E-LANG routing benchmark: accuracy vs super-call fraction, against a random router, and serving latency.

Swift = a strongly compressed SmolLM2-135M checkpoint, super = the original. Three parts:

1. GLUE-format tasks (sst2, rte; synthetic local data from ``bench/routing_data.py``, because GLUE
   cannot be downloaded here; ``--sst2-data rotten-tomatoes``: real movie-review sentences from
   ``bench/sentiment_data.py`` instead): tau picked on ``train``, accuracy reported on ``validation``.
2. Next-token accuracy (generation, teacher-forced): tau picked on the offline validation text,
   reported on the offline evaluation text (8,176 tokens, windows of 512), with routed perplexity.
3. Serving: the same prompts through three native servers (swift only, super only, routed), one
   after another per round, latency and throughput; the answering model from the header.

For each energy variant, every operating point's tau comes from the calibration data; the
numbers are measured on the report data. The random router's accuracy at a fraction f is its
expectation ``(1 - f) * swift + f * super`` on the report data.

    python bench/routing.py --swift /tmp/ck/fq-w3-aw --out bench/results/routing.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_data import write_task_data  # noqa: E402
from sentiment_data import DESCRIPTION as RT_DESCRIPTION  # noqa: E402
from sentiment_data import write_sst2  # noqa: E402

from llmcomp.hostinfo import cpu_summary  # noqa: E402
from llmcomp.route_calibrate import (  # noqa: E402
    TOKEN_BLOCK,
    Example,
    lower_gaps,
    pick_point,
    pick_within,
    routing_curve,
    split_spec,
    task_samples,
)
from llmcomp.routing import RouterConfig, routing_energy  # noqa: E402

VARIANTS = {  # name -> router settings (the paper's energy first)
    "energy T=1": {"temperature": 1.0},
    "energy T=2": {"temperature": 2.0},
    "energy choices T=1": {"temperature": 1.0, "energy_over": "choices"},
    "normalized T=0.5": {"temperature": 0.5, "normalize": True},
    "normalized T=0.25": {"temperature": 0.25, "normalize": True},
}
GLUE_VARIANTS = ("energy T=1", "energy choices T=1", "normalized T=0.5", "normalized T=0.25")
TOKEN_VARIANTS = ("energy T=1", "energy T=2", "normalized T=0.5", "normalized T=0.25")
FRACTIONS = (0.1, 0.25, 0.5, 0.75)
MAX_DROP = 0.01  # "within 1 point of super"
CONFIDENCE = 0.95  # llmcomp route calibrate's default confidence for that target
WINDOW = 512
SERVE_MAX_TOKENS = 16
SERVE_TARGET = "fraction<=0.5"
DEFERRAL_PROMPT, DEFERRAL_NEW = 64, 24  # token-level deferral: prompt and generated tokens


def gain_over_random(report: list[Example], deferred: list[bool], block: int) -> tuple[float, float]:
    """Routed accuracy minus the random router's expectation at the same fraction f, with its standard
    error: the mean of ``(d_i - f) * (super_i - swift_i)`` over the examples, errors clustered in
    blocks of ``block`` consecutive examples (next-token positions of one text are not independent)."""
    f = sum(deferred) / len(report)
    terms = [(d - f) * (int(e.super_correct) - int(e.swift_correct)) for e, d in zip(report, deferred, strict=True)]
    mean = statistics.fmean(terms)
    blocks = [terms[i:i + block] for i in range(0, len(terms), block)]
    return mean, math.sqrt(sum((sum(b) - len(b) * mean) ** 2 for b in blocks)) / len(terms)


def operating_points(calib: list[Example], report: list[Example]) -> list[dict[str, Any]]:
    """Each target's tau picked on ``calib``, applied to ``report``."""
    curve = routing_curve(calib)
    targets: list[tuple[str, Any]] = [(f"fraction<={f}", pick_point(curve, super_fraction=f)) for f in FRACTIONS]
    targets.append((f"super-{MAX_DROP}", pick_point(curve, acc=curve[-1].acc - MAX_DROP)))
    block = TOKEN_BLOCK if calib[0].swift_nll is not None else 1  # next-token positions vs documents
    lower = lower_gaps(calib, CONFIDENCE, block)
    targets.append((f"super-{MAX_DROP} @{CONFIDENCE:g}", pick_within(curve, len(calib), MAX_DROP, lower)))
    n = len(report)
    swift = sum(e.swift_correct for e in report) / n
    super_ = sum(e.super_correct for e in report) / n
    has_nll = report[0].swift_nll is not None
    out = []
    for name, point in targets:
        deferred = [e.energy > point.tau for e in report]
        f = sum(deferred) / n
        row = {"target": name, "tau": point.tau, "calib_fraction": point.super_fraction, "calib_acc": point.acc,
               "super_fraction": f,
               "acc": sum(e.super_correct if d else e.swift_correct for e, d in zip(report, deferred, strict=True)) / n,
               "random_acc": (1 - f) * swift + f * super_}
        row["acc_minus_random_se"] = gain_over_random(report, deferred, block)[1]
        if has_nll:
            nll = sum(e.super_nll if d else e.swift_nll for e, d in zip(report, deferred, strict=True)) / n
            swift_nll = sum(e.swift_nll for e in report) / n
            super_nll = sum(e.super_nll for e in report) / n
            row.update(ppl=math.exp(nll), random_ppl=math.exp((1 - f) * swift_nll + f * super_nll))
        out.append(row)
    return out


def summary(report: list[Example]) -> dict[str, float]:
    n = len(report)
    out = {"examples": n, "swift_acc": sum(e.swift_correct for e in report) / n,
           "super_acc": sum(e.super_correct for e in report) / n}
    if report[0].swift_nll is not None:
        out.update(swift_ppl=math.exp(sum(e.swift_nll for e in report) / n),
                   super_ppl=math.exp(sum(e.super_nll for e in report) / n))
    return out


# -- 1. GLUE-format tasks --------------------------------------------------------------------------
def glue_examples(swift, super_, tok, task: str, data_dir: Path, split: str, slots: int) -> tuple[dict, dict]:
    """Per variant: examples of ``task``/``split``; plus the seconds each model's scoring pass took."""
    from llmcomp.eval.routed import RoutedLM
    from llmcomp.eval.runtime_lm import RuntimeLM
    from llmcomp.eval.tasks import TASKS

    spec = split_spec(TASKS[task], split)
    t0 = time.perf_counter()
    super_samples = {s["doc_id"]: s for s in task_samples(RuntimeLM(super_, tok, slots=slots, progress=False),
                                                          [spec], data_dir, None)[task]}
    seconds = {"super": time.perf_counter() - t0}
    out = {}
    for name in GLUE_VARIANTS:
        settings = VARIANTS[name]
        lm = RoutedLM(swift, tok, RouterConfig(tau=0.0, **settings), None, slots=slots, progress=False)
        t0 = time.perf_counter()
        samples = task_samples(lm, [spec], data_dir, None)[task]
        seconds.setdefault("swift", time.perf_counter() - t0)
        out[name] = [Example(task, s["doc_id"], lm.stats.doc_energy[(task, s["doc_id"])], bool(s["acc"]),
                             bool(super_samples[s["doc_id"]]["acc"])) for s in samples]
    return out, seconds


# -- 2. next-token accuracy ------------------------------------------------------------------------
@torch.inference_mode()
def token_examples_all(swift, super_, tok, text: str, max_tokens: int) -> dict[str, list[Example]]:
    """Per token variant: next-token examples of ``text`` (one pass of each model for all variants)."""
    from llmcomp.eval.perplexity import plan_windows, tokenize_text
    from llmcomp.runtime import ModelRunner

    ids = tokenize_text(tok, text)[:max_tokens]
    runners = [ModelRunner(m, max_batch_size=1, max_model_len=WINDOW) for m in (swift, super_)]
    out: dict[str, list[Example]] = {name: [] for name in TOKEN_VARIANTS}
    for window in plan_windows(ids.numel(), WINDOW, None):
        tokens = ids[window.begin:window.end].tolist()
        targets = torch.tensor(tokens[1:])
        res = []
        for runner in runners:
            runner.free(0)
            logits = runner.prefill(0, tokens[:-1], logits_for_all=True).float()
            res.append((logits, (logits.argmax(-1) == targets).tolist(),
                        torch.nn.functional.cross_entropy(logits, targets, reduction="none").tolist()))
        for name in TOKEN_VARIANTS:
            energies = routing_energy(res[0][0], RouterConfig(tau=0.0, **VARIANTS[name])).tolist()
            out[name] += [Example("next-token", window.begin + j, e, res[0][1][j], res[1][1][j], res[0][2][j],
                                  res[1][2][j]) for j, e in enumerate(energies)]
    return out


# -- 2b. token-level deferral during generation -------------------------------------------------------
def deferral(swift, super_, tok, text: str, taus: dict[str, float], prompts: int, prompt_len: int,
             new_tokens: int) -> dict[str, Any]:
    """Greedy generation with per-token deferral: fraction of super tokens, and how often the output
    equals the super model's own greedy output (position by position, until the first difference)."""
    from llmcomp.eval.perplexity import tokenize_text
    from llmcomp.route_generate import generate_with_deferral
    from llmcomp.routing import Router
    from llmcomp.runtime import ModelRunner

    ids = tokenize_text(tok, text).tolist()
    starts = [i * (len(ids) // prompts) for i in range(prompts)]
    runners = [ModelRunner(m, max_batch_size=1, max_model_len=prompt_len + new_tokens + 1) for m in (swift, super_)]
    settings = {"swift only": (1e9, {}), "super only": (-1e9, {})}
    settings.update({name: (tau, VARIANTS[name]) for name, tau in taus.items()})
    outputs: dict[str, list] = {}
    out: dict[str, Any] = {}
    for name, (tau, variant) in settings.items():
        router = Router(RouterConfig(tau=tau, **variant))
        t0 = time.perf_counter()
        outputs[name] = [generate_with_deferral(runners[0], runners[1], ids[s:s + prompt_len], router, new_tokens)
                         for s in starts]
        seconds = time.perf_counter() - t0
        out[name] = {"seconds": seconds, "super_fraction": statistics.mean(g.super_fraction for g in outputs[name]),
                     "super_prefill_tokens": sum(g.super_prefill_tokens for g in outputs[name])}
    for name, gens in outputs.items():
        prefix = []
        for g, ref in zip(gens, outputs["super only"], strict=True):
            same = next((i for i, (a, b) in enumerate(zip(g.tokens, ref.tokens, strict=True)) if a != b), len(g.tokens))
            prefix.append(same)
        out[name]["tokens_equal_to_super_before_first_difference"] = statistics.mean(prefix)
    return {"prompts": prompts, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "runs": out}


# -- 3. serving ------------------------------------------------------------------------------------
def serving(swift, super_, tok, config: RouterConfig, prompts: list[str], rounds: int, clients: int) -> dict:
    """Latency/throughput of swift-only, super-only and routed servers, interleaved per round."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from llmcomp.serve.app import ROUTED_HEADER, ServerConfig, create_app
    from llmcomp.serve.background import BackgroundServer
    from llmcomp.serve.engine import Engine
    from llmcomp.serve.routed_engine import RoutedEngine

    engines = {"swift only": Engine(swift, tok, max_batch_size=clients, max_queue=64),
               "super only": Engine(super_, tok, max_batch_size=clients, max_queue=64),
               "routed": RoutedEngine(swift, super_, tok, config, max_batch_size=clients, max_queue=64)}
    servers = {k: BackgroundServer(create_app(e, ServerConfig("m"))) for k, e in engines.items()}
    urls = {k: s.start() for k, s in servers.items()}
    stats: dict[str, dict[str, list]] = {k: {"latency": [], "wall": [], "tokens": [], "super": []} for k in engines}

    def one(url: str, prompt: str) -> tuple[float, int, str | None]:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": SERVE_MAX_TOKENS,
                                                      "temperature": 0}, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"], r.headers.get(ROUTED_HEADER)

    try:
        for _ in range(rounds):
            for name, url in urls.items():
                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    results = list(pool.map(lambda p, u=url: one(u, p), prompts))
                stats[name]["wall"].append(time.perf_counter() - t0)
                stats[name]["latency"] += [r[0] for r in results]
                stats[name]["tokens"].append(sum(r[1] for r in results))
                stats[name]["super"] += [r[2] == "super" for r in results]
    finally:
        for s in servers.values():
            s.stop()
        for e in engines.values():
            e.close()
    out = {}
    for name, s in stats.items():
        out[name] = {"requests": len(s["latency"]), "mean_latency_s": statistics.mean(s["latency"]),
                     "p90_latency_s": sorted(s["latency"])[int(0.9 * len(s["latency"])) - 1],
                     "tokens_per_s": sum(s["tokens"]) / sum(s["wall"]),
                     "super_fraction": (sum(s["super"]) / len(s["super"])) if name == "routed" else None}
    return out


def _points_table(variants: dict[str, list[dict]], ppl: bool) -> list[str]:
    head = ("| router | target (on calibration data) | tau | super fraction | acc | random router acc | "
            "acc - random (± 95%) |")
    sep = "|---|---|---|---|---|---|---|"
    if ppl:
        head += " ppl | random router ppl |"
        sep += "---|---|"
    lines = [head, sep]
    for name, rows in variants.items():
        for r in rows:
            se = f" ± {1.96 * r['acc_minus_random_se']:.4f}" if "acc_minus_random_se" in r else ""
            line = (f"| {name} | {r['target']} | {r['tau']:.3f} | {r['super_fraction']:.3f} | {r['acc']:.4f} | "
                    f"{r['random_acc']:.4f} | {r['acc'] - r['random_acc']:+.4f}{se} |")
            if ppl:
                line += f" {r['ppl']:.2f} | {r['random_ppl']:.2f} |"
            lines.append(line)
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of one result file."""
    lines: list[str] = []
    for task, t in result.get("glue", {}).get("tasks", {}).items():
        data = "Rotten Tomatoes sentences" if task == "sst2" and "sst2_data" in result["glue"] else "synthetic"
        lines += [f"**{task}** ({data}, {t['examples']} validation rows; tau from {t['rows']['train']} train rows): "
                  f"swift acc {t['swift_acc']:.4f}, super acc {t['super_acc']:.4f}", ""]
        lines += _points_table(t["variants"], ppl=False) + [""]
    if "next_token" in result:
        t = result["next_token"]
        lines += [f"**Next-token accuracy** ({t['examples']} tokens of the offline evaluation text, tau from the "
                  f"offline validation text): swift acc {t['swift_acc']:.4f} (ppl {t['swift_ppl']:.2f}), super acc "
                  f"{t['super_acc']:.4f} (ppl {t['super_ppl']:.2f})", ""]
        lines += _points_table(t["variants"], ppl=True) + [""]
    if "token_deferral" in result:
        d = result["token_deferral"]
        lines += [f"**Token-level deferral** ({d['prompts']} prompts of {d['prompt_tokens']} tokens, "
                  f"{d['new_tokens']} greedy tokens each)", "",
                  "| run | super tokens | super catch-up prefill tokens | tokens equal to super's before the first "
                  "difference |", "|---|---|---|---|"]
        for name, r in d["runs"].items():
            lines.append(f"| {name} | {r['super_fraction']:.3f} | {r['super_prefill_tokens']} | "
                         f"{r['tokens_equal_to_super_before_first_difference']:.1f} |")
        lines.append("")
    if "serving" in result:
        s = result["serving"]
        lines += [f"**Serving** ({s['prompts']} prompts x rounds, {s['clients']} clients, {s['max_tokens']} tokens, "
                  f"tau {s['tau']:.3f})", "", "| server | requests | mean latency s | p90 latency s | tokens/s | "
                  "super fraction |", "|---|---|---|---|---|---|"]
        for name, r in s["servers"].items():
            frac = "-" if r["super_fraction"] is None else f"{r['super_fraction']:.3f}"
            lines.append(f"| {name} | {r['requests']} | {r['mean_latency_s']:.2f} | {r['p90_latency_s']:.2f} | "
                         f"{r['tokens_per_s']:.2f} | {frac} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swift", help="the compressed checkpoint (required unless --markdown)")
    ap.add_argument("--super", dest="super_", default="smollm2-135m")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/routing-data"))
    ap.add_argument("--examples", type=int, default=400, help="rows per split of each synthetic task")
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--sst2-data", choices=("synthetic", "rotten-tomatoes"), default="synthetic",
                    help="sst2 rows: synthetic templates, or real Rotten Tomatoes sentences (bench/sentiment_data.py)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="next-token part: tokens of each text")
    ap.add_argument("--deferral-prompts", type=int, default=6)
    ap.add_argument("--serve-prompts", type=int, default=8)
    ap.add_argument("--serve-rounds", type=int, default=2)
    ap.add_argument("--serve-clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: glue,tokens,serve")
    ap.add_argument("--out", type=Path, default=Path("bench/results/routing.json"))
    ap.add_argument("--markdown", type=Path, help="only print the tables of this result file")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.swift is None:
        ap.error("--swift is required")
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    from llmcomp.calibration import offline_evaluation_text, offline_validation_text
    from llmcomp.eval.model_size import measure_model_size
    from llmcomp.loading import load_model, resolve_source

    print(f"host: {cpu_summary()}", flush=True)
    swift, tok = load_model(resolve_source(args.swift))
    super_, _ = load_model(resolve_source(args.super_))
    sizes = {k: measure_model_size(resolve_source(m).location).to_dict()
             for k, m in (("swift", args.swift), ("super", args.super_))}
    result: dict[str, Any] = {"host": cpu_summary(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "swift": args.swift, "super": args.super_, "sizes": sizes, "threads": args.threads}
    if "glue" not in skip:
        result["glue"] = {"data": "synthetic templates (bench/routing_data.py), not GLUE", "tasks": {}}
        for task in args.tasks.split(","):
            if task == "sst2" and args.sst2_data == "rotten-tomatoes":
                sizes_written = write_sst2(args.data_dir, args.examples, args.examples)
                result["glue"]["sst2_data"] = RT_DESCRIPTION
            else:
                sizes_written = write_task_data(args.data_dir, task, args.examples, args.examples)
            calib, _ = glue_examples(swift, super_, tok, task, args.data_dir, "train", args.slots)
            report, seconds = glue_examples(swift, super_, tok, task, args.data_dir, "validation", args.slots)
            result["glue"]["tasks"][task] = {
                "rows": sizes_written, "seconds_per_pass": seconds, **summary(report[GLUE_VARIANTS[0]]),
                "variants": {v: operating_points(calib[v], report[v]) for v in GLUE_VARIANTS}}
            print(json.dumps({task: result["glue"]["tasks"][task]["variants"]["energy T=1"]}, indent=1), flush=True)
    if "tokens" not in skip:
        calib = token_examples_all(swift, super_, tok, offline_validation_text()[0], args.max_tokens)
        report = token_examples_all(swift, super_, tok, offline_evaluation_text()[0], args.max_tokens)
        result["next_token"] = {"calibration": "offline validation text", "report": "offline evaluation text",
                                **summary(report[TOKEN_VARIANTS[0]]),
                                "variants": {v: operating_points(calib[v], report[v]) for v in TOKEN_VARIANTS}}
        result["next_token"]["serve_tau"] = {  # the half-and-half point: both engines get traffic
            v: next(p["tau"] for p in result["next_token"]["variants"][v] if p["target"] == SERVE_TARGET)
            for v in TOKEN_VARIANTS}
        print(json.dumps(result["next_token"]["variants"]["energy T=1"], indent=1), flush=True)
        result["token_deferral"] = deferral(swift, super_, tok, offline_evaluation_text()[0],
                                            {v: result["next_token"]["serve_tau"][v]
                                             for v in ("energy T=1", "normalized T=0.25")},
                                            args.deferral_prompts, DEFERRAL_PROMPT, DEFERRAL_NEW)
        print(json.dumps(result["token_deferral"], indent=1), flush=True)
    if "serve" not in skip:
        rows = [json.loads(line) for line in (args.data_dir / "sst2" / "validation.jsonl").read_text().splitlines()]
        prompts = [r["sentence"] for r in rows[:args.serve_prompts]]
        tau = result.get("next_token", {}).get("serve_tau", {}).get("energy T=1")
        if tau is None:
            raise SystemExit("the serving part uses the next-token router's tau: do not skip 'tokens'")
        config = RouterConfig(tau=tau, temperature=1.0)
        result["serving"] = {"tau": tau, "prompts": len(prompts), "clients": args.serve_clients,
                             "max_tokens": SERVE_MAX_TOKENS,
                             "servers": serving(swift, super_, tok, config, prompts, args.serve_rounds,
                                                args.serve_clients)}
        print(json.dumps(result["serving"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
