"""The super model behind any OpenAI-compatible endpoint (``llmcomp serve --super-url URL``).

Routed serving defers a request after the swift prefill; with a remote super model the deferred
request is sent to ``URL/v1/completions`` with the original prompt as token ids (both servers must
use the same tokenizer; the swift prefill is discarded) and ``stream: true``, and each streamed
chunk is relayed as one engine event. A token-mode takeover (:meth:`RemoteEngine.submit_takeover`)
sends the prompt *plus the swift tokens so far* as token ids, so the upstream continues from
exactly that token sequence (nothing is re-tokenized). It works with ``llmcomp serve`` (native or
``--engine vllm``) and stock vLLM. It has the part of the :class:`~llmcomp.serve.engine.Engine`
interface that :class:`~llmcomp.serve.routed_engine.RoutedEngine` uses (``submit``,
``submit_takeover``, handles with ``cancel``, ``num_waiting``/``num_active``, ``context_length``,
``close``); one thread per request in flight, at most ``max_batch_size + max_queue`` of them (then
:class:`QueueFullError`, as for a local engine).

Token ids: the request asks for vLLM's ``return_token_ids`` (and, with logprobs,
``return_tokens_as_token_ids``), which the native server implements too. When the chunks carry
token ids, the events do, logprobs are relayed exactly (ids parsed from ``token_id:N``), and a
takeover feeds the ids into the swift sequence's detokenizer, so text and stop strings continue
across the switch exactly as with a local super model. An upstream that returns only text is
relayed as text (one completion token per chunk until its usage fixes the count); logprobs from
it, if it names tokens only by their text, fail the request rather than guess ids. The upstream's
API key, if it has one, comes from ``$LLMCOMP_SUPER_API_KEY``.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from typing import Any
from urllib.parse import urlsplit

from llmcomp.errors import LlmcompError
from llmcomp.runtime.sampling import SamplingParams, TokenLogprob
from llmcomp.serve.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    EngineClosedError,
    QueueFullError,
    RequestOutput,
    Sink,
)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # one chunk; a long prompt's prefill on a busy upstream can take a while
SSE_DATA = "data: "
API_KEY_ENV = "LLMCOMP_SUPER_API_KEY"  # the upstream's API key, when it has one
TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a logprob token


def _token_id(name: str) -> int:
    """The id in a ``token_id:N`` logprob token (ValueError for a token given as text)."""
    if not name.startswith(TOKEN_ID_PREFIX):
        raise ValueError(f"the upstream named a logprob token {name!r} by its text, not its id "
                         "(it does not support return_tokens_as_token_ids)")
    return int(name[len(TOKEN_ID_PREFIX):])


def parse_logprobs(obj: dict[str, Any] | None) -> list[TokenLogprob]:
    """A completions ``logprobs`` object with ``token_id:N`` tokens as :class:`TokenLogprob` s."""
    if not obj:
        return []
    tops = obj.get("top_logprobs") or [None] * len(obj["tokens"])
    return [TokenLogprob(_token_id(name), float(value), [(_token_id(t), float(v)) for t, v in (top or {}).items()])
            for name, value, top in zip(obj["tokens"], obj["token_logprobs"], tops, strict=True)]


class RemoteHandle:
    """``cancel()`` closes the upstream stream; the request ends with ``finish_reason: cancelled``."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.cancelled = threading.Event()
        self.connection: http.client.HTTPConnection | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        conn = self.connection
        if conn is not None:
            try:
                conn.sock and conn.sock.shutdown(2)  # wakes a thread blocked reading the stream
            except OSError:
                pass


class RemoteEngine:
    """Completions relayed from an OpenAI-compatible server."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LlmcompError(f"--super-url {url!r} is not an http(s) URL")
        self.url = url
        self._parts = parts
        self._base = parts.path.rstrip("/").removesuffix("/v1")
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        api_key = api_key or os.environ.get(API_KEY_ENV)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        card = self._model_card()
        self.model = model or card["id"]
        self.context_length = int(card.get("max_model_len") or 1 << 30)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._next_id = 0
        self._closed = False

    # -- upstream -------------------------------------------------------------------------------
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname, self._parts.port, timeout=timeout)

    def _model_card(self) -> dict[str, Any]:
        """The upstream's first model (``GET /v1/models``): its name and context length."""
        conn = self._connection(CONNECT_TIMEOUT_S)
        try:
            conn.request("GET", f"{self._base}/v1/models", headers=self._headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise LlmcompError(f"{self.url}/v1/models answered {response.status}: {body[:200]!r}")
            cards = json.loads(body)["data"]
        except (OSError, ValueError, KeyError) as exc:
            raise LlmcompError(f"cannot reach the super model at {self.url}: {exc}") from None
        finally:
            conn.close()
        if not cards:
            raise LlmcompError(f"{self.url} serves no model")
        return cards[0]

    def _body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt_ids, "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "stream": True,
                                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
            body["return_tokens_as_token_ids"] = True
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.top_k:
            body["top_k"] = params.top_k  # a vLLM extension
        return body

    def _relay(self, handle: RemoteHandle, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               detok: Any = None) -> None:
        """Stream one completion from upstream into ``sink`` (on its own thread). With ``detok`` (a
        takeover), the upstream's token ids go through it: text and stop strings as in the swift part."""
        prompt, generated, reason = len(prompt_ids), 0, None

        def end(reason: str, text: str = "", ids: list[int] | None = None, lps: list[TokenLogprob] | None = None,
                error: str | None = None, retryable: bool = False) -> None:
            sink(RequestOutput(text, ids or [], lps or [], True, reason, prompt, generated, error, retryable=retryable))

        try:
            conn = handle.connection = self._connection(READ_TIMEOUT_S)
            if handle.cancelled.is_set():
                return end("cancelled")
            conn.request("POST", f"{self._base}/v1/completions", json.dumps(self._body(prompt_ids, params)),
                         self._headers)
            response = conn.getresponse()
            if response.status != 200:
                detail = response.read()[:300].decode(errors="replace")
                return end("error", error=f"the super model endpoint answered {response.status}: {detail}",
                           retryable=response.status in (429, 503))
            for raw in response:
                if handle.cancelled.is_set():
                    return end("cancelled")
                line = raw.decode().strip()
                if not line.startswith(SSE_DATA) or line == f"{SSE_DATA}[DONE]":
                    continue
                chunk = json.loads(line[len(SSE_DATA):])
                if "error" in chunk:
                    return end("error", error=f"the super model failed: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    generated = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices", []):
                    reason = choice.get("finish_reason") or reason
                    ids, text = choice.get("token_ids"), choice.get("text", "")
                    lps = parse_logprobs(choice.get("logprobs")) if params.logprobs is not None else []
                    if ids is not None and params.logprobs is not None and len(lps) != len(ids):
                        raise ValueError(f"the upstream sent {len(ids)} token ids but {len(lps)} logprobs")
                    if ids is None:  # text only: one token per chunk until the usage says otherwise
                        if detok is not None:  # the swift text held back (stop-string prefix) goes first
                            text, detok = detok.flush() + text, None
                        if text or choice.get("finish_reason") is None:
                            generated += 1
                            sink(RequestOutput(text, [], lps, False, None, prompt, generated))
                        continue
                    generated += len(ids)
                    if detok is not None:
                        text = "".join(detok.add(t) for t in ids)
                        if detok.stopped:  # a stop string across the switch: end here, as locally
                            return end("stop", text, ids, lps)
                    if ids:
                        sink(RequestOutput(text, ids, lps, False, None, prompt, generated))
            if handle.cancelled.is_set():
                return end("cancelled")
            if reason is None:
                return end("error", error="the super model endpoint closed the stream early", retryable=True)
            return end(reason, detok.flush() if detok is not None else "")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if handle.cancelled.is_set():
                return end("cancelled")
            # connection trouble may pass (503, retry); a malformed answer will not (500)
            return end("error", error=f"the super model endpoint failed: {type(exc).__name__}: {exc}",
                       retryable=not isinstance(exc, ValueError))
        finally:
            if handle.connection is not None:
                handle.connection.close()
            with self._lock:
                self._in_flight -= 1

    # -- the Engine interface ---------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return max(0, self._in_flight - self.max_batch_size)

    @property
    def num_active(self) -> int:
        return min(self._in_flight, self.max_batch_size)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, detok: Any = None,
               bounded: bool = True) -> RemoteHandle:
        with self._lock:
            if self._closed:
                raise EngineClosedError("engine is shut down")
            if bounded and self._in_flight >= self.max_batch_size + self.max_queue:
                raise QueueFullError(self.num_waiting, self.max_queue)
            self._in_flight += 1
            handle = RemoteHandle(self._next_id)
            self._next_id += 1
        threading.Thread(target=self._relay, args=(handle, list(prompt_ids), params, sink, detok),
                         name="llmcomp-super-relay", daemon=True).start()
        return handle

    def submit_takeover(self, ids: list[int], params: SamplingParams, sink: Sink, detok: Any,
                        generator: Any = None) -> RemoteHandle:
        """Continue a swift sequence upstream: ``ids`` = prompt + swift tokens, sent as token ids;
        ``detok`` (the swift sequence's) turns the upstream's token ids into text. The swift random
        generator cannot travel: a sampled continuation uses the upstream's own (``params.seed``).
        Admitted past the bound, as a local takeover: its client is already being answered."""
        return self.submit(ids, params, sink, detok, bounded=False)

    def close(self) -> None:
        with self._lock:
            self._closed = True
