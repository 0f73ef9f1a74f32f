"""Benchmark the Triton mixed-precision GEMM against cuBLAS fp16/bf16 (and vLLM's Triton W4A16).

    python bench/kernels_gpu.py                 # one H100: expected 2-4 minutes (incl. compiling)
    python bench/kernels_gpu.py --dry-run       # CPU, Triton interpreter, tiny shapes (CI smoke)

Shapes are ``N x K`` = out_features x in_features of a linear layer (y = x @ W.T, W is [N, K]):
4096x4096 (Llama-2-7B q/o_proj), 11008x4096 (its gate/up_proj), 4096x11008 (its down_proj),
4096x14336 (Llama-3-8B / Mistral-7B down_proj). For every shape and M, each method is first
checked on fresh random inputs (relative Frobenius error against an fp32 matmul with the same
weights), then timed: a CUDA graph replays one call per buffer copy, rotating through enough
copies of weights and inputs to exceed twice the L2 cache, and CUDA events time many replays;
the reported time is the median per call. Results print as a table and are written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]  # (N, K)
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128]
DRY_SHAPES = [(40, 96)]
DRY_M_VALUES = [1, 17]
GROUP_SIZE = 128
REL_TOL = {"float16": 5e-3, "bfloat16": 2e-2}
ITERS, DRY_ITERS = 100, 3
MAX_COPIES = 64
DEFAULT_OUT = Path(__file__).parent / "results" / "kernels_gpu.json"


@dataclass
class Method:
    """One way of computing ``x @ W.T``: ``make()`` builds a weight copy, ``run(x, w)`` the product."""

    name: str
    act_dtype: object
    make: Callable[[], object]
    run: Callable[[object, object], object]
    ref_weight: object  # fp32 [N, K] on the device: what the method is supposed to multiply by
    weight_bytes: int


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def build_methods(n: int, k: int, device, use_vllm: bool) -> tuple[list[Method], dict[str, str]]:
    """Random weights for one shape, quantized (on the CPU) and repacked for every method."""
    import torch

    from llmcomp import intquant
    from llmcomp.kernels.dispatch import QuantLayout, QuantTensors
    from llmcomp.kernels.triton_gemm import prepare_weights, quant_matmul

    gen = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    methods: list[Method] = []
    for dtype in (torch.float16, torch.bfloat16):
        wd = w.to(dtype).to(device)
        methods.append(Method(str(dtype).split(".")[-1], dtype, wd.clone, torch.nn.functional.linear,
                              wd.float(), _tensor_bytes(wd)))
    quantized = {}
    for bits, group, label in ((4, GROUP_SIZE, f"int4_g{GROUP_SIZE}"), (8, -1, "int8_pc")):
        qw = quantized[bits] = intquant.quantize_rtn(w, bits, group, symmetric=True)
        layout = QuantLayout(n, k, bits, qw.group_size, True)
        packed = prepare_weights(layout, QuantTensors(intquant.pack(qw.q, bits), qw.scale, None)).to(device)
        ref = intquant.dequantize(qw.q, qw.scale, None, qw.group_size).to(device)
        methods.append(Method(label, torch.float16, packed.clone, quant_matmul, ref,
                              _tensor_bytes(packed.weight, packed.scale)))
    skipped: dict[str, str] = {}
    if use_vllm:
        try:
            int4_ref = next(mt.ref_weight for mt in methods if mt.name == f"int4_g{GROUP_SIZE}")
            methods.append(_vllm_method(quantized[4], n, k, device, int4_ref))
        except Exception as exc:  # not installed, no GPU build, API moved: report and go on
            skipped[f"vllm_int4_g{GROUP_SIZE}"] = f"{type(exc).__name__}: {exc}"[:200]
    return methods, skipped


def _vllm_method(qw, n: int, k: int, device, ref) -> Method:
    """vLLM's Triton W4A16 kernel (GPTQ layout: [K, N/8] int32 packed along N, scales [K/G, N])."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.triton_w4a16 import _triton_w4a16_gemm_impl

    q, scale = qw.q, qw.scale
    u = (q.to(torch.int64) + 8).t().reshape(k, n // 8, 8)  # unsigned nibbles, [K, N/8, 8]
    words = (u << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    b_q = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(device)
    s = scale.t().contiguous().to(torch.float16).to(device)

    def run(x, w):
        return _triton_w4a16_gemm_impl(x, w[0], w[1], None, GROUP_SIZE, 8)

    return Method(f"vllm_int4_g{GROUP_SIZE}", torch.float16, lambda: (b_q.clone(), s.clone()), run, ref,
                  _tensor_bytes(b_q, s))


def rel_error(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def time_cuda(calls: list[Callable[[], object]], iters: int) -> tuple[float, str]:
    """Median microseconds per call: CUDA-graph replays of all calls, timed with CUDA events."""
    import torch

    for c in calls:  # warm-up (also runs the kernel's one-time tuning outside the graph)
        c()
    torch.cuda.synchronize()
    mode = "cuda-graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        replay = graph.replay
    except Exception:  # e.g. an op that cannot be captured: time eager launches instead
        mode = "events"

        def replay():
            for c in calls:
                c()
    replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times), mode


def time_cpu(calls: list[Callable[[], object]], iters: int) -> tuple[float, str]:
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), "cpu-wall"


def bench_one(method: Method, n: int, k: int, m: int, device, iters: int, l2_bytes: int) -> dict:
    import torch

    gen = torch.Generator(device=device).manual_seed(m * 31 + n + k)
    x = torch.randn(m, k, generator=gen, device=device).to(method.act_dtype)
    w = method.make()
    err = rel_error(method.run(x, w), x.float() @ method.ref_weight.T)
    tol = REL_TOL[str(method.act_dtype).split(".")[-1]]
    row = {"N": n, "K": k, "M": m, "method": method.name, "rel_err": err, "ok": err <= tol}
    if not row["ok"]:
        return row
    per_copy = method.weight_bytes + x.numel() * x.element_size()
    copies = max(2, min(MAX_COPIES, math.ceil(2 * l2_bytes / per_copy) + 1)) if device.type == "cuda" else 2
    bufs = [(torch.randn(m, k, generator=gen, device=device).to(method.act_dtype), method.make())
            for _ in range(copies)]
    calls = [lambda b=b: method.run(b[0], b[1]) for b in bufs]
    us, mode = time_cuda(calls, iters) if device.type == "cuda" else time_cpu(calls, iters)
    row.update(us=us, timing=mode, copies=copies, tflops=2 * m * n * k / us / 1e6,
               weight_gbps=method.weight_bytes / us / 1e3)
    return row


def print_table(rows: list[dict], names: list[str]) -> None:
    by = {(r["N"], r["K"], r["M"], r["method"]): r for r in rows}
    head = f"{'N x K':>12} {'M':>4} " + " ".join(f"{nm:>16}" for nm in names) + f" {'int4/fp16':>10}"
    print(head)
    print("-" * len(head))
    for n, k, m in dict.fromkeys((r["N"], r["K"], r["M"]) for r in rows):
        cells = []
        for nm in names:
            r = by.get((n, k, m, nm))
            cells.append("-" if r is None else ("FAIL" if not r["ok"] else f"{r['us']:.1f}us"))
        fp16, int4 = by.get((n, k, m, "float16")), by.get((n, k, m, f"int4_g{GROUP_SIZE}"))
        speed = f"{fp16['us'] / int4['us']:.2f}x" if fp16 and int4 and "us" in fp16 and "us" in int4 else "-"
        print(f"{f'{n}x{k}':>12} {m:>4} " + " ".join(f"{c:>16}" for c in cells) + f" {speed:>10}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM's Triton W4A16 kernel")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions per measurement")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first decorated
    import torch
    import triton

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes, ms = (DRY_SHAPES, DRY_M_VALUES) if args.dry_run else (SHAPES, M_VALUES)
    iters = args.iters or (DRY_ITERS if args.dry_run else ITERS)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    rows, skipped, names = [], {}, []
    t0 = time.time()
    for n, k in shapes:
        methods, skip = build_methods(n, k, device, use_vllm=not (args.dry_run or args.no_vllm))
        skipped.update(skip)
        names += [mt.name for mt in methods if mt.name not in names]
        for m in ms:
            rows += [bench_one(mt, n, k, m, device, iters, l2) for mt in methods]
    print_table(rows, names)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "dry_run": args.dry_run,
        "shape_convention": "N x K = out_features x in_features; y[M, N] = x[M, K] @ W[N, K].T",
        "group_size": GROUP_SIZE,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seconds": round(time.time() - t0, 1),
        "skipped": skipped,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
