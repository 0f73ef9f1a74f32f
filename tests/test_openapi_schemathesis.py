"""The native server checked against its own ``/openapi.json`` with schemathesis.

schemathesis reads the schema the running server publishes and generates requests for every
operation from it: valid ones (positive) and ones that break it (negative). Every answer must be no
5xx, carry a status code the schema lists for the operation and the documented content type, and
have a body that matches the documented schema (for a stream: every server-sent event). Generation
is derandomized, so a run is reproducible.

The model is a tiny random Llama with a short context, which bounds the work of every generated
request (prompt + ``max_tokens`` must fit), and the byte tokenizer: sampling cost grows with the
vocabulary (top-p sorts it for every sequence and step), and with SmolLM2's 49k tokens sampling
alone made the run several times slower.

(schemathesis's pytest plugin, ``schemathesis.pytest.from_fixture``, does not work with pytest 9.2:
it sets ``Function._nodeid``, which pytest removed; its Hypothesis strategies are used directly.)
"""

from __future__ import annotations

from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tiny_models import TINY_VOCAB, byte_tokenizer, tiny_llama

from llmcomp.serve.app import ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.engine import Engine

MODEL = "tiny-llama"
KEY = "sk-schema"
CONTEXT = 96  # prompt + max_tokens must fit: bounds every generated request's work
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
MAX_EXAMPLES = 100  # generated requests per operation and mode
# Per request; schemathesis' default (10 s) was hit on a slow shared host by a streamed answer. The
# test checks what the server answers, not how fast.
RESPONSE_TIMEOUT_S = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
GENERATION = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
WITH_INPUT = [*GENERATION, ("GET", "/v1/models/{model_id}"), ("GET", "/v1/models")]  # auth header counts
WITHOUT_INPUT = [("GET", "/health"), ("GET", "/metrics")]  # nothing to generate, nothing to break
SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@pytest.fixture(scope="module")
def server():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    engine = Engine(tiny_llama(max_positions=CONTEXT), tokenizer, max_batch_size=16, max_queue=32)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL, api_key=KEY))) as url:
        yield url
    engine.close()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server + "/openapi.json")


def run_cases(strategy: st.SearchStrategy[schemathesis.Case]) -> Counter[tuple[int, str]]:
    """Send every generated case, run the checks on its answer; count answers by (status, media type)."""
    answers: Counter[tuple[int, str]] = Counter()

    @SETTINGS
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS,
                                          timeout=RESPONSE_TIMEOUT_S)
        media_type = response.headers.get("content-type", [""])[0].split(";")[0]
        answers[(response.status_code, media_type)] += 1

    check()
    return answers


def labels(operations: list[tuple[str, str]]) -> list[str]:
    return [f"{method} {path}" for method, path in operations]


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(WITH_INPUT + WITHOUT_INPUT)


def test_the_schema_documents_bodies_streams_and_errors(server):
    doc = httpx.get(server + "/openapi.json").json()
    components = doc["components"]["schemas"]
    for path, request, chunk in [("/v1/completions", "CompletionRequest", "CompletionChunk"),
                                 ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionChunk")]:
        operation = doc["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        assert components[request]["properties"]["model"]["enum"] == [MODEL]
        answers = operation["responses"]
        assert set(answers) == {"200", "400", "401", "404", "413", "429", "500", "503"}  # validation is 400, no 422
        assert all(answers[c]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
                   for c in answers if c != "200")
        event = answers["200"]["content"]["text/event-stream"]["itemSchema"]["properties"]["data"]
        assert event["anyOf"][1]["contentSchema"]["anyOf"][0]["$ref"].endswith("/" + chunk) and chunk in components
        assert operation["security"] == [{"bearer": []}]
    assert components["ErrorInfo"]["required"] == ["message", "type", "param", "code"]
    token_ids = components["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]["items"]
    assert (token_ids["minimum"], token_ids["maximum"]) == (0, TINY_VOCAB - 1)
    chat = components["ChatCompletionRequest"]["properties"]
    assert (chat["temperature"]["anyOf"][0]["maximum"], chat["top_logprobs"]["anyOf"][0]["maximum"]) == (2, 20)
    assert "HTTPValidationError" not in components


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), WITH_INPUT, ids=labels(WITH_INPUT))
def test_generated_requests_get_answers_that_conform_to_the_schema(api_schema, method, path, mode):
    answers = run_cases(api_schema[path][method].as_strategy(generation_mode=mode))
    assert not any(status >= 500 for status, _ in answers)
    if mode == GenerationMode.POSITIVE and method == "POST":
        # valid requests reach the engine: the schema documents what the server accepts
        assert answers[(200, "application/json")] >= MAX_EXAMPLES // 5, answers


@pytest.mark.parametrize(("method", "path"), GENERATION, ids=labels(GENERATION))
def test_streamed_answers_conform_to_the_schema(api_schema, method, path):
    """Every server-sent event of a stream is checked against the schema's ``itemSchema``."""

    def streaming(case: schemathesis.Case) -> schemathesis.Case:
        case.body = {**case.body, "stream": True}
        return case

    answers = run_cases(api_schema[path][method].as_strategy().map(streaming))
    assert answers[(200, "text/event-stream")] >= MAX_EXAMPLES // 5, answers


@pytest.mark.parametrize(("method", "path"), WITHOUT_INPUT, ids=labels(WITHOUT_INPUT))
def test_health_and_metrics_conform_to_the_schema(api_schema, method, path):
    assert set(run_cases(api_schema[path][method].as_strategy())) <= {(200, "application/json"), (200, "text/plain")}
