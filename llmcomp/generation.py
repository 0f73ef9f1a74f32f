"""Batch generation for benchmarks and scripts, on the runtime shared with the server.

Why not ``model.generate``: its per-step Python work (logits processors, stopping criteria, cache
bookkeeping) costs as much as a small model's matmuls at batch 1, which hides the speedup of
quantized kernels. :func:`generate` is a short loop over :class:`~llmcomp.runtime.ModelRunner`
(slot KV cache, lean forward, fixed-shape decode step that compiles) with the server's sampler
and end-of-sequence rule, so what ``llmcomp bench`` measures is what ``llmcomp serve`` runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from llmcomp.runtime.runner import DEFAULT_COMPILE_BACKEND, ModelRunner
from llmcomp.runtime.sampling import SamplingParams, make_generator, sample_rows
from llmcomp.runtime.stopping import eos_token_ids, is_end_of_sequence

__all__ = ["GenerationResult", "eos_token_ids", "generate"]


@dataclass
class GenerationResult:
    """Texts and token ids of the completions (prompt excluded), with timings."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    batch_size: int
    compiled: bool = False
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by the decode steps (all sequences) per second of decoding."""
        return self.decode_steps * self.batch_size / self.decode_seconds if self.decode_seconds > 0 else 0.0


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    compile: bool = False,
    stop_at_eos: bool = True,
    compile_backend: str = DEFAULT_COMPILE_BACKEND,
    runner: ModelRunner | None = None,
) -> GenerationResult:
    """Generate continuations of ``prompts`` (one batch) through the runtime's :class:`ModelRunner`.

    Each prompt is prefilled into its own slot (no padding is ever attended), then every step
    decodes the whole batch at once. Greedy at ``temperature == 0``; otherwise temperature /
    top-k / top-p sampling, reproducible with ``seed`` (row ``i`` uses ``seed + i``).
    ``compile=True`` compiles the decode step; its compile time is reported separately and kept
    out of ``decode_seconds``. With ``stop_at_eos=False`` every sequence gets exactly
    ``max_new_tokens`` tokens (benchmarks). Pass a ``runner`` to reuse its cache and compiled graphs.
    """
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    batch = len(prompts)
    if runner is None:
        runner = ModelRunner(model, max_batch_size=batch, max_model_len=max(map(len, encoded)) + max_new_tokens,
                             compile=compile, compile_backend=compile_backend, buckets=[batch])
    elif batch > runner.max_batch_size:
        raise ValueError(f"{batch} prompts exceed the runner's {runner.max_batch_size} slots")
    params = [SamplingParams(max_new_tokens, temperature, top_p, top_k=top_k, ignore_eos=not stop_at_eos,
                             seed=None if seed is None else seed + i) for i in range(batch)]
    generators = [make_generator(p.seed) for p in params]
    eos = eos_token_ids(model, tokenizer)

    t0 = time.perf_counter()
    for slot in range(batch):
        runner.free(slot)
    last = torch.stack([runner.prefill(slot, ids) for slot, ids in enumerate(encoded)])
    tokens = sample_rows(last, params, generators)
    prefill_s = time.perf_counter() - t0
    compile_s = 0.0
    if runner.compiled and not runner.is_warm(batch):
        compile_s = runner.warm_up(buckets=[runner.bucket(batch)])

    generated = [[t] for t in tokens]
    done = [is_end_of_sequence(t, eos, p) for t, p in zip(tokens, params, strict=True)]
    steps = 0
    t1 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        logits = runner.decode([g[-1] for g in generated])
        tokens = sample_rows(logits, params, generators)
        steps += 1
        for i, t in enumerate(tokens):
            if not done[i]:
                generated[i].append(t)
                done[i] = is_end_of_sequence(t, eos, params[i])
    decode_s = time.perf_counter() - t1
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return GenerationResult(
        texts=texts,
        token_ids=generated,
        prompt_tokens=sum(map(len, encoded)),
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        decode_steps=steps,
        batch_size=batch,
        compiled=runner.compiled,
        compile_seconds=compile_s,
        extra={"dtype": str(runner.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "runtime": runner.backend},
    )
