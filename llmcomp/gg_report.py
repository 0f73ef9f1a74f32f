"""Per-layer GG shapes of a checkpoint (``llmcomp inspect --gg``) and histograms with the fitted
densities (``--plot DIR``). Compressed modules are fitted on the weight they compute with
(``dequantized_weight``), dense linears on their stored weight."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmcomp import gg
from llmcomp.errors import LlmcompError

HIST_BINS = 200
PLOT_RANGE_STDS = 6.0  # histograms span mean +- this many standard deviations
PLOT_DPI = 90
PLOT_FLOOR = 1e-5  # lowest density shown, relative to the histogram's peak


def _weights(path: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(module name, kind, float32 weight [N, K])`` of every linear weight in the checkpoint."""
    from llmcomp.formats.checkpoint import load_tensors, validate_checkpoint
    from llmcomp.modules.registry import build_module

    info = validate_checkpoint(path, verify_hashes=False)
    claimed: set[str] = set()
    for name, spec in info.modules.items():
        module = build_module(name, spec, torch.float32)
        wanted = [f"{name}.{t}" for t in module.state_dict()]
        tensors = load_tensors(info, wanted)
        module.load_state_dict({t[len(name) + 1:]: v for t, v in tensors.items()})
        claimed.update(wanted)
        yield name, spec.kind, module.dequantized_weight(torch.float32)
    skip = ("embed", "norm", "lm_head")
    for full, meta in info.tensors.items():
        if full in claimed or not full.endswith(".weight") or len(meta.shape) != 2 or any(s in full for s in skip):
            continue
        yield full[: -len(".weight")], "dense", load_tensors(info, [full])[full].float()


def gg_shapes(path: Path) -> dict[str, dict[str, Any]]:
    """Per module: kind, shape nu, scale alpha, mean and std of the fitted GG."""
    out = {}
    for name, kind, w in _weights(path):
        fit = gg.fit(w)
        out[name] = {"kind": kind, "shape": fit.shape, "scale": fit.scale, "mean": fit.mean, "std": fit.std}
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def plot_histograms(path: Path, out_dir: Path) -> list[Path]:
    """One PNG per module: the weight histogram (log density), the fitted GG and the Gaussian of the
    same variance. Written to a temporary name and renamed, so no half-written image is left."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogFormatter, NullFormatter
    except ModuleNotFoundError as exc:
        raise LlmcompError("--plot needs matplotlib (pip install 'llmcomp[eval]')") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, kind, w in _weights(path):
        fit = gg.fit(w)
        lo, hi = fit.mean - PLOT_RANGE_STDS * fit.std, fit.mean + PLOT_RANGE_STDS * fit.std
        counts = torch.histc(w.reshape(-1).double().clamp(lo, hi), bins=HIST_BINS, min=lo, max=hi)
        edges = torch.linspace(lo, hi, HIST_BINS + 1, dtype=torch.float64)
        density = counts / (counts.sum() * (edges[1] - edges[0]))
        xs = torch.linspace(lo, hi, 400, dtype=torch.float64)
        gauss = torch.exp(-((xs - fit.mean) ** 2) / (2 * fit.std**2)) / (fit.std * math.sqrt(2 * math.pi))
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.stairs(density.numpy(), edges.numpy(), fill=True, color="0.75", label=f"weights ({kind})")
        ax.plot(xs.numpy(), fit.pdf(xs).numpy(), "C0", label=f"GG fit nu={fit.shape:.2f}")
        ax.plot(xs.numpy(), gauss.numpy(), "C1--", label="Gaussian, same variance")
        ax.set_yscale("log")
        peak = float(density.max())
        ax.set_ylim(peak * PLOT_FLOOR, peak * 2)  # a bounded log range keeps the tick count (and time) small
        ax.yaxis.set_major_formatter(LogFormatter())  # plain labels: mathtext parsing dominated the time
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7)
        target = out_dir / f"{name}.png"
        tmp = out_dir / f".{name}.png.tmp"
        fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.12)
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
        plt.close(fig)
        tmp.replace(target)
        written.append(target)
    return written
