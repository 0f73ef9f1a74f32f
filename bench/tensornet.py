"""MPO (tensornet) vs truncated SVD (lowrank) on SmolLM2-135M at equal parameter counts, before and
after the same healing budget, plus decode speed on the native runtime.

Everything runs in memory on one fp32 copy of the model (no checkpoint round trips: those are
covered by the tests); factors are rounded to bf16 before every evaluation, as a checkpoint would
store them. Perplexity: the offline evaluation text (``offline_evaluation_text``, 8,176 tokens at
``--max-tokens 8192``, windows of 512); healing and nothing else sees calibration text
(``offline_calibration_text``), never the evaluation files.

    python bench/tensornet.py --ratios 0.7,0.5,0.3 --heal-ratios 0.5 --heal-steps 40 \\
        --out bench/results/tensornet.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcomp.calibration import calibration_batches, offline_calibration_text, offline_evaluation_text
from llmcomp.eval.perplexity import compute_perplexity
from llmcomp.healing import HealConfig, train_step, trainable_parameters
from llmcomp.hostinfo import cpu_summary
from llmcomp.loading import load_model
from llmcomp.modules.lowrank_linear import LowRankLinear
from llmcomp.modules.mpo_linear import MPOLinear
from llmcomp.passes.base import child_name, compressible_modules, pass_registry, set_submodule
from llmcomp.passes.lowrank import FactorizedConfig, lowrank_rank, truncated_svd
from llmcomp.passes.tensornet import (
    TensorNetConfig,
    balance_cores,
    chi_for_ratio,
    mpo_decompose,
    plan_factors,
    quantize_cores,
)
from llmcomp.profiling import decoder_blocks
from llmcomp.runtime import ModelRunner

STORAGE_DTYPE = torch.bfloat16
BYTES_PER_PARAM = 2  # bf16 storage, as the embedded model's checkpoint
EVAL_BATCH = 4  # windows per forward: an MPO layer rebuilds its weight once per long forward


def factorize(model: nn.Module, method: str, ratio: float, cache: dict[str, Any], balance: bool = False
              ) -> dict[str, Any]:
    """Apply ``method`` (2-core tensornet or lowrank, their sensitivity defaults) at ``ratio`` in place.

    One full SVD per layer and method is cached and truncated for every ratio: for 2 cores (and
    low rank) the truncated decomposition is exactly the leading part of the full one, and the
    squared error exactly the discarded squared singular values (tests/test_tensornet.py).
    ``balance``: MPO cores balanced (``balance_cores``: sqrt of the bond spectrum on each side).
    """
    cls = pass_registry()[method]
    cfg = cls.Config.model_validate({"ratio": ratio})
    p = cls(cfg)
    prefix, blocks = decoder_blocks(model)
    targeted = kept = 0
    errors = []
    for i, block in enumerate(blocks):
        for name, linear in compressible_modules(block, f"{prefix}.{i}").items():
            if not p.selects(name):
                continue
            w = linear.weight.detach()
            if method == "tensornet":
                out_f, in_f = plan_factors(tuple(w.shape), cfg)
                if name not in cache:
                    cache[name] = mpo_decompose(w, out_f, in_f)
                full, spectra = cache[name]
                chi = chi_for_ratio(out_f, in_f, ratio)
                cores = [full[0][..., :chi], full[1][:chi]]
                module = MPOLinear.from_cores(balance_cores(cores) if balance else cores, linear.bias, torch.float32)
                s = spectra[0]
            else:
                if name not in cache:
                    cache[name] = torch.linalg.svd(w.double(), full_matrices=False)
                u, s, vh = cache[name]
                chi = lowrank_rank(tuple(w.shape), cfg, s)
                root = s[:chi].sqrt()
                module = LowRankLinear.from_factors(u[:, :chi] * root, root[:, None] * vh[:chi], linear.bias,
                                                    torch.float32)
            errors.append(float((s[chi:].pow(2).sum() / s.pow(2).sum()).sqrt()))
            targeted += w.numel()
            kept += module.num_params
            set_submodule(block, child_name(name, f"{prefix}.{i}"), module)
    round_factors(model)
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head)
    return {"targeted_modules": len(errors), "targeted_params": targeted, "kept_params": kept,
            "kept_ratio": kept / targeted, "decoder_linear_mb": (linears + kept) * BYTES_PER_PARAM / 1e6,
            "mean_rel_error": statistics.fmean(errors)}


def round_factors(model: nn.Module) -> None:
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(p.to(STORAGE_DTYPE).float())
    for p in model.parameters():
        p.requires_grad_(False)


def perplexity(model: nn.Module, tok: Any, text: str, args: argparse.Namespace) -> float:
    return compute_perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                              batch_size=EVAL_BATCH, progress=False).perplexity


def heal_in_memory(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: HealConfig) -> dict[str, Any]:
    params = trainable_parameters(student)
    optim = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    student.eval()
    t0 = time.perf_counter()
    history = [train_step(student, teacher, windows, step, cfg, optim) for step in range(cfg.steps)]
    seconds = time.perf_counter() - t0
    round_factors(student)
    return {"steps": cfg.steps, "seconds": round(seconds, 1), "first": history[0], "last": history[-1]}


def make_runners(models: dict[str, nn.Module], max_len: int, compile: bool) -> tuple[dict[str, ModelRunner], str]:
    """Batch-1 runners for every model: compiled (warmed up) if that works for all of them, else eager."""
    if compile:
        try:
            runners = {n: ModelRunner(m, max_batch_size=1, max_model_len=max_len, compile=True)
                       for n, m in models.items()}
            seconds = {n: round(r.warm_up(), 1) for n, r in runners.items()}
            return runners, f"compiled (torch.compile, warm-up seconds {seconds})"
        except Exception as exc:  # noqa: BLE001 - any compile failure falls back to eager, recorded
            print(f"compile failed, eager instead: {exc!r}"[:300], flush=True)
            torch._dynamo.reset()
            reason = f"eager (compile failed: {type(exc).__name__})"
    else:
        reason = "eager"
    return {n: ModelRunner(m, max_batch_size=1, max_model_len=max_len) for n, m in models.items()}, reason


def decode_speed(models: dict[str, nn.Module], tokens: int, rounds: int, compile: bool = False) -> dict[str, Any]:
    """Batch-1 decode tokens/s on the native runtime, models interleaved round by round."""
    prompt = list(range(100, 116))
    times: dict[str, list[float]] = {name: [] for name in models}
    runners, mode = make_runners(models, len(prompt) + tokens + 1, compile)
    for _ in range(rounds):
        for name, runner in runners.items():
            runner.free(0)
            with torch.no_grad():
                runner.prefill(0, prompt)
                t0 = time.perf_counter()
                last = prompt[-1]
                for _ in range(tokens):
                    last = int(runner.decode([last])[0].argmax())
                times[name].append(tokens / (time.perf_counter() - t0))
    base = statistics.median(times[next(iter(times))])
    rates = {name: {"tokens_per_s": round(statistics.median(t), 2), "vs_first": round(statistics.median(t) / base, 3),
                    "all": [round(x, 2) for x in t]} for name, t in times.items()}
    return {"mode": mode, **rates}


def layer_speed(model: nn.Module, rounds: int, reps: int = 20) -> dict[str, Any]:
    """One real layer (block 15 up_proj, 576 -> 1536) dense vs MPO vs low rank at ratio 0.5: time per call
    at 1 row (decode) and 512 rows (prefill), interleaved round by round; the MPO path taken is recorded."""
    linear = model.model.layers[15].mlp.up_proj
    w = linear.weight.detach()
    cores, _ = mpo_decompose(w, *plan_factors(tuple(w.shape), TensorNetConfig()),
                             max_ranks=[chi_for_ratio(*plan_factors(tuple(w.shape), TensorNetConfig()), 0.5)])
    mpo = MPOLinear.from_cores(cores, None, torch.float32)
    cfg = FactorizedConfig(ratio=0.5)
    u, v, _ = truncated_svd(w, cfg)
    layers = {"dense": linear, "tensornet": mpo, "lowrank": LowRankLinear.from_factors(u, v, None, torch.float32)}
    out: dict[str, Any] = {"shape": list(w.shape), "mpo": mpo.extra_repr(), "lowrank_rank": u.shape[1],
                           "mpo_contraction_at_512_rows": mpo.uses_contraction(512)}
    for rows in (1, 512):
        x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
        times: dict[str, list[float]] = {n: [] for n in layers}
        with torch.no_grad():
            for _ in range(rounds):
                for name, layer in layers.items():
                    layer(x)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        layer(x)
                    times[name].append((time.perf_counter() - t0) / reps * 1e6)
        base = statistics.median(times["dense"])
        out[f"rows_{rows}"] = {n: {"us": round(statistics.median(t), 1),
                                   "vs_dense": round(statistics.median(t) / base, 2)} for n, t in times.items()}
    return out


def quantize_model_cores(model: nn.Module, bits: int, group: int) -> dict[str, Any]:
    """Replace every MPO layer by its int-``bits`` core version in place; sizes as a checkpoint stores
    them (codes, bf16 scales, int8 zero points). Computes in fp32 from the same stored values."""
    core_bytes = float_bytes = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, MPOLinear):
            continue
        stored = MPOLinear.from_cores([c.detach().to(STORAGE_DTYPE) for c in module.cores], module.bias, STORAGE_DTYPE)
        qmod = quantize_cores(stored, bits, group)
        core_bytes += qmod.storage_bytes
        float_bytes += stored.storage_bytes
        set_submodule(model, name, qmod.float())
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head)
    return {"core_bits": bits, "core_group_size": group, "core_mb": core_bytes / 1e6,
            "float_core_mb": float_bytes / 1e6, "decoder_linear_mb": (dense * BYTES_PER_PARAM + core_bytes) / 1e6}


def quant_cores_rows(dense: nn.Module, tok: Any, text: str, args: argparse.Namespace,
                     save: Any, result: dict[str, Any]) -> None:
    """MPO at ``--ratios`` (first) with int cores, unhealed and (``--healed``) healed, at every ``--core-bits``."""
    ratio = float(args.ratios.split(",")[0])
    base = copy.deepcopy(dense)
    info = factorize(base, "tensornet", ratio, {})
    variants = [("unhealed", base)]
    if args.healed is not None:
        healed = copy.deepcopy(base)
        state = torch.load(args.healed)
        params = trainable_parameters(healed)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
        round_factors(healed)
        variants.append(("healed", healed))
    for label, model in variants:
        for bits in (int(b) for b in args.core_bits.split(",")):
            q = copy.deepcopy(model)
            t1 = time.perf_counter()
            row = {"method": "tensornet", "ratio": ratio, "cores": f"int{bits}", "state": label,
                   "kept_params": info["kept_params"], "targeted_params": info["targeted_params"],
                   **quantize_model_cores(q, bits, args.core_group)}
            row["perplexity"] = perplexity(q, tok, text, args)
            row["seconds"] = round(time.perf_counter() - t1, 1)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            save()
            del q


def spectra_errors(model: nn.Module, ratios: list[float]) -> dict[str, Any]:
    """Relative weight error of every targeted layer at each ratio, MPO (2 cores) vs low rank, exactly
    from singular values (the truncation error of both is the discarded spectrum): no evaluation."""
    cls = pass_registry()["tensornet"]
    selector = cls(cls.Config.model_validate({}))
    prefix, blocks = decoder_blocks(model)
    errors: dict[str, dict[float, list[float]]] = {m: {r: [] for r in ratios} for m in ("tensornet", "lowrank")}
    for i, block in enumerate(blocks):
        for name, linear in compressible_modules(block, f"{prefix}.{i}").items():
            if not selector.selects(name):
                continue
            w = linear.weight.detach().double()
            out_f, in_f = plan_factors(tuple(w.shape), TensorNetConfig())
            unfolding = w.reshape(*out_f, *in_f).permute(0, 2, 1, 3).reshape(out_f[0] * in_f[0], -1)
            s_mpo, s_low = torch.linalg.svdvals(unfolding), torch.linalg.svdvals(w)
            for r in ratios:
                rank = lowrank_rank(tuple(w.shape), FactorizedConfig(ratio=r), s_low)
                for method, s, k in (("tensornet", s_mpo, chi_for_ratio(out_f, in_f, r)), ("lowrank", s_low, rank)):
                    errors[method][r].append(float((s[k:].pow(2).sum() / s.pow(2).sum()).sqrt()))
    return {m: {str(r): round(statistics.fmean(v), 4) for r, v in d.items()} for m, d in errors.items()}


def markdown(result: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md tables from a results file."""
    if "dense_perplexity" not in result:  # a --quant-cores file
        lines = ["| MPO ratio, cores | state | core MB | decoder linears MB | perplexity |", "|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['ratio']}, {row['cores']} (groups of {row['core_group_size']}) | {row['state']} | "
                         f"{row['core_mb']:.1f} (bf16: {row['float_core_mb']:.1f}) | {row['decoder_linear_mb']:.1f} | "
                         f"{row['perplexity']:.2f} |")
        return "\n".join(lines)
    dense = result["dense_perplexity"]
    lines = [f"Dense (bf16 weights, fp32 evaluation): perplexity {dense:.3f}.", "",
             "| method | kept params (targeted layers) | decoder linears MB (bf16) | weight rel. error | perplexity "
             "| healed |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        healed = f"{row['healed_perplexity']:.2f}" if "healed_perplexity" in row else "-"
        lines.append(f"| `{row['method']}` ratio {row['ratio']} | {row['kept_params'] / 1e6:.2f} M / "
                     f"{row['targeted_params'] / 1e6:.2f} M ({row['kept_ratio']:.3f}) | {row['decoder_linear_mb']:.1f} "
                     f"| {row['mean_rel_error']:.3f} | {row['perplexity']:.2f} | {healed} |")
    if "decode" in result:
        lines += ["", "| model (fp32, batch 1) | tokens/s (median) | vs dense | runs |", "|---|---|---|---|"]
        lines.insert(-2, f"Decode runtime: {result['decode'].get('mode', 'eager')}.")
        lines.insert(-2, "")
        for name, d in result["decode"].items():
            if name == "mode":
                continue
            lines.append(f"| {name} | {d['tokens_per_s']:.2f} | {d['vs_first']:.2f}x | {d['all']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, help="print the markdown tables of an existing results file and exit")
    ap.add_argument("--layer-only", action="store_true", help="only time one layer (dense / MPO / low rank)")
    ap.add_argument("--spectra-only", action="store_true",
                    help="only the mean relative weight error of the targeted layers at each ratio (from spectra)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="tensornet,lowrank")
    ap.add_argument("--ratios", default="0.7,0.5,0.3")
    ap.add_argument("--heal-ratios", default="0.5", help="ratios that also get healed (comma list, or empty)")
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--heal-batch", type=int, default=2)
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--heal-samples", type=int, default=32)
    ap.add_argument("--heal-lr", type=float, default=HealConfig.lr)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="time decode on the compiled runtime (eager if it fails)")
    ap.add_argument("--save-healed", type=Path, help="save each healed model's factors here (METHOD-RATIO.pt)")
    ap.add_argument("--quant-cores", action="store_true",
                    help="only MPO at the first --ratios with int cores (--core-bits), unhealed and --healed")
    ap.add_argument("--core-bits", default="8,4")
    ap.add_argument("--core-group", type=int, default=64)
    ap.add_argument("--healed", type=Path, help="healed factors (from --save-healed) for --quant-cores")
    ap.add_argument("--balance-cores", action="store_true", help="balance the MPO cores before evaluating / healing")
    ap.add_argument("--out", type=Path, default=Path("bench/results/tensornet.json"))
    args = ap.parse_args(argv)
    if args.report is not None:
        print(markdown(json.loads(args.report.read_text())))
        return
    torch.set_num_threads(args.threads)
    text, text_desc = offline_evaluation_text()
    dense, tok = load_model(args.model, dtype=torch.float32)
    if args.spectra_only:
        ratios = [float(r) for r in args.ratios.split(",")]
        res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ratios": ratios,
               "mean_rel_error": spectra_errors(dense, ratios)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return
    if args.layer_only:
        res = {"machine": f"{cpu_summary()}, {torch.get_num_threads()} threads",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               **layer_speed(dense, args.decode_rounds)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return
    heal_cfg = HealConfig(steps=args.heal_steps, lr=args.heal_lr, batch_size=args.heal_batch,
                          seq_len=args.heal_seq_len, num_samples=args.heal_samples)
    windows = calibration_batches(tok, offline_calibration_text(), heal_cfg.num_samples, heal_cfg.seq_len)
    result: dict[str, Any] = {
        "model": args.model, "machine": f"{cpu_summary()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "eval_text": text_desc,
        "max_tokens": args.max_tokens, "seq_len": args.seq_len, "heal": heal_cfg.__dict__, "rows": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    if args.quant_cores:  # the healing, if any, happened in the run that saved --healed
        result.pop("heal")
        result["healed_factors"] = None if args.healed is None else str(args.healed)
        quant_cores_rows(dense, tok, text, args, save, result)
        result["total_seconds"] = round(time.perf_counter() - t0, 1)
        save()
        return
    result["dense_perplexity"] = perplexity(dense, tok, text, args)
    print(f"dense ppl {result['dense_perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    save()
    heal_ratios = {float(r) for r in args.heal_ratios.split(",") if r}
    keep: dict[str, nn.Module] = {}
    caches: dict[str, dict[str, Any]] = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            t1 = time.perf_counter()
            row = {"method": method, "ratio": ratio,
                   **factorize(model, method, ratio, caches.setdefault(method, {}), args.balance_cores)}
            row["balanced_cores"] = args.balance_cores and method == "tensornet"
            row["factorize_seconds"] = round(time.perf_counter() - t1, 1)
            row["perplexity"] = perplexity(model, tok, text, args)
            print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if ratio in heal_ratios:
                row["heal"] = heal_in_memory(model, dense, windows, heal_cfg)
                row["healed_perplexity"] = perplexity(model, tok, text, args)
                print(f"  healed: {row['healed_perplexity']:.3f} {row['heal']}", flush=True)
                if args.save_healed is not None:
                    args.save_healed.mkdir(parents=True, exist_ok=True)
                    torch.save({k: v.detach().clone() for k, v in trainable_parameters(model).items()},
                               args.save_healed / f"{method}-{ratio}.pt")
                    round_factors(model)
            result["rows"].append(row)
            save()
            if ratio == 0.5:
                keep[method] = model
            else:
                del model
            if args.decode_tokens and "decode" not in result and len(keep) == len(args.methods.split(",")):
                # As soon as every method's 0.5 model exists: dense and them, interleaved.
                result["decode"] = decode_speed({"dense": dense, **keep}, args.decode_tokens, args.decode_rounds,
                                                args.compile)
                print(json.dumps(result["decode"]), flush=True)
                save()
                keep.clear()
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    save()


if __name__ == "__main__":
    main()
