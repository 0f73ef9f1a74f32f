"""The HF module graph as a fallback forward, for architectures the lean forward does not cover.

Same call as :class:`~llmcomp.runtime.llama.LlamaForward`, so the runner, sampler and stop rules
are shared; each slot keeps its own ``DynamicCache`` and rows run one at a time. Correct for any
causal LM transformers can run, but with no batching and no compiled step: the speed of the old
eager loop. Only a row's real columns reach the model: pad columns sit at the spare position past
the maximum length, which an absolute position embedding (GPT-2's ``n_positions``) may not have.
"""

from __future__ import annotations

from typing import Any

import torch


class HFForward:
    """Per-slot ``DynamicCache`` rows through ``model(...)``; pad rows (beyond a slot's fill) get zeros."""

    def __init__(self, model: Any, num_slots: int, pad_position: int) -> None:
        from transformers import DynamicCache

        self.model = model
        self.pad_position = pad_position
        self._new_cache = lambda: DynamicCache(config=model.config)
        self.caches = [self._new_cache() for _ in range(num_slots)]
        self.vocab_size = int(model.config.vocab_size)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], self._new_cache()

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor, slot0: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = tokens.shape[0]
        width = 1 if logits_at is None else logits_at.shape[0]
        dtype = next(self.model.parameters()).dtype
        out = torch.zeros(batch, width, self.vocab_size, dtype=dtype, device=tokens.device)
        for b in range(batch):
            cache = self.caches[slot0 + b]
            start, filled = int(positions[b, 0]), cache.get_seq_length()
            if start > filled:
                continue  # a pad row: nothing of this slot is at that position
            if start < filled:
                cache.crop(start - filled)  # rewound: drop the last filled - start positions
            real = int((positions[b] != self.pad_position).sum())  # pad columns only trail the real ones
            if real == 0:
                continue
            logits = self.model(input_ids=tokens[b:b + 1, :real], position_ids=positions[b:b + 1, :real],
                                past_key_values=cache, use_cache=True).logits[0]
            if logits_at is None:
                out[b] = logits[-1:]
            else:
                wanted = logits_at[logits_at < real]
                out[b, : wanted.shape[0]] = logits[wanted]
        return out[:, 0] if logits_at is None else out
