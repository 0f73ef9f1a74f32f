"""HTTP layer of the native server: OpenAI routes, auth, errors, SSE streaming, metrics.

It only validates, tokenizes and formats; generation happens in :class:`llmcomp.serve.engine.Engine`,
whose bounded queue turns overload into 429 + ``Retry-After`` here. Every failure (FastAPI's own
validation errors, unknown routes and methods included) is answered with the OpenAI error JSON and
the server keeps serving. Requests are validated by the pydantic models of
:mod:`llmcomp.serve.protocol` in the route signatures, so ``/openapi.json`` documents exactly what is
enforced and answered (see :func:`_complete_openapi` for the parts FastAPI cannot derive).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcomp.runtime.sampling import SamplingParams
from llmcomp.serve import openai_format as fmt
from llmcomp.serve.engine import Engine, EngineClosedError, QueueFullError, RequestOutput
from llmcomp.serve.metrics import ServerMetrics
from llmcomp.serve.protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    RouterState,
    RouterUpdate,
    validation_error,
)
from llmcomp.serve.worker import RETRY_AFTER_S, EngineUnavailableError

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # cap for chat requests that give no limit (CPU serving: keep it finite)
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client left
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/router")
ROUTED_HEADER = "X-LLMComp-Routed-To"  # routed serving: swift, super or mixed (choices of one request differ)
ERROR_DESCRIPTIONS = {
    400: "Invalid request: a wrong type or value (`param` names the field), body that is not a JSON object, "
         "or prompt + max_tokens longer than the context (`code: context_length_exceeded`)",
    401: "Missing or wrong API key (only when the server was started with an API key)",
    404: "Unknown model (`code: model_not_found`)",
    413: "Request body over 8 MB (`code: body_too_large`)",
    429: "Waiting queue full (`code: server_busy`); retry after `Retry-After` seconds",
    500: "Generation failed",
    503: "The model worker is restarting (`code: worker_restarting`) or the server is shutting down; "
         "retry after `Retry-After` seconds",
}
STREAM_CHUNKS: dict[str, type[BaseModel]] = {"/v1/completions": CompletionChunk,
                                             "/v1/chat/completions": ChatCompletionChunk}
SCHEMA_REF = "#/components/schemas/{model}"
STREAM_DESCRIPTION = ("With `stream: false`: the JSON answer. With `stream: true`: server-sent events, one "
                      "`data: {chunk}` per event (an error mid-stream is sent as `data: {\"error\": ...}`), "
                      "ending with `data: [DONE]`.")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None


@dataclass
class _Job:
    """One validated request: the sequences to run and how to format the answer."""

    chat: bool
    model: str
    sequences: list[tuple[list[int], SamplingParams, int]]  # (prompt ids, params, prompt index)
    want_logprobs: bool
    include_usage: bool
    stream: bool
    token_ids: bool = False  # vLLM's return_token_ids: choices and chunks carry their token ids


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries: each error status with OpenAI's error body."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``config.model_name``."""
    # strict_content_type=False: a body without Content-Type is read as JSON (curl without -H)
    app = FastAPI(title="llmcomp native server", version="1", docs_url=None, redoc_url=None,
                  strict_content_type=False)
    metrics = ServerMetrics()
    token_text = fmt.TokenText(engine.tokenizer)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config

    app.add_middleware(_AuthAndCount, api_key=config.api_key, metrics=metrics)
    if hasattr(engine, "on_worker_exit"):  # a supervised worker process (llmcomp.serve.worker)
        engine.on_worker_exit.append(lambda cause: metrics.worker_restarts.labels(cause=cause).inc())

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404), wrong methods (405, keeps ``Allow``), unreadable or too large bodies."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "body_too_large" if exc.status_code == 413 else None
        return _error_response(APIError(exc.status_code, str(exc.detail), type_=kind, code=code,
                                        headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"
        return _error_response(APIError(500, message, type_="server_error"))

    @app.get("/health", response_model=Health,
             responses={503: {"model": Health, "description": "The model worker is (re)starting; `Retry-After`"}})
    async def health() -> JSONResponse:
        state = getattr(engine, "state", "ready")
        body = {"status": "ok" if state == "ready" else state, "model": config.model_name,
                "active": engine.num_active, "waiting": engine.num_waiting,
                "worker_restarts": getattr(engine, "restarts", 0)}
        headers = {} if state == "ready" else {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse(body, status_code=200 if state == "ready" else 503, headers=headers)

    @app.get("/metrics", response_class=PlainTextResponse, response_description="Prometheus text format")
    async def prometheus() -> Response:
        body = metrics.render(engine.num_waiting, engine.num_active)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(config.model_name, engine.context_length)]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_errors(401, 404))
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, config.model_name)
        return _model_card(config.model_name, engine.context_length)

    if getattr(engine, "router_config", None) is not None:  # routed serving only (serve/routed_engine.py)
        @app.get("/v1/router", response_model=RouterState, responses=_errors(401))
        async def router_state() -> dict[str, Any]:
            return _router_state(engine)

        @app.post("/v1/router", response_model=RouterState, responses=_errors(400, 401))
        async def router_update(body: RouterUpdate) -> dict[str, Any]:
            """Change tau and/or T at run time: the next routing decision uses them."""
            try:
                engine.update_router(tau=body.tau, temperature=body.temperature)  # type: ignore[attr-defined]
            except ValueError as exc:
                raise APIError(400, f"router update rejected: {exc}", code="invalid_value") from None
            return _router_state(engine)

    generation_errors = _errors(400, 401, 404, 413, 429, 500, 503)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=generation_errors,
              response_description=STREAM_DESCRIPTION)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        started = time.perf_counter()
        _check_model(body.model, config.model_name)
        prompts = [_tokenize_prompt(engine, p) for p in body.prompts()]
        job = _build_job(engine, body, prompts, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, body.logprobs,
                         chat=False)
        job.token_ids = body.return_token_ids
        names = fmt.token_id_text if body.return_tokens_as_token_ids else token_text
        return await _run(request, engine, metrics, names, job, "completions", started)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=generation_errors,
              response_description=STREAM_DESCRIPTION)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        started = time.perf_counter()
        _check_model(body.model, config.model_name)
        prompt = _render_chat(engine, body)
        job = _build_job(engine, body, [prompt], body.requested_max_tokens(), DEFAULT_CHAT_MAX_TOKENS,
                         body.logprobs_k(), chat=True)
        return await _run(request, engine, metrics, token_text, job, "chat", started)

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = _complete_openapi(FastAPI.openapi(app), config.model_name, engine.vocab_size,
                                                   config.api_key is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _complete_openapi(schema: dict[str, Any], model_name: str, vocab_size: int, api_key: bool) -> dict[str, Any]:
    """Add to FastAPI's schema what it cannot derive from the routes.

    * what depends on the served model: ``model`` of a request and ``/v1/models/{model_id}`` take its
      name (any other: 404), prompt token ids are below its vocabulary size (else 400);
    * the ``text/event-stream`` variant of the 200 answers, one JSON chunk per event (``itemSchema``);
    * no 422: validation errors are answered with 400, as OpenAI does;
    * the bearer scheme on ``/v1`` routes when the server has an API key.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for request in (CompletionRequest, ChatCompletionRequest):
        components[request.__name__]["properties"]["model"]["enum"] = [model_name]
    for parameter in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        parameter["schema"]["enum"] = [model_name]
    _limit_integers(components[CompletionRequest.__name__]["properties"]["prompt"], vocab_size - 1)
    _, defs = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS.values()], ref_template=SCHEMA_REF)
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if api_key and path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}]
        if path in STREAM_CHUNKS:
            content = operations["post"]["responses"]["200"]["content"]
            content["text/event-stream"] = {"itemSchema": _sse_event_schema(STREAM_CHUNKS[path].__name__)}
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return schema


def _limit_integers(node: Any, maximum: int) -> None:
    """Set ``maximum`` on every integer schema below ``node`` (the only integers in a prompt are token ids)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for value in node.values():
            _limit_integers(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _limit_integers(value, maximum)


def _sse_event_schema(chunk: str) -> dict[str, Any]:
    """One server-sent event: ``data`` is a JSON chunk, a JSON error, or the final ``[DONE]``."""
    payload = {"anyOf": [{"$ref": SCHEMA_REF.format(model=chunk)}, {"$ref": SCHEMA_REF.format(model="ErrorResponse")}]}
    data = {"type": "string", "anyOf": [{"const": "[DONE]"},
                                        {"contentMediaType": "application/json", "contentSchema": payload}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


class _AuthAndCount:
    """Pure ASGI middleware: API-key check on /v1 routes, the body size limit, request counting by status.

    (Starlette's ``BaseHTTPMiddleware`` would hide client disconnects from the routes.)
    """

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def send_and_record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_limited() -> Any:
            """Bodies sent without Content-Length (chunked) are cut off at the same limit."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise StarletteHTTPException(413, _TOO_LARGE)
            return message

        try:
            if self.api_key and path.startswith("/v1/") and not _authorized(scope, self.api_key):
                error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                 type_="authentication_error", code="invalid_api_key")
                await _error_response(error)(scope, receive, send_and_record)
            elif _declared_length(scope) > MAX_BODY_BYTES:
                error = APIError(413, _TOO_LARGE, code="body_too_large")
                await _error_response(error)(scope, receive, send_and_record)
            else:
                await self.app(scope, receive_limited, send_and_record)
        finally:
            if status == 429:
                self.metrics.rejected.inc()
            label = path if path in KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint=label, status=str(status)).inc()


# -- request preparation ----------------------------------------------------------------------
def _authorized(scope: Any, api_key: str) -> bool:
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


_TOO_LARGE = f"request body larger than {MAX_BODY_BYTES} bytes"


def _declared_length(scope: Any) -> int:
    value = dict(scope.get("headers") or []).get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _router_state(engine: Engine) -> dict[str, Any]:
    return engine.router_config.model_dump(include=set(RouterState.model_fields))  # type: ignore[attr-defined]


def _routed_to(routes: list[str | None]) -> str | None:
    """The answering model of a request: one name, ``mixed``, or None when not routed."""
    names = {r for r in routes if r is not None}
    if not names:
        return None
    return names.pop() if len(names) == 1 else "mixed"


def _model_card(name: str, context_length: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": fmt.now(), "owned_by": "llmcomp",
            "max_model_len": context_length}


def _tokenize_prompt(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(engine.tokenizer(prompt).input_ids)
    vocab = engine.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                       param="prompt", code="invalid_value")
    return list(prompt)


def _render_chat(engine: Engine, req: ChatCompletionRequest) -> list[int]:
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja templates raise their own errors (e.g. roles must alternate)
        raise APIError(400, f"chat template rejected the messages: {exc}", param="messages",
                       code="invalid_value") from None
    return list(tok(text, add_special_tokens=False).input_ids)


def _build_job(
    engine: Engine, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], max_tokens: int | None,
    default_max: int, logprobs: int | None, chat: bool,
) -> _Job:
    ctx = engine.context_length
    sequences = []
    for index, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, "prompt is empty (zero tokens)", param="prompt", code="invalid_value")
        room = ctx - len(ids)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                           f"{len(ids)} tokens.", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you "
                           f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                           f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        limit = max_tokens if max_tokens is not None else min(default_max, room)
        sequences.extend((ids, req.sampling(limit, logprobs, i), index) for i in range(req.n))
    return _Job(chat, req.model, sequences, logprobs is not None, req.include_usage, req.stream)


# -- running a job ----------------------------------------------------------------------------
class _Submission:
    """The engine handles of one job and the asyncio queue their events arrive on."""

    def __init__(self, engine: Engine, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        def sink_for(i: int) -> Any:
            def sink(ev: RequestOutput) -> None:
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone (server shutting down)
                    pass

            return sink

        try:
            self.handles = engine.submit_many(
                [(ids, p, sink_for(i)) for i, (ids, p, _) in enumerate(job.sequences)]
            )
        except QueueFullError as exc:
            raise APIError(429, str(exc), type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineClosedError as exc:
            raise APIError(503, str(exc), type_="server_error", code="shutting_down") from None
        except EngineUnavailableError as exc:
            raise _unavailable(str(exc)) from None

    async def events(self, request: Request | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(choice index, event)`` until every sequence is finished.

        Leaving early (client gone, generator closed or cancelled) cancels whatever is still
        running, so its batch slot is freed at the next engine step.
        """
        remaining = len(self.handles)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while remaining:
                if request is not None and time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    continue
                remaining -= ev.finished
                yield i, ev
        finally:
            for handle in self.handles:
                handle.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _run(
    request: Request, engine: Engine, metrics: ServerMetrics, token_text: Callable[[int], str], job: _Job,
    endpoint: str, started: float,
) -> Response:
    rid = fmt.new_id("chatcmpl" if job.chat else "cmpl")
    choices = [fmt.ChoiceState(prompt_tokens=len(ids), prompt_index=index) for ids, _, index in job.sequences]
    routes: list[str | None] = [None] * len(choices)  # routed serving: swift, super or mixed per choice
    energies: list[float | None] = [None] * len(choices)  # routed serving: the first decision's energy
    super_tokens = [0] * len(choices)  # routed serving: completion tokens the super model produced
    token_ids: list[list[int]] = [[] for _ in choices]  # return_token_ids
    seen_token = False

    def record(i: int, ev: RequestOutput) -> None:
        nonlocal seen_token
        c = choices[i]
        route = getattr(ev, "routed_to", None)
        if route is not None:
            if routes[i] is None:
                routes[i], energies[i] = route, getattr(ev, "energy", None)
            elif routes[i] != route:
                routes[i] = "mixed"  # token mode: the super model took over after swift tokens
            if route == "super":  # counted from usage: a remote super model's events may carry text only
                super_tokens[i] += ev.completion_tokens - c.completion_tokens
        c.text.append(ev.text)
        c.logprobs.extend(ev.logprobs)
        token_ids[i].extend(ev.token_ids)
        c.completion_tokens = ev.completion_tokens
        if ev.token_ids and not seen_token:
            seen_token = True
            metrics.ttft.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        if ev.finished:
            c.finish_reason = ev.finish_reason

    def deferred(i: int) -> int:
        return super_tokens[i]

    def account() -> None:
        for i, (route, value) in enumerate(zip(routes, energies, strict=True)):
            if route is not None:
                metrics.observe_route(route, value, deferred(i))
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        use = fmt.usage(choices)
        metrics.prompt_tokens.inc(use["prompt_tokens"])
        metrics.generation_tokens.inc(use["completion_tokens"])

    submission = _Submission(engine, job)  # 429/503 are raised here, before any response starts
    if not job.stream:
        try:
            async for i, ev in submission.events(request):
                if ev.error:
                    raise _generation_error(ev)
                record(i, ev)
        finally:
            account()
        build = fmt.chat_response if job.chat else fmt.completion_response
        body = build(rid, job.model, choices, job.want_logprobs, token_text)
        if job.token_ids:
            for ids, choice in zip(token_ids, body["choices"], strict=True):
                choice["token_ids"] = ids
        answered = _routed_to(routes)
        if answered is None:
            return JSONResponse(body)
        for i, choice in enumerate(body["choices"]):
            choice["routed_to"], choice["deferred_tokens"] = routes[i], deferred(i)
        body["routed_to"], body["deferred_tokens"] = answered, sum(deferred(i) for i in range(len(choices)))
        return JSONResponse(body, headers={ROUTED_HEADER: answered})

    events = submission.events(None)
    first: list[tuple[int, RequestOutput]] = []
    if getattr(engine, "router_config", None) is not None:
        # The routing decision comes with the first event (after prefill): wait for it, so the
        # answering model can go into the response headers (token mode: the model of the first
        # token; each chunk names the model of its own tokens).
        try:
            first.append(await events.__anext__())
        except StopAsyncIteration:
            pass
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if first and getattr(first[0][1], "routed_to", None) is not None and len(choices) == 1:
        headers[ROUTED_HEADER] = first[0][1].routed_to  # type: ignore[attr-defined]

    async def replay() -> AsyncIterator[tuple[int, RequestOutput]]:
        for item in first:
            yield item
        async for item in events:
            yield item

    async def stream() -> AsyncIterator[str]:
        offsets = [0] * len(choices)
        try:
            async for i, ev in replay():
                if ev.error:
                    yield _sse(_generation_error(ev).body())
                    return
                record(i, ev)
                c = choices[i]
                if job.chat:
                    delta: dict[str, Any] = {}
                    if not c.started:
                        c.started = True
                        delta["role"] = "assistant"
                    if ev.text or delta:
                        delta["content"] = ev.text
                    lps = fmt.chat_logprobs(ev.logprobs, token_text) if job.want_logprobs else None
                    yield _sse(_with_route(fmt.chat_chunk(rid, job.model, i, delta, lps, ev.finish_reason), ev))
                else:
                    lps = None
                    if job.want_logprobs:
                        lps = fmt.completion_logprobs(ev.logprobs, token_text, offsets[i])
                        offsets[i] += sum(len(t) for t in lps["tokens"])
                    chunk = fmt.completion_chunk(rid, job.model, i, ev.text, lps, ev.finish_reason)
                    if job.token_ids:
                        chunk["choices"][0]["token_ids"] = ev.token_ids
                    yield _sse(_with_route(chunk, ev))
            if job.include_usage:
                obj = "chat.completion.chunk" if job.chat else "text_completion"
                yield _sse(fmt.usage_chunk(rid, job.model, obj, choices))
            yield "data: [DONE]\n\n"
        finally:
            account()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _with_route(chunk: dict[str, Any], ev: RequestOutput) -> dict[str, Any]:
    """Routed serving: each streamed chunk names the model that produced its tokens."""
    route = getattr(ev, "routed_to", None)
    if route is not None:
        for choice in chunk["choices"]:
            choice["routed_to"] = route
    return chunk


def _unavailable(message: str) -> APIError:
    return APIError(503, message, type_="server_error", code="worker_restarting",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _generation_error(ev: RequestOutput) -> APIError:
    """503 when the failure is transient (the model worker died and is restarting), else 500."""
    if ev.retryable:
        return _unavailable(f"generation failed: {ev.error}")
    return APIError(500, f"generation failed: {ev.error}", type_="server_error")


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
