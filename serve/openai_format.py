"""Build OpenAI response and stream-chunk bodies from engine outputs (no I/O here)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmcomp.runtime.sampling import TokenLogprob


@dataclass
class ChoiceState:
    """What has been generated so far for one choice of a request."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_index: int = 0  # which prompt of the request this choice continues
    started: bool = False  # a chat stream sends the assistant role once per choice


class TokenText:
    """Token id -> display string, cached (the same tokens recur in every response)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text


def token_id_text(token_id: int) -> str:
    """vLLM's ``return_tokens_as_token_ids`` spelling of a logprob token: exact, whatever its text."""
    return f"token_id:{token_id}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(choices: list[ChoiceState]) -> dict[str, int]:
    """Prompt tokens count once per distinct prompt; ``n`` copies of a prompt count once."""
    prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(lps: list[TokenLogprob], token_text: Callable[[int], str], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = token_text(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({token_text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for lp in lps:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(item)
    return {"content": content}


def completion_response(
    rid: str, model: str, choices: list[ChoiceState], want_logprobs: bool, token_text: Callable[[int], str]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": "".join(c.text),
                "logprobs": completion_logprobs(c.logprobs, token_text) if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(choices),
    }


def chat_response(
    rid: str, model: str, choices: list[ChoiceState], want_logprobs: bool, token_text: Callable[[int], str]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": chat_logprobs(c.logprobs, token_text) if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(choices),
    }


def completion_chunk(
    rid: str, model: str, index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": [choice]}


def chat_chunk(
    rid: str, model: str, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
    finish_reason: str | None,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, obj: str, choices: list[ChoiceState]) -> dict[str, Any]:
    """The final ``stream_options.include_usage`` chunk: no choices, only usage."""
    body = {"id": rid, "object": obj, "created": now(), "model": model, "choices": []}
    return {**body, "usage": usage(choices)}
