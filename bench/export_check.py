"""Does a compressed-tensors export decode like the llmcomp checkpoint it came from?

Greedy completions of a few prompts from (1) llmcomp's own loader on the llmcomp checkpoint,
(2) stock transformers + compressed-tensors on the export, (3) stock vLLM (CPU) on the export in a
separate process with the llmcomp vLLM plugin disabled (``VLLM_PLUGINS=""``). Writes JSON.

    python bench/export_check.py CKPT EXPORT --tokens 32 --out bench/results/export_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "The three primary colors are",
    "def fibonacci(n):",
]
VLLM_MEMORY_FRACTION = 0.3  # on CPU this sizes the KV cache in host memory


def llmcomp_greedy(ckpt: str, tokens: int, dtype: str) -> list[str]:
    from llmcomp.generation import generate
    from llmcomp.loading import load_model

    model, tok = load_model(ckpt, dtype=dtype)
    return [generate(model, tok, [p], tokens, stop_at_eos=False).texts[0] for p in PROMPTS]


def transformers_greedy(export_dir: str, tokens: int, dtype: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=getattr(torch, dtype)).eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def vllm_greedy_worker(export_dir: str, tokens: int, dtype: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=export_dir, dtype=dtype, enforce_eager=True, max_model_len=512,
              gpu_memory_utilization=VLLM_MEMORY_FRACTION)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)
    outs = llm.generate(PROMPTS, params)
    print("VLLM_JSON " + json.dumps([o.outputs[0].text for o in outs]), flush=True)


def vllm_greedy(export_dir: str, tokens: int, dtype: str) -> tuple[list[str] | None, str]:
    env = {**os.environ, "VLLM_PLUGINS": ""}  # stock vLLM: no llmcomp plugin in any process
    cmd = [sys.executable, __file__, "--vllm-worker", export_dir, "--tokens", str(tokens), "--dtype", dtype]
    proc = subprocess.run(cmd,
                          env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_JSON "):
            return json.loads(line[len("VLLM_JSON "):]), ""
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln] or proc.stderr.splitlines() or ["no output"]
    return None, errors[-1].strip()


def compare(a: list[str], b: list[str]) -> dict[str, Any]:
    same = [x == y for x, y in zip(a, b, strict=True)]
    prefix = [len(os.path.commonprefix([x, y])) for x, y in zip(a, b, strict=True)]
    return {"identical": sum(same), "of": len(same), "common_prefix_chars": prefix}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("export", nargs="?")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="float32 compares exact arithmetic; bf16 ties can flip")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_check.json"))
    args = ap.parse_args(argv)
    if args.vllm_worker:
        vllm_greedy_worker(args.vllm_worker, args.tokens, args.dtype)
        return
    ours = llmcomp_greedy(args.checkpoint, args.tokens, args.dtype)
    stock = transformers_greedy(args.export, args.tokens, args.dtype)
    result: dict[str, Any] = {"dtype": args.dtype, "prompts": PROMPTS, "llmcomp": ours, "transformers": stock,
                              "transformers_vs_llmcomp": compare(stock, ours)}
    if not args.no_vllm:
        texts, error = vllm_greedy(args.export, args.tokens, args.dtype)
        result["vllm"] = texts if texts is not None else {"error": error}
        if texts is not None:
            result["vllm_vs_llmcomp"] = compare(texts, ours)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
