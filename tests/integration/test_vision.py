"""Images on every tier through real Ray Serve: vLLM runs the tiny model's MoonViT tower,
llama-server its mmproj; the router checks, fetches and counts images first."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import jsonschema
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

TIERS = ["premium", "standard", "budget"]
QUESTION = {"type": "text", "text": "What is in this picture?"}


def png(width: int = 200, height: int = 150, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` (no pixel data to speak of)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_tokens(usage) -> int:
    """The prompt tokens the images took (the SDK knows the field)."""
    return usage.prompt_tokens_details.image_tokens


@pytest.mark.parametrize("tier", TIERS)
def test_an_image_on_each_tier_adds_the_tokens_the_engine_reports(client, admin, state_dir, tier):
    model = f"kimi-k2.5:{tier}"
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": [QUESTION, image_part(data_url(png()))]}],
        max_tokens=4,
    )
    assert raw.headers["x-kimi-tier"] == tier
    answer = raw.parse()
    text_only = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [QUESTION]}], max_tokens=4
    )
    media = image_tokens(answer.usage)
    assert media > 0
    assert answer.usage.prompt_tokens == text_only.usage.prompt_tokens + media

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [QUESTION, image_part(data_url(png()))]}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens == answer.usage.prompt_tokens
    assert image_tokens(usage) == media

    from tests.integration.conftest import flushed_usage

    table = flushed_usage(admin, state_dir)
    rows = [r for r in table.to_pylist() if r["request_id"] == raw.headers["x-request-id"]]
    assert len(rows) == 1 and rows[0]["media_tokens"] == media
    assert rows[0]["prompt_tokens"] == answer.usage.prompt_tokens


def test_webp_gif_and_jpeg_reach_every_engine(client):
    """Formats an engine may not decode (WebP, GIF) go on as PNG; JPEG as it is."""
    for fmt, media_type in (("WEBP", "image/webp"), ("GIF", "image/gif"), ("JPEG", "image/jpeg")):
        out = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 200, 30)).save(out, fmt)
        for tier in TIERS:
            r = client.chat.completions.create(
                model=f"kimi-k2.5:{tier}",
                messages=[
                    {
                        "role": "user",
                        "content": [QUESTION, image_part(data_url(out.getvalue(), media_type))],
                    }
                ],
                max_tokens=2,
            )
            assert image_tokens(r.usage) > 0, (fmt, tier)


def test_a_tool_round_trip_with_an_image_gives_schema_valid_calls_on_premium(client):
    schema = {
        "type": "object",
        "properties": {
            "color": {"type": "string", "maxLength": 12},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["color", "confidence"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "report_color", "parameters": schema}}]

    def forced_call(messages: list[dict]):
        answer = client.chat.completions.create(
            model="kimi-k2.5:premium",
            messages=messages,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "report_color"}},
            max_tokens=300,
        )
        call = answer.choices[0].message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        return answer, call

    messages = [{"role": "user", "content": [QUESTION, image_part(data_url(png()))]}]
    first, call = forced_call(messages)
    assert image_tokens(first.usage) > 0
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "noted"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And now?"}, image_part(data_url(png(90, 90)))],
        },
    ]
    second, _ = forced_call(messages)
    assert image_tokens(second.usage) > image_tokens(first.usage)  # two images now


@pytest.mark.parametrize("tier", ["standard", "budget"])
def test_a_forced_call_with_an_image_on_a_gguf_tier(client, tier):
    """llama.cpp's constrained path (our grammar on /completion) takes the image too."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
    }
    r = client.chat.completions.create(
        model=f"kimi-k2.5:{tier}",
        messages=[{"role": "user", "content": [QUESTION, image_part(data_url(png()))]}],
        tools=[{"type": "function", "function": {"name": "count", "parameters": schema}}],
        tool_choice={"type": "function", "function": {"name": "count"}},
        max_tokens=200,
    )
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), schema)
    assert image_tokens(r.usage) > 0


def test_anthropic_and_responses_images_share_the_pipeline(serve_url, client):
    key = client.api_key
    claude = anthropic.Anthropic(base_url=serve_url, api_key=key, max_retries=0)
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png()).decode()}
    message = claude.messages.create(
        model="kimi-k2.5:budget",
        max_tokens=4,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image", "source": source}, {"type": "text", "text": "What?"}],
            }
        ],
    )
    text_only = claude.messages.create(
        model="kimi-k2.5:budget",
        max_tokens=4,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}]}],
    )
    assert message.usage.input_tokens > text_only.usage.input_tokens + 10

    broken = httpx.post(
        f"{serve_url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={
            "model": "kimi-k2.5",
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {**source, "data": "bm90IGFuIGltYWdl"}}
                    ],
                }
            ],
        },
        timeout=60,
    )
    assert broken.status_code == 400
    assert broken.json()["type"] == "error"
    assert broken.json()["error"]["type"] == "invalid_request_error"
    assert "not a decodable image" in broken.json()["error"]["message"]

    response = client.responses.create(
        model="kimi-k2.5:standard",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What?"},
                    {"type": "input_image", "image_url": data_url(png())},
                ],
            }
        ],
        max_output_tokens=16,
    )
    assert response.usage.input_tokens > 30


# ---- bad input -------------------------------------------------------------------------


class Recorder:
    """A TCP listener that records every connection it gets (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """Images served on `localhost` (the host the test deployment allow-lists)."""
    body = png(120, 80, (0, 0, 255))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", self.path.split("to=", 1)[1])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


def refused(serve_url: str, key: str, content: list[dict]) -> dict:
    r = httpx.post(
        f"{serve_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": "kimi-k2.5",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 2,
        },
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    return error


BAD = {
    "broken base64": (data_url(png())[:-7] + "!!*", "base64"),
    "not an image": (data_url(b"just some text, no pixels", "image/png"), "not a decodable image"),
    "zero by zero": (data_url(png_header_only(0, 0)), ""),
    "40000 by 40000": (data_url(png_header_only(40000, 40000)), "pixels"),
    "not an image type": ("data:text/plain;base64,aGVsbG8=", "not an image type"),
    "not base64": ("data:image/png,rawbytes", "base64"),
    "another scheme": ("file:///etc/passwd", "data: URL or an http(s) URL"),
    "a host not allow-listed": ("https://images.example.com/cat.png", "not allow-listed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_get_a_400_naming_the_part(serve_url, client, case):
    url, words = BAD[case]
    error = refused(serve_url, client.api_key, [QUESTION, image_part(url)])
    assert error["param"] == "messages.0.content.1"
    assert words in error["message"]


def test_too_many_images(serve_url, client):
    parts = [QUESTION] + [image_part(data_url(png(30, 30)))] * 9
    error = refused(serve_url, client.api_key, parts)
    assert error["code"] == "too_many_images" and "at most 8" in error["message"]


def test_loopback_image_urls_are_never_fetched(serve_url, client, recorder, image_host):
    """127.0.0.1 is refused outright, and so is a redirect to it from an allowed host:
    the listener there sees no connection at all."""
    target = f"http://127.0.0.1:{recorder.port}/x.png"
    error = refused(serve_url, client.api_key, [QUESTION, image_part(target)])
    assert error["code"] == "image_url_not_allowed" and error["param"] == "messages.0.content.1"
    error = refused(
        serve_url, client.api_key, [QUESTION, image_part(f"{image_host}/redirect?to={target}")]
    )
    assert error["code"] == "image_url_not_allowed"
    metadata = "http://169.254.169.254/latest/meta-data/"
    assert (
        refused(serve_url, client.api_key, [image_part(metadata)])["code"]
        == "image_url_not_allowed"
    )
    assert recorder.connections == 0
    # and the app still serves
    ok = client.chat.completions.create(
        model="kimi-k2.5:budget", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.usage.completion_tokens == 2


def test_an_allow_listed_image_url_is_fetched_by_the_router(client, image_host):
    r = client.chat.completions.create(
        model="kimi-k2.5:standard",
        messages=[{"role": "user", "content": [QUESTION, image_part(f"{image_host}/cat.png")]}],
        max_tokens=2,
    )
    inline = client.chat.completions.create(
        model="kimi-k2.5:standard",
        messages=[
            {"role": "user", "content": [QUESTION, image_part(data_url(png(120, 80, (0, 0, 255))))]}
        ],
        max_tokens=2,
    )
    assert image_tokens(r.usage) == image_tokens(inline.usage) > 0
