"""Routed serving under load: swift only vs super only vs routed, each a real ``llmcomp serve`` process.

For each server in turn: start it, wait for /health, one untimed warm-up request, then
``bench/serve_load.py``'s streaming clients at every --clients level for --duration seconds
(output tokens/s, TTFT, ITL, latency); the routed server's ``/metrics`` counters before and after
each level give the fraction of requests (and of generated tokens) the super model answered.
Stopped before the next one starts, so the servers never share the CPU with each other.

tau: with --tau, that value; otherwise, ``mode: request``, the median swift energy after prefill over
serve_load's prompts (computed here with the swift model), so about half the requests are deferred;
``--mode token``: the --tau-quantile quantile of the swift energies at every step of swift-only greedy
generation of those prompts (--max-tokens each), so about 1 - q of the swift steps spike. Server
``routed-defer`` is the routed server with ``on_spike: defer`` (token mode; ``routed``: takeover).

    taskset -c 1 python bench/routing_serve.py --swift /tmp/ck/fq-w4-aw --clients 1,4 --duration 20 \\
        --out bench/results/routing_serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (bench/serve_load.py: clients, summaries, machine info)

READY_TIMEOUT_S = 1800.0  # compiling every batch bucket of two engines on one shared core takes minutes
STOP_TIMEOUT_S = 30.0
ROUTE_METRICS = {"swift": 'llmcomp_routed_requests_total{model="swift"}',
                 "super": 'llmcomp_routed_requests_total{model="super"}',
                 "mixed": 'llmcomp_routed_requests_total{model="mixed"}',
                 "deferred_tokens": "llmcomp_router_deferred_tokens_total",
                 "generated_tokens": "llmcomp_generation_tokens_total"}


def swift_energies(swift: str, prompts: list[str], steps: int) -> list[list[float]]:
    """Per prompt, the swift energy (T = 1) before each of ``steps`` greedy tokens (the first is
    after the prefill, what the server's first decision sees)."""
    import torch

    from llmcomp.loading import load_model
    from llmcomp.routing import energy

    model, tok = load_model(swift)
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            seq, values = list(tok(prompt).input_ids), []
            for _ in range(steps):
                last = model(input_ids=torch.tensor([seq])).logits[0, -1]
                values.append(float(energy(last)))
                seq.append(int(last.argmax()))
            out.append(values)
    return out


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, max(0, round(q * 1000) - 1))]


class Server:
    """One ``llmcomp serve`` in its own process group, logging to a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = serve_load.free_port()
        self.command = [sys.executable, "-m", "llmcomp", "serve", *args, "--port", str(self.port)]
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.perf_counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> float:
        while time.perf_counter() - self.started < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {k: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
                for k, name in ROUTE_METRICS.items()}

    def stop(self) -> int | None:
        import os

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                return self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()


async def load_levels(server: Server, args: argparse.Namespace, routed: bool) -> list[dict[str, Any]]:
    """Warm up, then every client level; routed: the super share from /metrics around each level."""
    target = serve_load.Target(f"{server.url}/v1")
    await serve_load.resolve_model(target, args)
    await serve_load.warm_up(target, args)
    rows = []
    for clients in args.clients:
        before = server.metrics() if routed else None
        samples, wall = await serve_load.run_level(target, args, clients, args.duration)
        row = {"clients": clients, **serve_load.summarize(samples, wall), "load_avg_1m": serve_load.load_average()}
        if before is not None:
            diff = {k: v - before[k] for k, v in server.metrics().items()}
            answered = diff["swift"] + diff["super"] + diff["mixed"]
            row["super_request_fraction"] = (diff["super"] + diff["mixed"]) / answered if answered else None
            row["super_token_fraction"] = (diff["deferred_tokens"] / diff["generated_tokens"]
                                           if diff["generated_tokens"] else None)
        print(f"  {clients} clients: {serve_load.level_line(row)}"
              + (f", super {row['super_request_fraction']:.2f} of requests" if routed else ""), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swift", required=True, help="the compressed checkpoint")
    ap.add_argument("--super", dest="super_", default="smollm2-135m")
    ap.add_argument("--tau", type=float, default=None, help="default: the median prefill energy of the prompts")
    ap.add_argument("--mode", choices=["request", "token"], default="request")
    ap.add_argument("--tau-quantile", type=float, default=0.9, help="--mode token: tau at this quantile of the "
                    "per-step swift energies")
    ap.add_argument("--clients", type=serve_load.parse_levels, default=[1, 4])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--server-args", default="--threads 1 --max-batch-size 4 --max-model-len 512",
                    help="arguments for every `llmcomp serve`")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--servers", default="swift,super,routed",
                    help="comma list of swift, super, routed, routed-eager (routed with --no-compile), "
                    "routed-defer (token mode, on_spike defer), routed-defer-reprefill (the same without parked "
                    "KV slots), routed-verify (on_spike verify, --window)")
    ap.add_argument("--window", type=int, default=4, help="routed-verify: swift tokens checked at a spike")
    ap.add_argument("--out", type=Path, default=Path("bench/results/routing_serve.json"))
    args = ap.parse_args(argv)
    args.chat, args.temperature, args.ignore_eos, args.api_key, args.model = False, 0.0, True, None, None
    args.warmup = True

    steps = swift_energies(args.swift, serve_load.PROMPTS, args.max_tokens if args.mode == "token" else 1)
    energies = [e[0] for e in steps]
    if args.tau is not None:
        tau = args.tau
    elif args.mode == "token":
        tau = quantile([e for values in steps for e in values], args.tau_quantile)
    else:
        tau = statistics.median(energies)
    work = Path(tempfile.mkdtemp(prefix="routing-serve-"))
    router, defer, verify = work / "router.json", work / "router-defer.json", work / "router-verify.json"
    from llmcomp.routing import RouterConfig, save_router

    save_router(RouterConfig(tau=tau, mode=args.mode, swift=args.swift, super=args.super_), router)
    save_router(RouterConfig(tau=tau, mode="token", on_spike="defer", swift=args.swift, super=args.super_), defer)
    save_router(RouterConfig(tau=tau, mode="token", on_spike="verify", window=args.window, swift=args.swift,
                             super=args.super_), verify)
    common = args.server_args.split() + ([] if args.compile else ["--no-compile"])
    commands = {"swift": [args.swift, *common], "super": [args.super_, *common],
                "routed": ["--router", str(router), *common],
                "routed-eager": ["--router", str(router), *args.server_args.split(), "--no-compile"],
                "routed-defer": ["--router", str(defer), *common],
                "routed-defer-reprefill": ["--router", str(defer), "--park-slots", "0", *common],
                "routed-verify": ["--router", str(verify), *common]}
    argv = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {**serve_load.run_meta(args, argv), "command": shlex.join(["python", __file__, *argv]),
                              "tau": tau, "mode": args.mode, "prefill_energies": energies,
                              "step_energies": steps if args.mode == "token" else None,
                              "expected_super_fraction": sum(e > tau for e in energies) / len(energies),
                              "spiking_step_fraction": (sum(e > tau for v in steps for e in v)
                                                        / sum(len(v) for v in steps)),
                              "servers": {}}
    for name in args.servers.split(","):
        server = Server(commands[name], work / f"{name}.log")
        print(f"[{name}] {' '.join(server.command)}", flush=True)
        try:
            startup = server.wait_ready()
            print(f"[{name}] ready in {startup:.0f} s", flush=True)
            rows = asyncio.run(load_levels(server, args, routed=name.startswith("routed")))
            result["servers"][name] = {"command": " ".join(server.command), "startup_s": round(startup, 1),
                                       "levels": rows}
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md table of one result."""
    f = serve_load.fmt
    lines = ["| server | clients | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | latency p50 (s) | "
             "super fraction (requests / tokens) | errors |", "|---" * 8 + "|"]
    for name, s in result["servers"].items():
        for r in s["levels"]:
            share = (f"{f(r['super_request_fraction'])} / {f(r['super_token_fraction'])}"
                     if "super_request_fraction" in r else "-")
            lines.append(f"| {name} | {r['clients']} | {r['output_tokens_per_s']:.1f} | {f(r['ttft_s']['p50'])} / "
                         f"{f(r['ttft_s']['p99'])} | {f(r['itl_s']['p50'], 1000, 1)} / {f(r['itl_s']['p99'], 1000, 1)}"
                         f" | {f(r['latency_s']['p50'])} | {share} | {r['errors']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
