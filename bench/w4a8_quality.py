"""What int8 activations cost: perplexity of one int4 checkpoint with the exact-activation kernels
and with ``cpu_w4a8`` (int8 activations in blocks of 32), in float32 and bfloat16, on the held-out
offline text (the same protocol as bench/quant_quality.py).

    python bench/w4a8_quality.py --model CK/fq-w4-aw --out bench/results/w4a8_quality.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

from llmcomp.calibration import offline_evaluation_text
from llmcomp.eval.perplexity import compute_perplexity
from llmcomp.hostinfo import cpu_summary
from llmcomp.kernels.dispatch import preferred_kernels
from llmcomp.kernels.w4a8_cpu import isa_name
from llmcomp.loading import load_model
from llmcomp.modules.kernel_module import KernelLinear

W4A8 = "cpu_w4a8,cpu_w8a8,cpu_int4pack,cpu_int8pack,cpu_dense,reference"  # int8 activations where they run


def kernels_used(model: torch.nn.Module) -> dict[str, int]:
    used: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, KernelLinear) and mod._kernel_state is not None:
            used[mod._kernel_state[0].name] = used.get(mod._kernel_state[0].name, 0) + 1
    return used


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an int4 llmcomp checkpoint")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("bench/results/w4a8_quality.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    text, text_desc = offline_evaluation_text()
    result = {"meta": {"machine": cpu_summary(), "w4a8_isa": isa_name(), "threads": args.threads,
                       "date": dt.datetime.now().isoformat(timespec="minutes"), "command": " ".join(sys.argv),
                       "text": text_desc, "model": args.model}, "runs": []}
    for dtype in args.dtypes.split(","):
        for label, names in (("exact activations", None), ("int8 activations", W4A8)):
            model, tok = load_model(args.model, dtype=dtype)
            with preferred_kernels(names), torch.no_grad():
                res = compute_perplexity(model, tok, text, max_tokens=args.max_tokens, progress=False)
            run = {"dtype": dtype, "activations": label, "perplexity": round(res.perplexity, 4),
                   "tokens": res.tokens, "kernels": kernels_used(model)}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
