"""Routed evaluation (E-LANG): lm-eval requests scored by the swift model, deferred to the super
model per example when the swift energy at the answer position is above ``tau``.

Per example, for log-likelihood choice tasks (GLUE): every choice of a document shares its
context, and the context's last logits are the distribution over the answer's first token. The
swift model scores all requests (one prefill per context, as :class:`RuntimeLM` does); the
energy of those logits decides; the documents above ``tau`` are scored again, whole, by the super
model, whose scores replace the swift ones. lm-eval then computes ``acc`` from the merged scores,
so routed accuracy is measured exactly as a single model's. For ``generate_until`` the decision is
made on the prompt's last logits after a swift prefill, and the whole generation is run by the
chosen model.

Compute saved is reported two ways: the measured seconds of the swift pass and of the super pass
over the deferred part (``run_swift_seconds``, ``run_super_seconds``: the whole run), and a
weight-traffic model (``weight_traffic_saved``: bytes of weights read per token, the cost that
dominates memory-bound decoding) against running the super model alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcomp.eval.runtime_lm import Request, RuntimeLM
from llmcomp.routing import Router, RouterConfig, routing_energy
from llmcomp.runtime import ModelRunner

ALL_TASKS = "all"  # stats key for requests without a task name (rolling windows)


@dataclass
class TaskRouting:
    """Routing counts of one task: documents seen, documents deferred to super."""

    examples: int = 0
    super_calls: int = 0

    @property
    def super_fraction(self) -> float:
        return self.super_calls / self.examples if self.examples else 0.0


@dataclass
class RoutingStats:
    """Everything a routed run measured."""

    tasks: dict[str, TaskRouting] = field(default_factory=dict)
    swift_seconds: float = 0.0
    super_seconds: float = 0.0
    doc_energy: dict[tuple[str, int], float] = field(default_factory=dict)  # (task, doc_id) -> energy

    def task(self, name: str | None) -> TaskRouting:
        return self.tasks.setdefault(name or ALL_TASKS, TaskRouting())


class EnergyLM(RuntimeLM):
    """:class:`RuntimeLM` that records the swift energy of every context's last logits."""

    def __init__(self, model: Any, tokenizer: Any, config: RouterConfig, slots: int, progress: bool = True) -> None:
        super().__init__(model, tokenizer, slots=slots, progress=progress)
        self.router = Router(config)
        self.context_energy: dict[tuple[int, ...], float] = {}
        self._batch: list[Any] = []

    def _score_groups(self, runner: ModelRunner, batch: list[Any]):
        self._batch = batch  # _prefill needs the continuations (their first tokens) for energy_over=choices
        yield from super()._score_groups(runner, batch)

    def _prefill(self, runner: ModelRunner, contexts: list[list[int]]) -> list[torch.Tensor]:
        lasts = super()._prefill(runner, contexts)
        config = self.router.config
        for (ctx, conts), last in zip(self._batch, lasts, strict=True):
            logits = last
            if config.energy_over == "choices":
                logits = last[sorted({cont[0] for cont, _ in conts})]
            self.context_energy[tuple(ctx)] = float(routing_energy(logits, config))
        return lasts


class RoutedLM(EnergyLM):
    """lm-eval model: swift scores everything, super rescoring the documents above ``tau``.

    ``super_lm=None`` scores with swift only and just records energies (calibration).
    """

    def __init__(self, swift_model: Any, tokenizer: Any, config: RouterConfig, super_lm: RuntimeLM | None,
                 slots: int, progress: bool = True) -> None:
        super().__init__(swift_model, tokenizer, config, slots=slots, progress=progress)
        self.super_lm = super_lm
        self.stats = RoutingStats()
        self._owners: list[tuple[str | None, int | None]] | None = None

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._owners = [(r.task_name, r.doc_id) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._owners = None

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              label: str = "loglikelihood", **kwargs: Any) -> list[tuple[float, bool]]:
        t0 = time.perf_counter()
        scores = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, label=f"swift {label}")
        self.stats.swift_seconds += time.perf_counter() - t0
        owners = self._owners if self._owners is not None and len(self._owners) == len(requests) else None
        contexts = [tuple(self._fit(ctx, cont)[0]) for _, ctx, cont in requests]
        # one decision per document (all its choices share the context); rolling windows: per window
        docs: dict[Any, list[int]] = {}
        for i in range(len(contexts)):
            key = owners[i] if owners is not None and owners[i][1] is not None else ("window", i)
            docs.setdefault(key, []).append(i)
        deferred: list[int] = []
        for key, members in docs.items():
            value = max(self.context_energy[contexts[i]] for i in members)
            task = self.stats.task(key[0] if key[0] != "window" else None)
            task.examples += 1
            if key[0] != "window":
                self.stats.doc_energy[key] = value
            if self.super_lm is not None and self.router.decide_energy(value).deferred:
                task.super_calls += 1
                deferred += members
        if deferred:
            t0 = time.perf_counter()
            rescored = self.super_lm._loglikelihood_tokens(  # type: ignore[union-attr]
                [requests[i] for i in sorted(deferred)], disable_tqdm=disable_tqdm, label=f"super {label}")
            self.stats.super_seconds += time.perf_counter() - t0
            for i, score in zip(sorted(deferred), rescored, strict=True):
                scores[i] = score
        return scores

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Per request after prefill: the swift energy of the prompt's last logits picks the model."""
        prompts = [self.tok_encode(r.args[0], left_truncate_len=self.max_length - 1) for r in requests]
        runner = ModelRunner(self.model, max_batch_size=1, max_model_len=max(map(len, prompts)))
        to_super: list[int] = []
        for i, (request, ids) in enumerate(zip(requests, prompts, strict=True)):
            runner.free(0)
            value = float(self.router.energy(runner.prefill(0, ids)))
            task = self.stats.task(request.task_name)
            task.examples += 1
            if self.super_lm is not None and self.router.decide_energy(value).deferred:
                task.super_calls += 1
                to_super.append(i)
        keep = [i for i in range(len(requests)) if i not in set(to_super)]
        texts = [""] * len(requests)
        for lm, ids in ((self, keep), (self.super_lm, to_super)):
            if ids:
                t0 = time.perf_counter()
                generate = super().generate_until if lm is self else lm.generate_until  # type: ignore[union-attr]
                for i, text in zip(ids, generate([requests[i] for i in ids], disable_tqdm=disable_tqdm), strict=True):
                    texts[i] = text
                seconds = time.perf_counter() - t0
                if lm is self:
                    self.stats.swift_seconds += seconds
                else:
                    self.stats.super_seconds += seconds
        return texts


def weight_traffic_saved(swift_bytes: int | None, super_bytes: int | None, super_fraction: float) -> float | None:
    """1 - (swift + fraction * super) / super, with cost = weight bytes read per token.

    Why weight bytes: decoding is memory-bound, so a forward costs about the bytes of weights it
    reads; the swift model always runs, the super model only for the deferred fraction.
    """
    if not swift_bytes or not super_bytes:
        return None
    return 1.0 - (swift_bytes + super_fraction * super_bytes) / super_bytes


def routed_task_results(stats: RoutingStats, metrics: dict[str, dict[str, float | int]],
                        swift_bytes: int | None, super_bytes: int | None) -> dict[str, dict[str, float | int]]:
    """The harness metrics of each task plus ``super_fraction``, ``super_calls`` and the saved cost."""
    out: dict[str, dict[str, float | int]] = {}
    for name, values in metrics.items():
        task = stats.tasks.get(name, TaskRouting())
        saved = weight_traffic_saved(swift_bytes, super_bytes, task.super_fraction)
        out[name] = {**values, "super_fraction": task.super_fraction, "super_calls": task.super_calls,
                     "routed_examples": task.examples}
        if saved is not None:
            out[name]["weight_traffic_saved"] = saved
    return out


def evaluate_routed(swift: str, super_: str, config: RouterConfig, settings: Any) -> Any:
    """``llmcomp eval --swift A --super B --router R``: one :class:`ModelResult` named ``routed(A|B)``
    whose task results carry ``acc`` (as for one model) and ``super_fraction``."""
    import gc

    from llmcomp.errors import LlmcompError
    from llmcomp.eval.harness import run_harness
    from llmcomp.eval.model_size import measure_model_size
    from llmcomp.eval.runner import ModelResult, validate_settings
    from llmcomp.loading import load_model, resolve_source

    validate_settings(settings)
    if settings.perplexity_tasks or settings.engine != "native":
        raise LlmcompError("routed evaluation (--router) runs lm-eval tasks on the native engine only "
                           f"(got tasks {', '.join(t.name for t in settings.tasks)}, engine {settings.engine})")
    sources = resolve_source(swift), resolve_source(super_)
    sizes = [measure_model_size(s.location) for s in sources]
    result = ModelResult(f"routed({swift}|{super_})", f"{sources[0].location} | {sources[1].location}", sizes[0])
    start = time.perf_counter()
    swift_model, tokenizer = load_model(sources[0], dtype=settings.dtype, device=settings.device)
    super_model, _ = load_model(sources[1], dtype=settings.dtype, device=settings.device)
    super_lm = RuntimeLM(super_model, tokenizer, slots=settings.slots, progress=settings.progress)
    lm = RoutedLM(swift_model, tokenizer, config, super_lm, slots=settings.slots, progress=settings.progress)
    metrics = run_harness(lm, settings.harness_tasks, settings.data_dir, settings.num_fewshot, settings.limit)
    result.results = routed_task_results(lm.stats, metrics, sizes[0].disk_bytes, sizes[1].disk_bytes)
    for values in result.results.values():
        # seconds of the whole run (lm-eval scores all tasks' requests together), not per task
        values.update(run_swift_seconds=round(lm.stats.swift_seconds, 3),
                      run_super_seconds=round(lm.stats.super_seconds, 3), tau=config.tau)
    del lm, super_lm, swift_model, super_model
    gc.collect()
    result.seconds = time.perf_counter() - start
    return result


def evaluate_routed_cli(swift: str | None, super_: str | None, router: Any, settings: Any) -> Any:
    """``llmcomp eval --router R [--swift A] [--super B]``: the models default to those router.json names."""
    from llmcomp.errors import LlmcompError
    from llmcomp.routing import load_router

    if router is None:
        raise LlmcompError("routed evaluation needs --router router.json (llmcomp route calibrate writes one)")
    config = load_router(router)
    swift, super_ = swift or config.swift, super_ or config.super
    if swift is None or super_ is None:
        raise LlmcompError("routed evaluation needs --swift and --super (or router.json naming them)")
    return evaluate_routed(swift, super_, config, settings)
