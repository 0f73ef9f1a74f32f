"""Slot KV cache: one pre-allocated row per sequence slot, up to the model length.

Why slots: the server's old cache was re-padded by concatenation whenever a sequence joined or
left, so no two decode steps had the same shapes and the step could never be compiled. Here the
memory is allocated once (``slots x max_len`` per layer, reported at start-up) and a sequence
owns one slot from its first prompt token to its last generated token. The runner keeps the live
slots a prefix (``0..n-1``): a decode step of ``n`` sequences reads the contiguous view
``[:bucket]``, and when a sequence leaves, the last live slot moves into its place (one copy of
one sequence's keys and values, never a re-pad of the batch).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys and values ``[slots, kv_heads, max_len, head_dim]`` per layer (lengths live in the runner)."""

    def __init__(
        self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])
