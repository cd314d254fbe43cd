"""Bad input gets an OpenAI-format error with the right status, and serving goes on."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

OK_BODY = {
    "model": "kimi-k2.5:premium",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 2,
}


def post(url: str, content: bytes | None = None, json_body: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        json=json_body,
        headers={"content-type": "application/json"},
        timeout=120,
    )


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    return err


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b'{"model": "kimi-k2.5", "messages": [', 400, "JSON"),
        (b"\xff\xfe not utf-8", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        (b'{"model": "kimi-k2.5"}', 400, "messages"),
        (b'{"model": "kimi-k2.5", "messages": []}', 400, "messages"),
        (b'{"model": "kimi-k2.5", "messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": 7}',
            400,
            "temperature",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"tool_choice": {"type": "function", "function": {"name": "nope"}}}',
            400,
            "nope",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], "n": 99}',
            400,
            "n",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 0}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], "stop": ['
            + b",".join(b'"s"' for _ in range(17))
            + b"]}",
            400,
            "stop",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": NaN}',
            400,
            "JSON",
        ),
        (b'{"model": "kimi-k2.5", "x": ' + b"[" * 200 + b"]" * 200 + b"}", 400, "deeper"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),  # past Python's recursion limit
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"logit_bias": {"token": 5}}',
            400,
            "logit_bias",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"seed": 99999999999999999999999}',
            400,
            "seed",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"presence_penalty": 9}',
            400,
            "presence_penalty",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "tool", "content": "sunny"}]}',
            400,
            "tool_call_id",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"tools": [{"type": "function", "function": {"name": "f", '
            b'"parameters": {"type": "banana"}}}]}',
            400,
            "JSON Schema",
        ),
        (
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}], '
            b'"stream_options": {"include_usage": true}}',
            400,
            "stream",
        ),
        (  # an image that is no image (tests/integration/test_vision.py has the rest)
            b'{"model": "kimi-k2.5", "messages": [{"role": "user", "content": [{"type": '
            b'"image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}',
            400,
            "messages.0.content.0: the data is not a decodable image",
        ),
    ],
)
def test_bad_requests(serve_url, content, status, needle):
    err = assert_openai_error(post(serve_url, content=content), status)
    assert needle.lower() in err["message"].lower()


@pytest.mark.parametrize("prompt", ["", [], [[]], [-1]])
def test_empty_or_bad_completion_prompt_is_400(serve_url, prompt):
    r = httpx.post(
        f"{serve_url}/v1/completions",
        json={"model": "kimi-k2.5:premium", "prompt": prompt, "max_tokens": 2},
        timeout=60,
    )
    assert assert_openai_error(r, 400)["param"].startswith("prompt")


def test_unknown_model_is_404(serve_url):
    err = assert_openai_error(post(serve_url, json_body={**OK_BODY, "model": "gpt-5"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_body_too_large_is_413(serve_url):
    # past router.max_body_bytes (20 MiB: room for inline images)
    huge = {**OK_BODY, "messages": [{"role": "user", "content": "x" * (21 * 1024 * 1024)}]}
    assert_openai_error(post(serve_url, json_body=huge), 413)


@pytest.mark.parametrize(
    ("tier", "words"), [("premium", 40000), ("standard", 30000), ("budget", 20000)]
)
def test_prompt_longer_than_context_is_400(serve_url, tier, words):
    body = {
        **OK_BODY,
        "model": f"kimi-k2.5:{tier}",
        "messages": [{"role": "user", "content": "weather " * words}],
    }
    err = assert_openai_error(post(serve_url, json_body=body), 400)
    assert "context" in err["message"].lower() or "length" in err["message"].lower()


def test_server_keeps_serving_after_errors(serve_url):
    for _ in range(3):
        post(serve_url, content=b"{oops")
    r = post(serve_url, json_body=OK_BODY)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
