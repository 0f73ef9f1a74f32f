"""Healing: a short distillation of a factorized checkpoint from its original model.

CompactifAI retrains briefly after tensorization; we distill instead of fine-tuning on labels:
``loss = kl_weight * T^2 KL(teacher_T || student_T) + lm_weight * CE(next token)`` on calibration
text (the offline calibration texts by default, never the evaluation texts). Only the factor
tensors are trainable (MPO cores, low-rank factors): everything else, dense layers included, stays
bit-identical, so the healed checkpoint has the same format and size.

Robustness: the trainable tensors and the optimizer state are saved every ``checkpoint_every``
steps in ``OUT.heal/state.pt`` (temp file + rename); ``resume=True`` continues from there with the
same data order, so an interrupted run ends bit-identical to an uninterrupted one. Ctrl-C (SIGINT)
finishes the current step, saves that state and writes ``OUT`` from it (a usable checkpoint);
a second Ctrl-C aborts at once, leaving the last periodic state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcomp.calibration import calibration_batches, calibration_text
from llmcomp.errors import CheckpointError, LlmcompError
from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.formats.rewrite import rewrite_checkpoint

HEALABLE_KINDS = ("mpo", "low_rank")
STATE_SUFFIX = ".heal"
STATE_FILE = "state.pt"
STATE_VERSION = 1


@dataclass(frozen=True)
class HealConfig:
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 4
    seq_len: int = 256
    num_samples: int = 64  # calibration windows, visited in a fixed-seed order per epoch
    kl_weight: float = 1.0
    lm_weight: float = 0.5
    temperature: float = 1.0
    checkpoint_every: int = 25
    seed: int = 0
    balance_cores: bool = False  # balance float MPO cores before step 1 (for checkpoints with TT-SVD's cores)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.num_samples < 1:
            raise LlmcompError("steps, batch size, samples must be positive and seq_len at least 2")
        if self.lr <= 0 or self.temperature <= 0 or self.checkpoint_every < 1:
            raise LlmcompError("lr, temperature and checkpoint interval must be positive")
        if self.kl_weight < 0 or self.lm_weight < 0 or self.kl_weight + self.lm_weight == 0:
            raise LlmcompError("kl_weight and lm_weight must be non-negative and not both 0")


@dataclass
class HealResult:
    output_dir: Path
    steps_done: int
    interrupted: bool
    history: list[dict[str, float]] = field(default_factory=list)


def state_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + STATE_SUFFIX)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The factor tensors of every MPO / low-rank module (biases excluded), made trainable; the rest frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    found: dict[str, nn.Parameter] = {}
    for mname, module in model.named_modules():
        if getattr(type(module), "kind", None) not in HEALABLE_KINDS:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname != "bias":
                p.requires_grad_(True)
                found[f"{mname}.{pname}"] = p
    return found


def balance_mpo_cores(model: nn.Module) -> int:
    """Balance every float-core MPO of ``model`` in place (same product, docs/TENSORNET.md "Core
    balancing": balanced cores heal faster); returns how many modules."""
    from llmcomp.modules.mpo_linear import MPOLinear
    from llmcomp.passes.tensornet import balance_cores

    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MPOLinear) and module.core_bits is None:
                for core, balanced in zip(module.cores, balance_cores(module.cores), strict=True):
                    core.copy_(balanced)
                count += 1
    return count


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                 cfg: HealConfig) -> tuple[torch.Tensor, float, float]:
    """``(loss, kl, ce)``: KL on all positions at temperature T (scaled by T^2), CE on next tokens."""
    t = cfg.temperature
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab) / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / t, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t
    ce = F.cross_entropy(student_logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
    return cfg.kl_weight * kl + cfg.lm_weight * ce, float(kl.detach()), float(ce.detach())


def batch_indices(step: int, cfg: HealConfig) -> torch.Tensor:
    """Windows of step ``step``: a fixed-seed permutation per epoch, so resuming replays the same order."""
    per_epoch = max(1, cfg.num_samples // cfg.batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(cfg.num_samples, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    return order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]


def train_step(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, step: int, cfg: HealConfig,
               optim: torch.optim.Optimizer) -> dict[str, float]:
    """One distillation step on the windows of ``step`` (0-based); its record (``step`` is 1-based)."""
    ids = windows[batch_indices(step, cfg)]
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
    loss, kl, ce = distill_loss(student(ids).logits, teacher_logits, ids, cfg)
    if not math.isfinite(float(loss.detach())):
        raise LlmcompError(f"healing diverged at step {step + 1}; lower --lr")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return {"step": step + 1, "loss": float(loss.detach()), "kl": kl, "ce": ce}


class _Interrupt:
    """SIGINT sets a flag (the step in flight finishes); a second SIGINT raises at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def _sigint_deferred() -> Iterator[_Interrupt]:
    flag = _Interrupt()
    try:
        previous = signal.signal(signal.SIGINT, flag)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _fingerprint(ckpt: Path, teacher: str, cfg: HealConfig, text_desc: str) -> dict[str, Any]:
    info = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    return {"checkpoint": str(ckpt.resolve()), "files": info.get("files"), "teacher": teacher, "config": asdict(cfg),
            "calibration": text_desc, "version": STATE_VERSION}


def _save_state(path: Path, step: int, params: dict[str, nn.Parameter], optim: torch.optim.Optimizer,
                history: list[dict[str, float]], fingerprint: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save({"step": step, "params": {n: p.detach().clone() for n, p in params.items()},
                "optimizer": optim.state_dict(), "history": history, "fingerprint": fingerprint}, tmp)
    os.replace(tmp, path / STATE_FILE)


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    file = path / STATE_FILE
    if not file.is_file():
        return None
    state = torch.load(file, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{file} was saved by a heal run with other inputs or settings; "
                              f"remove {path} or rerun with the same options")
    return state


def write_healed(ckpt: Path, output: Path, params: dict[str, nn.Parameter], meta: dict[str, Any],
                 overwrite: bool) -> None:
    """Copy ``ckpt`` to ``output`` with the trained tensors replaced (same names, shapes, dtypes and
    shard layout), fresh file hashes in config.json, and a ``healing`` entry in the report."""
    info = validate_checkpoint(ckpt, verify_hashes=False)
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in params.items():
        if name in info.tensors:
            stored = info.tensors[name]
            replaced.setdefault(stored.file, {})[name] = param.detach().to(stored.dtype).contiguous()

    def edit(qc: dict[str, Any], report: dict[str, Any]) -> None:
        report["healing"] = meta

    rewrite_checkpoint(info, ckpt, output, overwrite, replaced, edit=edit)


def heal(ckpt: str | Path, teacher: str, output: str | Path, cfg: HealConfig | None = None,
         calibration: str | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
         on_step: Callable[[int, dict[str, float]], None] | None = None) -> HealResult:
    """Distill ``ckpt`` (an llmcomp checkpoint with MPO / low-rank modules) from ``teacher`` into ``output``."""
    from llmcomp.loading import load_model, resolve_source

    cfg = cfg or HealConfig()
    cfg.validate()
    ckpt, output = Path(ckpt), Path(output)
    validate_checkpoint(ckpt, verify_hashes=False)
    sdir = state_dir(output)
    if output.exists() and not overwrite and not (resume and sdir.is_dir()):
        raise CheckpointError(f"{output} already exists; pass --overwrite to replace it")
    student, tokenizer = load_model(resolve_source(str(ckpt)), dtype=torch.float32)
    params = trainable_parameters(student)
    if not params and any(getattr(m, "core_bits", None) is not None for m in student.modules()):
        raise LlmcompError(f"{ckpt} stores int-quantized MPO cores (core_bits), which do not train: heal a "
                           "float-core checkpoint, then quantize its cores")
    if not params:
        raise LlmcompError(f"{ckpt} has no {'/'.join(HEALABLE_KINDS)} modules: nothing to heal "
                           "(compress with the tensornet or lowrank pass first)")
    teacher_model, _ = load_model(teacher, dtype=torch.float32)
    teacher_model.requires_grad_(False)
    text, text_desc = calibration_text(None, calibration)
    windows = calibration_batches(tokenizer, text, cfg.num_samples, cfg.seq_len, cfg.seed)
    fingerprint = _fingerprint(ckpt, teacher, cfg, text_desc)
    optim = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    step, history = 0, []
    if resume:
        state = _load_state(sdir, fingerprint)
        if state is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["params"][n])
            optim.load_state_dict(state["optimizer"])
            step, history = state["step"], state["history"]
    if cfg.balance_cores and step == 0:  # a resumed run restored the (balanced, trained) cores
        balance_mpo_cores(student)
    student.eval()  # no dropout; gradients still flow
    interrupted = False
    t0 = time.perf_counter()
    with _sigint_deferred() as flag, _progress(progress, cfg.steps, step) as bar:
        while step < cfg.steps:
            record = train_step(student, teacher_model, windows, step, cfg, optim)
            step += 1
            history.append(record)
            if bar is not None:
                bar.update(bar.task_ids[0], advance=1, description=f"healing  loss {record['loss']:.4f} "
                                                                   f"(kl {record['kl']:.4f}, ce {record['ce']:.3f})")
            if on_step is not None:
                on_step(step, record)
            if flag.requested:
                interrupted = True
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_state(sdir, step, params, optim, history, fingerprint)
    if interrupted:
        _save_state(sdir, step, params, optim, history, fingerprint)
    meta = {"teacher": teacher, "config": asdict(cfg), "calibration": text_desc, "steps_done": step,
            "interrupted": interrupted, "seconds": round(time.perf_counter() - t0, 2),
            "trainable_params": sum(p.numel() for p in params.values()),
            "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None}
    write_healed(ckpt, output, params, meta, overwrite=True)
    if not interrupted:
        shutil.rmtree(sdir, ignore_errors=True)
    return HealResult(output, step, interrupted, history)


@contextmanager
def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  TimeElapsedColumn()) as bar:
        bar.add_task("healing", total=total, completed=done)
        yield bar
