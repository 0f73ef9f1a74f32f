"""The one end-of-sequence rule, shared by the server's engine and :func:`llmcomp.generation.generate`."""

from __future__ import annotations

from typing import Any

from llmcomp.runtime.sampling import SamplingParams


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the union of the generation config's, the model config's and the
    tokenizer's (instruct models often list several, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if isinstance(v, int))
    return ids


def is_end_of_sequence(token: int, eos_ids: set[int], params: SamplingParams) -> bool:
    """True when ``token`` ends the sequence: an EOS id, unless the request ignores EOS."""
    return token in eos_ids and not params.ignore_eos


def length_limit_reached(generated: int, total: int, params: SamplingParams, max_len: int) -> bool:
    """True when no further token may be generated: ``max_tokens`` reached or the context is full."""
    return generated >= params.max_tokens or total >= max_len
