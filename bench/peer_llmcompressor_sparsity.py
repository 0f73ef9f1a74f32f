"""Peer run: llm-compressor's SparseGPTModifier / WandaPruningModifier on SmolLM2-135M, for the
sparsity table in docs/BENCHMARKS.md (issue 12).

llm-compressor pins transformers<=5.17 and compressed-tensors==0.19, so it runs from its own
virtualenv (see docs/SPARSITY.md); the calibration windows come from llmcomp's own calibration
text (the same 16 x 512 token windows, seed 0, as bench/sparsity.py) through ``--ids``, written by
``--write-ids`` in llmcomp's environment. The pruned model is saved dense, and perplexity is measured
afterwards with ``llmcomp eval DIR --tasks offline`` (the same evaluation text as our rows).

    .venv/bin/python bench/peer_llmcompressor_sparsity.py --write-ids /tmp/peer/ids.pt
    /tmp/llmc-venv/bin/python bench/peer_llmcompressor_sparsity.py --ids /tmp/peer/ids.pt \\
        --model ~/.cache/llmcomp/models/smollm2-135m --method sparsegpt --sparsity 0.6 -o /tmp/peer/sparsegpt-60
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def write_ids(path: Path, samples: int, seq_len: int) -> None:
    from transformers import AutoTokenizer

    from llmcomp.calibration import calibration_batches, offline_calibration_text
    from llmcomp.loading import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)
    ids = calibration_batches(tok, offline_calibration_text(), samples, seq_len, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    print(f"wrote {tuple(ids.shape)} calibration ids to {path}")


def run_peer(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.ids)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    mask = f"{int(args.pattern.split(':')[0])}:{int(args.pattern.split(':')[1])}" if args.pattern != "unstructured" \
        else "unstructured"
    common = dict(sparsity=args.sparsity, mask_structure="0:0" if mask == "unstructured" else mask,
                  targets=["Linear"], ignore=["lm_head"])
    modifier = SparseGPTModifier(**common) if args.method == "sparsegpt" else WandaPruningModifier(**common)
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - start
    zeros = [float((m.weight == 0).float().mean()) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    out = Path(args.output)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    result = {"peer": "llmcompressor", "method": args.method, "sparsity": args.sparsity, "pattern": args.pattern,
              "seconds": round(seconds, 1), "mean_linear_sparsity": sum(zeros) / len(zeros),
              "calibration": list(ids.shape), "cpu": platform.processor() or platform.machine()}
    (out / "peer_run.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-ids", type=Path, help="write the calibration windows here (llmcomp's venv) and exit")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ids", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    if args.write_ids:
        write_ids(args.write_ids, args.samples, args.seq_len)
    else:
        run_peer(args)


if __name__ == "__main__":
    main()
