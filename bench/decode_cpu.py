"""CPU decode throughput: bf16 vs llmcomp int8/int4 checkpoints vs llama.cpp on the same GGUF.

Every torch model runs through :func:`llmcomp.generation.generate` (static KV cache, fixed-shape
decode step, bf16 activations). ``--profile`` also measures, at batch 1, how much of a decode step
is spent inside matmul kernels (torch profiler, self time of GEMM/GEMV ops vs step wall time):
the evidence that batch-1 decode is matmul-bound, which is what weight-only quantization speeds up.

    python bench/decode_cpu.py --models smollm2-135m,/tmp/ck/finequant-w8,/tmp/ck/finequant-w4 \\
        --batch-sizes 1,8 --tokens 64 --profile --llama-cpp --out bench/results/decode_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmcomp.cli.bench_cmd import DEFAULT_PROMPT, parse_modes, run_bench
from llmcomp.hostinfo import cpu_summary
from llmcomp.kernels.w4a8_cpu import isa_name as w4a8_isa_name

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu")
PROFILE_STEPS = 16


def profile_decode(model_source: str, dtype: str, steps: int = PROFILE_STEPS) -> dict[str, Any]:
    """Share of batch-1 decode time spent in matmul ops (the rest: attention, norms, Python)."""
    from torch.profiler import ProfilerActivity, profile

    from llmcomp.generation import generate
    from llmcomp.loading import load_model

    model, tok = load_model(model_source, dtype=dtype)
    generate(model, tok, [DEFAULT_PROMPT], max_new_tokens=4, stop_at_eos=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = generate(model, tok, [DEFAULT_PROMPT], max_new_tokens=steps + 1, stop_at_eos=False)
    per_op = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS}
    matmul_us = sum(per_op.values())
    # The window also holds the prefill (one forward of the short prompt, itself matmul-heavy).
    total_us = (res.prefill_seconds + res.decode_seconds) * 1e6
    return {
        "model": model_source,
        "profiled_steps": res.decode_steps + 1,
        "matmul_ms_total": round(matmul_us / 1000, 2),
        "wall_ms_total": round(total_us / 1000, 2),
        "matmul_share": round(matmul_us / total_us, 3) if total_us else None,
        "matmul_ops_ms": {k: round(v / 1000, 2) for k, v in per_op.items()},
    }


def interleaved_bench(sources: list[str], sizes: list[int], tokens: int, dtype: str, rounds: int,
                      modes: list[str], llama_threads: int | None = None) -> dict[str, Any]:
    """All models loaded at once and measured in turn, ``rounds`` times: on a shared machine the
    load changes minute to minute, so each model sees the same conditions; min and median kept.
    Each (model, mode) gets one runner, compiled before the first round (compile time recorded).
    ``llama_threads`` adds llama.cpp on the embedded GGUF to every round (batch 1 only: the
    llama-cpp-python API decodes one sequence)."""
    from llmcomp.generation import generate
    from llmcomp.kernels.dispatch import preferred_kernels
    from llmcomp.loading import load_model
    from llmcomp.runtime import ModelRunner

    kernels = {s: kernel_choice(s) for s in sources}
    models = {s: load_model(kernels[s][0], dtype=dtype) for s in sources}
    max_len = max(len(tok(DEFAULT_PROMPT)["input_ids"]) for _, tok in models.values()) + tokens
    runners, compile_s = {}, {}
    for source, (model, _) in models.items():
        for mode in modes:
            with preferred_kernels(kernels[source][1]):
                runner = ModelRunner(model, max(sizes), max_len, compile=mode == "compiled", buckets=sizes)
                compile_s[(source, mode)] = round(runner.warm_up(), 1)
            runners[(source, mode)] = runner
    llama = LlamaCppDecoder(embedded_gguf(), llama_threads) if llama_threads else None
    times: dict[tuple[str, str, int], list[float]] = {(s, m, b): [] for (s, m) in runners for b in sizes}
    if llama is not None:
        times[(llama.name, "native", 1)] = []
    for _ in range(rounds):
        for bs in sizes:
            for (source, mode), runner in runners.items():
                model, tok = models[source]
                with preferred_kernels(kernels[source][1]):
                    res = generate(model, tok, [DEFAULT_PROMPT] * bs, max_new_tokens=tokens, stop_at_eos=False,
                                   runner=runner)
                times[(source, mode, bs)].append(res.decode_seconds / max(res.decode_steps, 1))
            if llama is not None and bs == 1:
                times[(llama.name, "native", 1)].append(llama.seconds_per_token(tokens))
    if llama is not None:
        llama.close()
    out = []
    for (source, mode, bs), ts in times.items():
        ts = sorted(ts)
        out.append({"model": source, "mode": mode, "batch_size": bs, "rounds": rounds,
                    "compile_seconds": compile_s.get((source, mode)),
                    "best_ms_per_step": round(1000 * ts[0], 2), "median_ms_per_step": round(1000 * ts[len(ts) // 2], 2),
                    "best_tokens_per_second": round(bs / ts[0], 2),
                    "median_tokens_per_second": round(bs / ts[len(ts) // 2], 2)})
    return {"dtype": dtype, "tokens": tokens, "results": out}


def kernel_choice(source: str) -> tuple[str, str | None]:
    """``PATH@k1+k2`` -> (PATH, "k1,k2"): the same checkpoint measured with kernels forced by name
    (``+`` because ``--models`` is comma-separated), e.g. ``CK/fq-w4-aw@cpu_w4a8+cpu_int4pack``."""
    path, _, names = source.partition("@")
    return path, names.replace("+", ",") or None


class LlamaCppDecoder:
    """llama.cpp (llama-cpp-python) greedy batch-1 decode on a GGUF, timed per token without the prompt."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.name = f"llama.cpp:{gguf.name}"
        self.llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                         n_batch=64, verbose=False)
        self.prompt = self.llm.tokenize(DEFAULT_PROMPT.encode())
        self.seconds_per_token(4)  # warm-up

    def seconds_per_token(self, tokens: int) -> float:
        self.llm.reset()
        self.llm.eval(self.prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            self.llm.eval([self.llm.sample(temp=0.0)])
        return (time.perf_counter() - t0) / tokens

    def close(self) -> None:
        self.llm.close()


def llama_cpp_bench(gguf: Path, tokens: int, threads: int) -> dict[str, Any]:
    """llama.cpp batch-1 decode rate on the GGUF (prompt processing excluded)."""
    decoder = LlamaCppDecoder(gguf, threads)
    return {"model": str(gguf), "engine": "llama.cpp (llama-cpp-python)", "threads": threads,
            "results": [{"batch_size": 1, "decode_tokens_per_second": round(1 / decoder.seconds_per_token(tokens), 2)}]}


def embedded_gguf() -> Path:
    from llmcomp.loading import EMBEDDED_ALIASES, _embedded_gguf

    return _embedded_gguf(next(iter(EMBEDDED_ALIASES)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated sources (alias, HF dir, checkpoint)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--modes", default="eager,compiled", help="eager and/or compiled decode steps")
    ap.add_argument("--profile", action="store_true", help="measure the matmul share of batch-1 decode")
    ap.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp on the embedded GGUF")
    ap.add_argument("--rounds", type=int, default=0,
                    help="interleaved mode: load all models, measure each in turn this many times")
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    result: dict[str, Any] = {
        "meta": {"machine": cpu_summary(), "threads": args.threads, "w4a8_isa": w4a8_isa_name(),
                 "torch": torch.__version__, "date": dt.datetime.now().isoformat(timespec="minutes"),
                 "command": " ".join(sys.argv)},
        "runs": [], "profiles": [],
    }
    if args.rounds:
        result["interleaved"] = interleaved_bench(args.models.split(","), sizes, args.tokens, args.dtype, args.rounds,
                                                  parse_modes(args.modes),
                                                  llama_threads=args.threads if args.llama_cpp else None)
        print(json.dumps(result["interleaved"]), flush=True)
    for source in args.models.split(",") if not args.rounds else []:
        run = run_bench(source, sizes, args.tokens, args.dtype, args.threads, parse_modes(args.modes), 1,
                        DEFAULT_PROMPT)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    for source in args.models.split(",") if args.profile else []:
        prof = profile_decode(source, args.dtype)
        result["profiles"].append(prof)
        print(json.dumps(prof), flush=True)
    if args.llama_cpp and not args.rounds:
        run = llama_cpp_bench(embedded_gguf(), args.tokens, args.threads)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
