"""``ModelRunner``: the one place a model turns token ids into next-token logits.

The server's engine, ``llmcomp bench`` / :func:`llmcomp.generation.generate` and evaluation all
run through it: chunked prefill into a slot, a batched decode step over the live slots, rewind
(for scoring several continuations of one context), and slot moves that keep the live slots a
prefix. The decode step has fixed shapes per batch-size bucket (powers of two up to the maximum
batch), so ``torch.compile`` builds one graph per bucket; the attended length is marked dynamic,
so a growing sequence does not recompile. Architectures the lean Llama forward does not cover run
through the HF module graph with the same interface.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from llmcomp.runtime.hf_fallback import HFForward
from llmcomp.runtime.kv_cache import SlotKVCache
from llmcomp.runtime.llama import LlamaForward, unsupported_reason

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill call: bounds how long running streams wait
DEFAULT_COMPILE_BACKEND = "inductor"
FALLBACK_CONTEXT_LENGTH = 2048  # when the config names no maximum position
log = logging.getLogger(__name__)
_compiled_graphs = 0  # decode-step graphs (buckets) of every compiled runner made in this process


def _reserve_compiled_graphs(count: int) -> None:
    """Let dynamo keep ``count`` more graphs of the decode step.

    Why: every runner compiles the same function (``_decode_eager``), and dynamo caches graphs per
    function, at most ``recompile_limit`` (8) of them. One graph per batch bucket and per runner
    exceeds that as soon as a process holds two runners (routing's swift and super, benchmarks
    comparing checkpoints), and dynamo then silently runs the rest eagerly.
    """
    global _compiled_graphs
    _compiled_graphs += count
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _compiled_graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, _compiled_graphs)


def context_length(model: Any) -> int:
    """The model's maximum sequence length from its config (a fallback when it names none)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT_LENGTH


def batch_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get their own graph: 1, 2, 4, ... and the maximum itself."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]


def model_dtype(model: Any) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class ModelRunner:
    """Slots, prefill and decode for one loaded causal LM (not thread-safe: one owner thread)."""

    def __init__(
        self,
        model: Any,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        compile: bool = False,
        compile_backend: str = DEFAULT_COMPILE_BACKEND,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        lean: bool = True,
        buckets: list[int] | None = None,
        spare_slots: int = 0,
    ) -> None:
        """``spare_slots`` are KV slots past the batch (``max_batch_size..``): never decoded, only
        moved into and out of, e.g. to park a sequence's cache while another engine extends it."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if spare_slots < 0:
            raise ValueError(f"spare_slots must be at least 0, got {spare_slots}")
        limit = context_length(model)
        self.max_len = min(max_model_len or limit, limit)
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model_dtype(model)
        self.max_batch_size = max_batch_size
        self.buckets = sorted(set(buckets or batch_buckets(max_batch_size)))
        if self.buckets[-1] != max_batch_size or self.buckets[0] < 1:
            raise ValueError(f"batch buckets {self.buckets} must lie in 1..{max_batch_size} and end at it")
        self._warm: set[int] = set()
        self._prepared = False  # whether one eager step has run (kernel state built) before compiling
        self.prefill_chunk = prefill_chunk
        self.num_slots = max_batch_size + spare_slots
        self.lengths = [0] * self.num_slots  # filled positions per slot
        self.vocab_size = int(model.config.vocab_size)
        reason = unsupported_reason(model, self.max_len) if lean else "lean forward disabled"
        self.cache: SlotKVCache | None = None
        if reason is None:
            config = model.config
            heads = config.num_attention_heads
            # One spare position past max_len: pad rows write there, and the attended prefix
            # [:L] (L <= max_len) is never the whole dimension, so one dynamic-length graph covers all L.
            self.cache = SlotKVCache(
                config.num_hidden_layers, self.num_slots, getattr(config, "num_key_value_heads", None) or heads,
                getattr(config, "head_dim", None) or config.hidden_size // heads, self.max_len + 1, self.dtype,
                self.device,
            )
            self.forward: LlamaForward | HFForward = LlamaForward(model, self.cache)
            self.backend = "lean"
        else:
            log.info("runtime: HF fallback forward (%s)", reason)
            self.forward = HFForward(model, self.num_slots, self.pad_position)
            self.backend = f"hf ({reason})"
        self.compiled = compile and self.backend == "lean"
        self._decode_fn: Callable[..., torch.Tensor] = self._decode_eager
        if self.compiled:
            _reserve_compiled_graphs(len(self.buckets))
            self._decode_fn = torch.compile(self._decode_eager, backend=compile_backend, dynamic=False)
        self.compile_seconds = 0.0

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    @property
    def pad_position(self) -> int:
        """Where pad rows write: the spare cache position past ``max_len`` (the HF fallback skips them)."""
        return self.max_len

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # -- slots -----------------------------------------------------------------------------------
    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s sequence into slot ``dst`` (to keep the live slots a prefix)."""
        if src == dst:
            return
        n = self.lengths[src]
        if self.cache is not None:
            self.cache.move(src, dst, n)
        else:
            self.forward.move(src, dst, n)  # type: ignore[union-attr]
        self.lengths[dst], self.lengths[src] = n, 0

    def rewind(self, slot: int, length: int) -> None:
        """Forget slot positions from ``length`` on (the next tokens overwrite them)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot rewind slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    # -- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], logits_for_all: bool = False) -> torch.Tensor:
        """Append ``token_ids`` to ``slot`` (in chunks); logits after the last token ``[V]``, or
        ``[len(token_ids), V]`` for every appended token with ``logits_for_all`` (scoring)."""
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        start = self.lengths[slot]
        if start + len(token_ids) > self.max_len:
            raise ValueError(f"{start + len(token_ids)} tokens exceed the maximum model length {self.max_len}")
        outputs = []
        for lo in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[lo:lo + self.prefill_chunk]
            outputs.append(self.prefill_chunk_at(slot, chunk, logits_for_all))
        return torch.cat(outputs) if logits_for_all else outputs[-1]

    @torch.inference_mode()
    def prefill_chunk_at(self, slot: int, chunk: list[int], logits_for_all: bool = False) -> torch.Tensor:
        """One chunk of a prefill (the engine interleaves these with decode steps)."""
        start = self.lengths[slot]
        end = start + len(chunk)
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        at = torch.arange(len(chunk), device=self.device) if logits_for_all else None
        logits = self.forward(tokens, positions, torch.arange(end, device=self.device), slot, at)
        self.lengths[slot] = end
        return logits[0]

    @torch.inference_mode()
    def score_batch(self, slots: list[int], rows: list[list[int]]) -> list[torch.Tensor]:
        """Append ``rows[i]`` to ``slots[i]`` in one padded forward; per-token logits per row.

        The slots must be consecutive (``slots[i] == slots[0] + i``); rows may differ in length.
        Used for scoring continuations after their shared contexts were prefilled once.
        """
        if any(s != slots[0] + i for i, s in enumerate(slots)):
            raise ValueError("score_batch needs consecutive slots")
        width = max(len(r) for r in rows)
        starts = [self.lengths[s] for s in slots]
        end = max(st + len(r) for st, r in zip(starts, rows, strict=True))
        if end > self.max_len:
            raise ValueError(f"{end} tokens exceed the maximum model length {self.max_len}")
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.full((len(rows), width), self.pad_position, dtype=torch.long)
        for i, (st, r) in enumerate(zip(starts, rows, strict=True)):
            tokens[i, :len(r)] = torch.tensor(r)
            positions[i, :len(r)] = torch.arange(st, st + len(r))
        logits = self.forward(tokens.to(self.device), positions.to(self.device),
                              torch.arange(end, device=self.device), slots[0],
                              torch.arange(width, device=self.device))
        for st, r, s in zip(starts, rows, slots, strict=True):
            self.lengths[s] = st + len(r)
        return [logits[i, :len(r)] for i, r in enumerate(rows)]

    def _decode_eager(self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor):
        return self.forward(tokens, positions, key_positions, 0)

    @torch.inference_mode()
    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        """One step for the sequences in slots ``0..n-1``: logits ``[n, V]`` after ``last_tokens``.

        Pad rows up to the bucket size write at the spare position past ``max_len``, which no
        sequence ever reads.
        """
        n = len(last_tokens)
        if not 0 < n <= self.max_batch_size:
            raise ValueError(f"decode needs 1..{self.max_batch_size} sequences, got {n}")
        if any(self.lengths[i] >= self.max_len for i in range(n)):
            raise ValueError(f"a sequence reached the maximum model length {self.max_len}")
        b = self.bucket(n)
        pad = b - n
        tokens = torch.tensor(last_tokens + [0] * pad, dtype=torch.long, device=self.device)[:, None]
        positions = torch.tensor(self.lengths[:n] + [self.pad_position] * pad, device=self.device)[:, None]
        logits = self._run_step(tokens, positions, max(self.lengths[:n]) + 1)
        for i in range(n):
            self.lengths[i] += 1
        return logits[:n]

    def _run_step(self, tokens: torch.Tensor, positions: torch.Tensor, attended: int) -> torch.Tensor:
        """The (compiled) decode step over slots ``0..len(tokens)-1`` attending ``attended`` keys."""
        key_positions = torch.arange(attended, device=self.device)
        if self.compiled:
            torch._dynamo.mark_dynamic(key_positions, 0, min=2, max=self.max_len)
        if self.compiled and not self._prepared:
            # Kernels pick and repack their weights on the first call (imports, caches): do that
            # eagerly, or dynamo breaks the graph there and recompiles per weight shape.
            self._decode_eager(tokens, positions, key_positions)
            self._prepared = True
        logits = self._decode_fn(tokens, positions, key_positions)
        self._warm.add(tokens.shape[0])
        return logits

    def disable_compile(self) -> None:
        """Decode eagerly from now on (e.g. when compiling failed: no C++ toolchain)."""
        self.compiled = False
        self._decode_fn = self._decode_eager

    @torch.inference_mode()
    def decode_with_prefill(
        self, last_tokens: list[int], parts: list[tuple[int, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step for slots ``0..n-1`` (``n`` may be 0) and prefill chunks ``[(slot, tokens)]``
        of other slots, in one forward.

        Returns the decode logits ``[n, V]`` and the logits after each chunk's last token
        ``[len(parts), V]``. Eager (chunk lengths vary); the HF fallback runs the parts one by one.
        """
        n = len(last_tokens)
        if n > self.max_batch_size or not parts:
            raise ValueError(f"decode_with_prefill needs at most {self.max_batch_size} sequences and a chunk")
        for slot, chunk in parts:
            if not n <= slot < self.max_batch_size or not chunk:
                raise ValueError(f"a prefill chunk needs a free slot in {n}..{self.max_batch_size - 1} and tokens")
            if self.lengths[slot] + len(chunk) > self.max_len:
                raise ValueError(f"{self.lengths[slot] + len(chunk)} tokens exceed the maximum model length "
                                 f"{self.max_len}")
        if any(self.lengths[i] >= self.max_len for i in range(n)):
            raise ValueError(f"a sequence reached the maximum model length {self.max_len}")
        if not isinstance(self.forward, LlamaForward):
            dec = self.decode(last_tokens) if n else torch.empty(0, self.vocab_size)
            return dec, torch.stack([self.prefill_chunk_at(slot, chunk) for slot, chunk in parts])
        logits = self.forward.mixed(
            torch.tensor(last_tokens, dtype=torch.long, device=self.device),
            torch.tensor(self.lengths[:n], dtype=torch.long, device=self.device),
            [(slot, self.lengths[slot], torch.tensor(chunk, dtype=torch.long, device=self.device))
             for slot, chunk in parts])
        for i in range(n):
            self.lengths[i] += 1
        for slot, chunk in parts:
            self.lengths[slot] += len(chunk)
        return logits[:n], logits[n:]

    def is_warm(self, batch: int) -> bool:
        """Whether the decode step of ``batch``'s bucket has run (compiled) already."""
        return self.bucket(batch) in self._warm

    @torch.inference_mode()
    def warm_up(self, buckets: list[int] | None = None, progress: Callable[[str], None] | None = None) -> float:
        """Compile (or just run) the decode step of each bucket once; returns the seconds taken.

        Every row is a pad row (it writes only at the spare position past ``max_len``), so live
        sequences are untouched and it can run at any time.
        """
        t0 = time.perf_counter()
        for b in buckets or self.buckets:
            if progress is not None:
                progress(f"decode step, batch {b}")
            tokens = torch.zeros(b, 1, dtype=torch.long, device=self.device)
            self._run_step(tokens, torch.full((b, 1), self.pad_position, device=self.device), 2)
        seconds = time.perf_counter() - t0
        self.compile_seconds += seconds
        return seconds
