"""A lean forward for the Llama family (Llama, Mistral, Qwen2, SmolLM) over the slot KV cache.

Why not the HF module graph: at batch 1 a 135M model's matmuls take a few milliseconds, and the
HF forward spends as long again on mask building, cache bookkeeping and generic dispatch. This
forward is the arithmetic only (gpt-fast style): embed, then per layer RMSNorm, q/k/v, RoPE from
a precomputed table, a write into the slot cache, SDPA over the filled positions, o_proj, RMSNorm,
SwiGLU MLP; final norm and head on the positions asked for. It calls the model's own projection
modules, so ``QuantLinear`` (and any later module kind) runs unchanged (quantized q/k/v and
gate/up siblings with one layout run as one fused call, :mod:`llmcomp.runtime.fuse`), and it reads
RoPE from the model's rotary embedding, so scaled RoPE variants match HF exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmcomp.runtime.fuse import fuse_siblings
from llmcomp.runtime.kv_cache import SlotKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone
LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def unsupported_reason(model: Any, max_len: int) -> str | None:
    """Why the lean forward cannot run ``model`` (None when it can): the caller falls back to HF."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "not a <Model>ForCausalLM with model.layers and lm_head"
    for part in LAYER_PARTS:
        if not all(_has_path(layer, part) for layer in inner.layers):
            return f"a decoder layer has no {part}"
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type not in POSITION_ONLY_ROPE:
        return f"RoPE type {rope_type!r} depends on the sequence length"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_len:
        return f"sliding-window attention ({window} < max length {max_len})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not SwiGLU's silu"
    return None


def _has_path(module: Any, path: str) -> bool:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


class LlamaForward:
    """``forward(tokens, positions, key_positions, slot0)`` over rows ``slot0..slot0+B-1`` of the cache."""

    def __init__(self, model: Any, cache: SlotKVCache) -> None:
        config = model.config
        inner = model.model
        self.model = model
        self.cache = cache
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.head = model.lm_head
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        dtype = self.embed.weight.dtype
        positions = torch.arange(cache.max_len, device=self.embed.weight.device)[None]
        cos, sin = inner.rotary_emb(torch.ones(1, dtype=dtype, device=positions.device), positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]
        self.qkv = [fuse_siblings([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in self.layers]
        self.gate_up = [fuse_siblings([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
        self.qkv_sizes = [self.num_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]

    def _rms_norm(self, x: torch.Tensor, norm: Any) -> torch.Tensor:
        # HF's order of operations (float32 statistics, cast back, then the weight) so logits match.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.weight * h.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor, slot0: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, V]`` at the last column of ``tokens [B, T]`` (or ``[B, len(logits_at)]``
        at those columns). ``positions [B, T]`` are absolute positions in each row's slot; keys at
        ``key_positions`` (``arange(L)``, L at least the largest position + 1) are attended causally.
        Rows write their keys and values before attending, so padded rows (any position) are harmless
        as long as their position is not one a live sequence has filled.
        """
        batch, steps = tokens.shape
        rows = torch.arange(slot0, slot0 + batch, device=tokens.device)[:, None].expand(batch, steps)
        length = key_positions.shape[0]
        # [B, 1, T, L]: a query sees keys at or before its own position.
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin[positions][:, None]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(i, self._rms_norm(x, layer.input_layernorm))
            q = q.reshape(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.reshape(batch, steps, self.kv_heads, self.head_dim)
            v = v.reshape(batch, steps, self.kv_heads, self.head_dim)
            q = self._rope(q, cos, sin)
            k = self._rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
            key_cache, value_cache = self.cache.keys[i], self.cache.values[i]
            key_cache[rows, :, positions] = k
            value_cache[rows, :, positions] = v
            keys = key_cache[slot0:slot0 + batch, :, :length]
            values = value_cache[slot0:slot0 + batch, :, :length]
            if steps == 1 and torch.compiler.is_compiling():
                out = self._decode_attention(q, keys, values, mask)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                     enable_gqa=self.kv_heads != self.num_heads)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim))
            x = x + self._mlp(i, self._rms_norm(x, layer.post_attention_layernorm))
        x = x[:, -1] if logits_at is None else x[:, logits_at]
        return self.head(self._rms_norm(x, self.norm))

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row (decode) inside a compiled step: ``q [B, H, 1, D]``,
        ``keys``/``values`` ``[B, KV, L, D]``, ``mask [B, 1, 1, L]``.

        Why not SDPA: for a single query its CPU kernel costs about 50 us per call whatever the
        length (1.5 ms of a 9 ms SmolLM2 int4 step), and so do bf16 ``bmm`` calls this small.
        Written as products and sums, Inductor fuses the whole of it into a few loops. Query heads
        are grouped onto their key/value head (no copy of the cache for grouped-query attention);
        the arithmetic is float32 at least, as SDPA's accumulation.
        """
        batch, heads, _, dim = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        grouped = q.reshape(batch, self.kv_heads, heads // self.kv_heads, 1, dim).to(acc)
        scores = (grouped * keys[:, :, None].to(acc)).sum(-1) * dim ** -0.5  # [B, KV, G, L]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = (probs[..., None] * values[:, :, None].to(acc)).sum(-2)  # [B, KV, G, D]
        return out.to(q.dtype).reshape(batch, heads, 1, dim)

    def _qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of layer ``i`` (one fused call when the siblings share a layout)."""
        if (qkv := self.qkv[i]) is not None:
            q, k, v = qkv(h).split(self.qkv_sizes, dim=-1)
            return q, k, v
        attn = self.layers[i].self_attn
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[i].mlp
        if (gate_up := self.gate_up[i]) is not None:
            gate, up = gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def mixed(self, dec_tokens: torch.Tensor, dec_positions: torch.Tensor,
              parts: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
        """One forward for a decode step of slots ``0..n-1`` (``n`` may be 0) *and* prefill chunks
        ``parts = [(slot, start, tokens [T])]``.

        Why: the projections and the MLP run once on all rows (a weight-only matmul costs little
        more for a few more rows), instead of separate prefill forwards that stall the running
        streams. Attention is computed per part: decode rows over their slots, each chunk causally
        over its own slot. Returns logits ``[n + len(parts), V]``: each decode row, then each
        chunk's last token.
        """
        n = dec_tokens.shape[0]
        device = dec_tokens.device
        chunk_positions = [torch.arange(start, start + t.shape[0], device=device) for _, start, t in parts]
        positions = torch.cat([dec_positions, *chunk_positions])
        rows = torch.cat([torch.arange(n, device=device),
                          *[torch.full((t.shape[0],), slot, device=device) for slot, _, t in parts]])
        ends = [start + t.shape[0] for _, start, t in parts]
        dec_len = int(dec_positions.max()) + 1 if n else 0
        dec_mask = (torch.arange(dec_len, device=device)[None, :] <= dec_positions[:, None])[:, None, None]
        masks = [(torch.arange(end, device=device)[None, :] <= cp[:, None])[None, None]
                 for cp, end in zip(chunk_positions, ends, strict=True)]
        bounds = [n]
        for _, _, t in parts:
            bounds.append(bounds[-1] + t.shape[0])
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [N, 1, D]
        gqa = self.kv_heads != self.num_heads
        x = self.embed(torch.cat([dec_tokens, *[t for _, _, t in parts]]))  # [N, H]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, self._rms_norm(x, layer.input_layernorm))
            q = self._rope(q.reshape(-1, self.num_heads, self.head_dim), cos, sin)
            k = self._rope(k.reshape(-1, self.kv_heads, self.head_dim), cos, sin)
            key_cache, value_cache = self.cache.keys[i], self.cache.values[i]
            key_cache[rows, :, positions] = k
            value_cache[rows, :, positions] = v.reshape(-1, self.kv_heads, self.head_dim)
            outs = []
            if n:
                dec = F.scaled_dot_product_attention(
                    q[:n, :, None], key_cache[:n, :, :dec_len], value_cache[:n, :, :dec_len], attn_mask=dec_mask,
                    enable_gqa=gqa)  # [n, heads, 1, D]
                outs.append(dec[:, :, 0])
            for (slot, _, _), end, mask, lo, hi in zip(parts, ends, masks, bounds[:-1], bounds[1:], strict=True):
                pre = F.scaled_dot_product_attention(
                    q[lo:hi].transpose(0, 1)[None], key_cache[slot:slot + 1, :, :end],
                    value_cache[slot:slot + 1, :, :end], attn_mask=mask, enable_gqa=gqa)  # [1, heads, T, D]
                outs.append(pre[0].transpose(0, 1))
            out = torch.cat(outs)  # [N, heads, D]
            x = x + layer.self_attn.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
            x = x + self._mlp(i, self._rms_norm(x, layer.post_attention_layernorm))
        picked = torch.cat([x[:n], x[torch.tensor(bounds[1:], device=device) - 1]])
        return self.head(self._rms_norm(picked, self.norm))
