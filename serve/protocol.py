"""The OpenAI wire format of the native server as pydantic models: requests, responses, errors.

These models are the only place requests are validated, and FastAPI builds ``/openapi.json`` from
them, so the published schema is what the server enforces and answers. Unknown request fields are
ignored (clients send many we do not use); known fields are type- and range-checked, and a
violation becomes a 400 naming the offending parameter, never a 500. Response models forbid extra
fields, so a schema check of real answers also catches undocumented output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from llmcomp.runtime.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request (OpenAI allows 4, vLLM any number)
MAX_TEMPERATURE = 2.0
SEED_MODULUS = 2**64  # torch seeds are uint64; it reads a negative int64 seed as its two's complement


class APIError(Exception):
    """An error that maps to an OpenAI-style JSON body and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``); the tokenizer and UTF-8 output cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


# -- requests ---------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="default: 16 (completions), "
                                   "min(512, room left in the context) (chat); prompt + max_tokens must fit")
    temperature: float | None = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, description="null means 1")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0, description="null means 1")
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(default=None, description="any integer (used modulo 2**64)")
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: always generate max_tokens")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """Engine parameters for choice ``choice`` of ``n`` (seeded choices get seed, seed + 1, ...)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=self.stop_list(),
            seed=None if self.seed is None else (self.seed + choice) % SEED_MODULUS,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    prompt: Prompt = Field(description="a string, strings, token ids, or lists of token ids (one answer each)")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    echo: Literal[False] = Field(default=False, description="not supported")
    return_token_ids: bool = Field(default=False, description="vLLM extension: each choice (and streamed chunk) "
                                   "also carries its generated token ids as `token_ids`")
    return_tokens_as_token_ids: bool = Field(default=False, description="vLLM extension: logprob tokens are "
                                             "written 'token_id:{id}' instead of their text")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of strings or token-id lists (one entry per choice group)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    # the schema form of _needs_logprobs below, so that generated clients and fuzzers know it too
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    })

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="takes precedence over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="requires logprobs: true")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        """Alternatives per token for the engine; None when no logprobs are wanted."""
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses --------------------------------------------------------------------------------
class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Response):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, authentication_error, "
                      "rate_limit_error or server_error")
    param: str | None = Field(description="the offending request field, as a dotted path")
    code: str | None


class ErrorResponse(_Response):
    error: ErrorInfo


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]
RoutedTo = Literal["swift", "super"]
ChoiceRoutedTo = Literal["swift", "super", "mixed"]
ROUTED_TO_DESCRIPTION = "routed serving (--router) only: the model that produced these tokens"
CHOICE_ROUTED_TO_DESCRIPTION = ("routed serving (--router) only: the model that answered this choice (mixed: the "
                                "super model took over after swift tokens, router mode token)")
DEFERRED_DESCRIPTION = "routed serving only: how many of the completion tokens the super model produced (the last ones)"


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


TOKEN_IDS_DESCRIPTION = "only with return_token_ids: the generated token ids (of this chunk, when streamed)"


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    token_ids: list[int] | None = Field(default=None, description=TOKEN_IDS_DESCRIPTION)
    routed_to: ChoiceRoutedTo | None = Field(default=None, description=CHOICE_ROUTED_TO_DESCRIPTION)
    deferred_tokens: int | None = Field(default=None, ge=0, description=DEFERRED_DESCRIPTION)


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    routed_to: RoutedTo | Literal["mixed"] | None = Field(
        default=None, description="routed serving only: the answering model (mixed: choices differ, or the "
        "super model took over mid-generation)")
    deferred_tokens: int | None = Field(default=None, ge=0, description=DEFERRED_DESCRIPTION)


class CompletionChunkChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] | None = Field(default=None, description=TOKEN_IDS_DESCRIPTION)
    routed_to: RoutedTo | None = Field(default=None, description=ROUTED_TO_DESCRIPTION)


class CompletionChunk(_Response):
    """One ``data:`` event of a streamed completion; the last one (``include_usage``) has only usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob]


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    routed_to: ChoiceRoutedTo | None = Field(default=None, description=CHOICE_ROUTED_TO_DESCRIPTION)
    deferred_tokens: int | None = Field(default=None, ge=0, description=DEFERRED_DESCRIPTION)


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    routed_to: RoutedTo | Literal["mixed"] | None = Field(
        default=None, description="routed serving only: the answering model (mixed: choices differ, or the "
        "super model took over mid-generation)")
    deferred_tokens: int | None = Field(default=None, ge=0, description=DEFERRED_DESCRIPTION)


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    routed_to: RoutedTo | None = Field(default=None, description=ROUTED_TO_DESCRIPTION)


class ChatCompletionChunk(_Response):
    """One ``data:`` event of a streamed chat completion; the last one (``include_usage``) has only usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok", "starting", "restarting", "closed"]
    model: str
    active: int
    waiting: int
    worker_restarts: int


class RouterUpdate(BaseModel):
    """``POST /v1/router``: a new threshold and/or temperature, used from the next request on."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    tau: float | None = Field(default=None, description="requests whose swift energy is above tau go to super")
    temperature: float | None = Field(default=None, gt=0.0, description="T of the energy")


class RouterState(_Response):
    """The router in force (``GET``/``POST /v1/router``)."""

    tau: float
    temperature: float
    mode: Literal["request", "token"]
    energy_over: Literal["vocab", "choices"]
    normalize: bool
    swift: str | None
    super: str | None


# -- validation errors ------------------------------------------------------------------------
def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """FastAPI's body errors as OpenAI's 400 about the first wrong field, naming its path (``messages.0.role``)."""
    first = _most_specific(errors)
    loc = _body_loc(first)
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"request body is not valid JSON: {detail}", code="invalid_json")
    if not loc:  # the body as a whole: missing, or JSON that is not an object
        return APIError(400, "request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    param = ".".join(x for x in loc if not _is_type_tag(x))
    message = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _body_loc(error: Mapping[str, Any]) -> list[str]:
    loc = [str(x) for x in error.get("loc", ())]
    return loc[1:] if loc[:1] == ["body"] else loc


def _most_specific(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of the first wrong field's errors, one that is not a type mismatch if there is one.

    A union field gets one error per member: for ``stop: [17 strings]`` "not a string" (the ``str``
    member) and "at most 16 items" (the list member); the member whose type matched says what is wrong.
    """
    if not errors:
        return {}
    field = _body_loc(errors[0])[:1]
    candidates = [e for e in errors if _body_loc(e)[:1] == field]
    return next((e for e in candidates if not str(e.get("type", "")).endswith("_type")), candidates[0])


def _is_type_tag(x: str) -> bool:
    """Pydantic puts union member names (``str``, ``list[int]``) into error locations; drop them."""
    return x in {"str", "int", "float", "bool"} or "[" in x
