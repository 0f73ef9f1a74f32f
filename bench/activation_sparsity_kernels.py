"""Batch-1 int4 layer calls on CPU: dense int4 vs the ways to skip unselected input channels.

Per SmolLM2-135M projection shape, int4 RTN asymmetric (group 32, ``--group``), bf16 activations, one row:

* ``int4pack dense``: torch's fused int4 GEMV (``cpu_int4pack``), the baseline to beat;
* ``packed C``: ``cpu_sparse_packed`` (kept rows of input-channel-major packed codes, C inner loop),
  eager (inside the compiled runtime it is one op node; a compiled single call would mostly time
  torch.compile's entry cost, so it is measured in the runtime benchmark instead);
* ``torch ops``: the same layout with torch ops only (gather the kept code rows, split nibbles,
  group scales, one matmul), eager and compiled by Inductor (which includes the entry cost);
* ``bag bf16``: ``cpu_sparse_bag`` over a dequantized bf16 ``W^T`` (what int4 + sparsity used before).

All variants are timed in interleaved rounds, so load on the shared machine hits them alike;
results are microseconds per call, the median of the rounds and their minimum (on a core shared
with bursty jobs the minimum is the steadier estimate of the uncontended time).

    python bench/activation_sparsity_kernels.py --out bench/results/activation_sparsity_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmcomp import intquant
from llmcomp.hostinfo import cpu_summary
from llmcomp.kernels import act_sparse_packed
from llmcomp.kernels.dispatch import (
    ActivationSparseLayout,
    ActivationSparseTensors,
    QuantLayout,
    QuantTensors,
    select_kernel,
)

SHAPES = {"q/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536)}
GROUP = 32


def torch_ops_gather(x: torch.Tensor, state, keep: int) -> torch.Tensor:  # noqa: ANN001
    """The packed layout with torch ops only: what a kernel-free formulation costs."""
    score = x[0].float().abs() * state.col_norms
    idx = torch.topk(score, keep, sorted=False).indices
    return (x[0].index_select(0, idx).float() @ act_sparse_packed.dequantize_rows(state, idx)).to(x.dtype)[None]


def timed(fns: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    for f in fns.values():
        for _ in range(5):
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, f in fns.items():  # interleaved
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[name].append(1e6 * (time.perf_counter() - t0) / calls)
    return {n: (round(statistics.median(v), 1), round(min(v), 1)) for n, v in times.items()}


def bench_shape(shape: str, args: argparse.Namespace) -> list[dict[str, object]]:
    cpu, dtype = torch.device("cpu"), torch.bfloat16
    n, k = SHAPES[shape]
    qw = intquant.quantize_rtn(torch.randn(n, k) * 0.05, 4, args.group, False, scale_dtype=dtype)
    qlayout = QuantLayout(n, k, 4, args.group, False)
    tensors = QuantTensors(intquant.pack(qw.q, 4), qw.scale, qw.zero)
    x = torch.randn(1, k).to(dtype)
    dense = select_kernel(qlayout, cpu, dtype, prefer="cpu_int4pack")
    dense_state = dense.prepare(qlayout, tensors, dtype)
    fns: dict[str, Callable[[], object]] = {"int4pack dense": lambda: dense.apply(x, qlayout, dense_state, None)}
    for s in (float(v) for v in args.sparsities.split(",")):
        layout = ActivationSparseLayout(qlayout, 1.0 - s, "wina")
        for name in ("cpu_sparse_packed", "cpu_sparse_bag"):
            kern = select_kernel(layout, cpu, dtype, prefer=name)
            st = kern.prepare(layout, ActivationSparseTensors(tensors), dtype)
            label = "packed C" if name == "cpu_sparse_packed" else "bag bf16"
            fns[f"{label} eager s={s:g}"] = lambda kern=kern, st=st, layout=layout: kern.apply(x, layout, st, None)
            if name != "cpu_sparse_packed":
                continue
            fns[f"torch ops eager s={s:g}"] = lambda st=st, layout=layout: torch_ops_gather(x, st, layout.keep)
            if not args.no_compile:  # includes torch.compile's per-call entry cost (paid once per step in the runtime)
                ops = torch.compile(lambda v, st=st, layout=layout: torch_ops_gather(v, st, layout.keep),
                                    dynamic=False)
                fns[f"torch ops compiled s={s:g}"] = lambda f=ops: f(x)
    with torch.inference_mode():
        us = timed(fns, args.calls, args.rounds)
    rows = []
    for name, (med, best) in us.items():  # the min: the time when the shared core was not taken
        rows.append({"shape": shape, "variant": name, "us_per_call": med, "us_per_call_min": best,
                     "speedup_vs_int4": round(us["int4pack dense"][0] / med, 3),
                     "speedup_vs_int4_min": round(us["int4pack dense"][1] / best, 3)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.65")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--group", type=int, default=GROUP, help="int4 group size (fq-w4-aw mostly uses 128)")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {"machine": cpu_summary(), "torch": torch.__version__, "threads": 1,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args) | {"out": str(args.out)},
           "native": act_sparse_packed.native_available(), "rows": []}
    print(out["machine"], flush=True)
    for shape in args.shapes.split(","):
        out["rows"] += bench_shape(shape, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
