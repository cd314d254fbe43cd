"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document.

schemathesis generates requests that fit each route's schema and requests that break it,
and sends them through Ray Serve's proxy, the router and the real engines. Whatever
arrives: no 5xx, every error is OpenAI's error object (the document's default response),
a request that breaks the schema is refused with a 4xx, none hangs, and serving goes on.
`KIMI_FUZZ_EXAMPLES` sets the examples per route and mode (default 60).
"""

from __future__ import annotations

import collections
import json
import os
import zlib

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
)

from serve_app.canonical import INT32
from tests.integration.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("KIMI_FUZZ_EXAMPLES", "60"))
# Random names end in 404 and random lengths in the plan's 400: most generated requests are
# steered to a served model (or a real plan) and a short answer, so they go on through the
# gateway to an engine. Values that break the schema are left as they are.
MODELS = ["kimi-k2.5", "kimi-k2.5:premium", "kimi-k2.5:standard", "kimi-k2.5:budget", None]
PLANS = ["free", "standard", "premium", "enterprise", None]
MAX_OUT = 16
LIMITS = ("max_tokens", "max_completion_tokens", "min_tokens", "max_output_tokens")
SENT: dict[str, collections.Counter[int | str]] = collections.defaultdict(collections.Counter)
REFUSED: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_key(admin: httpx.Client) -> str:
    # all tiers and no rate limits, so every request reaches routing; short answers
    spec = {"plan": "enterprise", "name": "fuzz", "overrides": {"max_output_tokens": MAX_OUT}}
    return admin.post("/admin/keys", json=spec).json()["key"]


@pytest.fixture(scope="session")
def api_schema(serve_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{serve_url}/openapi.json")


def steer(case: schemathesis.Case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    roll = zlib.crc32(repr(sorted(body)).encode())
    for field, choices in (("model", MODELS), ("plan", PLANS)):
        # (an empty name may be the violation a negative case is about: it stays)
        if isinstance(body.get(field), str) and body[field]:
            body[field] = choices[roll % len(choices)] or body[field]
    for field in LIMITS:
        value = body.get(field)
        # (past the schemas' bound, INT32, a value is what a negative case is about)
        if type(value) is int and MAX_OUT < value <= INT32:
            body[field] = 1 + value % MAX_OUT
    if type(body.get("min_tokens")) is int and type(body.get("max_tokens")) is int:
        body["min_tokens"] = min(body["min_tokens"], body["max_tokens"])
    # Half the generation requests that do not say stream (and set no stream_options, which
    # need it) stream, so the streaming paths of every engine are fuzzed too.
    if "model" in body and "stream" not in body and "stream_options" not in body:
        body["stream"] = roll % 2 == 0


# (schemathesis's own pytest loader needs a pytest internal that pytest 9 dropped, so the
# cases come from its Hypothesis strategies, one test per route and mode)
@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        (method, path, mode)
        for method, path in [
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens"),
            ("POST", "/v1/responses"),
            ("POST", "/v1/conversations"),
            ("POST", "/v1/webhook_endpoints"),
            ("POST", "/admin/keys"),
            ("DELETE", "/admin/keys/{key_id}"),
        ]
        for mode in GenerationMode
    ]
    + [("GET", "/v1/models", GenerationMode.POSITIVE)]  # takes no input to break
    + [("GET", "/v1/usage", GenerationMode.POSITIVE)],
)
def test_fuzzed_requests_get_clean_answers(
    api_schema: schemathesis.BaseSchema,
    fuzz_key: str,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema[path][method]
    label = f"{method} {path} ({mode.value})"

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure reproduces
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        steer(case)
        token = ADMIN_TOKEN if path.startswith("/admin") else fuzz_key
        response = case.call(headers={"authorization": f"Bearer {token}"}, timeout=120)
        SENT[label][response.status_code] += 1
        case.validate_response(
            response,
            checks=[not_a_server_error, response_schema_conformance, negative_data_rejection],
        )
        if response.status_code >= 400:
            assert "Traceback" not in response.text
            message = response.json()["error"]["message"]
            REFUSED[f"{response.status_code} {message[:60]}"] += 1
        elif "text/event-stream" in " ".join(response.headers.get("content-type", [])):
            # schemathesis stops reading a stream after 20 events (or its timeout) and
            # keeps the events complete by then: those are checked, the end cannot be
            ended = not response.stream_cut_short
            if path.startswith("/v1/messages"):
                assert_well_formed_anthropic_stream(response.text, ended)
            elif path == "/v1/responses":
                assert_well_formed_responses_stream(response.text, ended)
            else:
                assert_well_formed_stream(response.text, ended)
            SENT[label]["streams checked"] += 1
            SENT[label]["streams cut short by the client"] += response.stream_cut_short

    fuzz()


def assert_well_formed_stream(text: str, ended: bool) -> None:
    """Every event is a JSON object (a chunk, or OpenAI's error object), then, where the
    client read the stream to its end, `[DONE]`."""
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events, text[:200]
    if ended:
        assert events[-1] == "[DONE]", events[-3:]
        events = events[:-1]
    chunks = [json.loads(e) for e in events]
    assert all(isinstance(c, dict) for c in chunks)
    for c in chunks:
        if "error" in c:
            assert set(c["error"]) >= {"message", "type", "param", "code"}, c
        else:
            assert c["object"] in ("chat.completion.chunk", "text_completion"), c


def assert_well_formed_anthropic_stream(text: str, ended: bool) -> None:
    """Every event names its type, its data says the same, the first starts the message
    and, where the client read the stream to its end, the last stops it (or is an error)."""
    names = [ln[7:] for ln in text.split("\n") if ln.startswith("event: ")]
    datas = [json.loads(ln[6:]) for ln in text.split("\n") if ln.startswith("data: ")]
    assert names and [d["type"] for d in datas] == names, text[:300]
    assert names[0] == "message_start"
    if ended:
        assert names[-1] in ("message_stop", "error"), names[-3:]
    for d in datas:
        if d["type"] == "error":
            assert set(d["error"]) >= {"type", "message"}, d


def assert_well_formed_responses_stream(text: str, ended: bool) -> None:
    """Typed events whose data says their type, numbered in order from 0, from
    `response.created` to, where the client read to the end, the response's end."""
    names = [ln[7:] for ln in text.split("\n") if ln.startswith("event: ")]
    datas = [json.loads(ln[6:]) for ln in text.split("\n") if ln.startswith("data: ")]
    assert names and [d["type"] for d in datas] == names, text[:300]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert names[0] == "response.created"
    if ended:
        ends = ("response.completed", "response.incomplete", "response.failed")
        assert names[-1] in ends, names[-3:]


def test_serving_goes_on_after_fuzzing(client, fuzz_key: str) -> None:
    assert SENT, "the fuzz test sent nothing"
    for label, statuses in sorted(SENT.items()):
        print(f"fuzzed {label}: {dict(sorted(statuses.items(), key=str))}")
    print("most frequent refusals:", REFUSED.most_common(12))
    out = client.chat.completions.create(
        model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.usage.completion_tokens == 2
