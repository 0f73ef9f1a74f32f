"""A left-padded, batched KV cache that sequences can join and leave between decode steps.

Every sequence keeps the keys/values it computed at its own positions; joining two batches only
left-pads the shorter cache with masked slots, so RoPE positions stay correct. Leaving drops the
row and trims columns that are padding in every remaining row, which keeps memory bounded by the
longest live sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class KVBatch:
    """Per-layer ``[B, heads, T, head_dim]`` keys/values, the ``[B, T]`` mask and next positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # int64 [B, T]: 1 = real token, 0 = left padding
    positions: torch.Tensor  # int64 [B]: position id of each row's next token

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def _left_pad(t: torch.Tensor, target: int, dim: int) -> torch.Tensor:
    pad = target - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(a: KVBatch | None, b: KVBatch) -> KVBatch:
    """Stack ``b``'s rows under ``a``'s, left-padding both to the longer length."""
    if a is None:
        return b
    length = max(a.length, b.length)

    def join(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
        pairs = zip(xs, ys, strict=True)
        return [torch.cat([_left_pad(x, length, 2), _left_pad(y, length, 2)]) for x, y in pairs]

    keys, values = join(a.keys, b.keys), join(a.values, b.values)
    mask = torch.cat([_left_pad(a.mask, length, 1), _left_pad(b.mask, length, 1)])
    return KVBatch(keys, values, mask, torch.cat([a.positions, b.positions]))


def select(batch: KVBatch, rows: list[int]) -> KVBatch | None:
    """Keep only ``rows`` (in that order) and trim the columns no remaining row uses."""
    if not rows:
        return None
    idx = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, idx)
    used = mask.any(dim=0).nonzero()
    start = int(used[0].item()) if used.numel() else mask.shape[1]
    keys = [k.index_select(0, idx)[:, :, start:] for k in batch.keys]
    values = [v.index_select(0, idx)[:, :, start:] for v in batch.values]
    return KVBatch(keys, values, mask[:, start:], batch.positions.index_select(0, idx))


def cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer key/value tensors of a transformers cache (``DynamicCache`` or legacy tuples)."""
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(cache.key_cache), list(cache.value_cache)
    return [kv[0] for kv in cache], [kv[1] for kv in cache]


def new_cache() -> Any:
    """An empty full-attention ``DynamicCache`` (no config: every layer keeps all positions)."""
    from transformers import DynamicCache

    return DynamicCache()


def to_cache(batch: KVBatch) -> Any:
    """A fresh ``DynamicCache`` holding ``batch``'s tensors (the model appends one step to it)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(zip(batch.keys, batch.values, strict=True)))
