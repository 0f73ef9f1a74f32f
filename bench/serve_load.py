"""Load test for any OpenAI-compatible endpoint: N concurrent streaming clients for a fixed time.

Reports requests/s, output tokens/s, p50/p99 latency and time to first token, and errors, and
writes them with the machine, date and command line as JSON.

    python bench/serve_load.py --base-url http://127.0.0.1:8000/v1 --clients 4 --duration 20 \\
        --output results/native-w8.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

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


@dataclass
class Sample:
    start: float
    ttft: float | None
    latency: float
    output_tokens: int
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without needing numpy."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str) -> Sample:
    """Send one streaming request; tokens come from the usage chunk, else one per content chunk."""
    if args.chat:
        path = "/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    else:
        path = "/completions"
        body = {"prompt": prompt}
    body.update(model=args.model, max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
                stream_options={"include_usage": True})
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llmcomp extension: every request makes exactly max_tokens
    start = time.perf_counter()
    ttft, chunks, usage_tokens = None, 0, None
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(start, None, time.perf_counter() - start, 0, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Sample(start, ttft, time.perf_counter() - start, chunks, "stream error")
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Sample(start, ttft, time.perf_counter() - start, chunks, type(exc).__name__)
    return Sample(start, ttft, time.perf_counter() - start, usage_tokens if usage_tokens is not None else chunks)


async def client_loop(client: httpx.AsyncClient, args: argparse.Namespace, index: int, deadline: float,
                      samples: list[Sample]) -> None:
    i = index
    while time.perf_counter() < deadline:
        samples.append(await one_request(client, args, PROMPTS[i % len(PROMPTS)]))
        i += args.clients


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(base_url.rstrip("/") + "/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        if not args.model:
            args.model = await resolve_model(client, args.base_url)
        if args.warmup:
            await one_request(client, args, PROMPTS[0])
        samples: list[Sample] = []
        started = time.perf_counter()
        deadline = started + args.duration
        await asyncio.gather(*(client_loop(client, args, i, deadline, samples) for i in range(args.clients)))
        wall = time.perf_counter() - started
    return summarize(samples, wall, args)


def summarize(samples: list[Sample], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    latencies = [s.latency for s in ok]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    tokens = sum(s.output_tokens for s in ok)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "machine": machine_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "wall_s": round(wall, 3),
        "requests": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": dict(Counter(s.error for s in samples if s.error)),
        "requests_per_s": len(ok) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
        "ttft_s": {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)},
        "samples": [asdict(s) for s in samples] if args.keep_samples else None,
    }


def machine_info() -> dict[str, Any]:
    from llmcomp.hostinfo import cpu_info

    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # other work sharing the machine
    return {"host": platform.node(), **cpu_info(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1_5_15": load}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (ending in /v1)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--duration", type=float, default=20.0, help="seconds during which new requests start")
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
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1:
        p.error("--clients and --max-tokens must be >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    line = (f"{result['requests']} requests ({result['errors']} errors) in {result['wall_s']:.1f} s: "
            f"{result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} output tok/s, "
            f"latency p50 {result['latency_s']['p50']} s, TTFT p50 {result['ttft_s']['p50']} s")
    print(line)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
