"""Image input, pure parts: the router's checks and count, the tier's image-token report,
the GGUF constrained path's image data. The same paths run end to end in
tests/integration/test_vision.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.engines.image_tokens import with_image_tokens, without_images
from deployments.engines.llama_cpp.constrained import completion_body
from deployments.protocol import EngineOutput, token_count
from serve_app.config import ImageTokens, MediaSettings, RemoteImages
from serve_app.errors import APIError
from serve_app.pipeline.media import image_tokens, prepare_images

SETTINGS = MediaSettings(tokens=ImageTokens(max_patches=1024, max_patches_per_side=128))


def encoded(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 128).save(out, fmt)
    return out.getvalue()


def url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def chat(*urls: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": "what?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "kimi-k2.5", "messages": [{"role": "user", "content": parts}]}


def prepare(body: dict[str, Any], settings: MediaSettings = SETTINGS):
    return asyncio.run(prepare_images(body, settings))


def refusal(body: dict[str, Any], settings: MediaSettings = SETTINGS) -> APIError:
    with pytest.raises(APIError) as caught:
        prepare(body, settings)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    "size", [(200, 150), (1, 1), (14, 14), (4000, 3000), (30000, 20), (20, 9000), (1792, 1792)]
)
@pytest.mark.parametrize("limits", [(1024, 128), (16384, 512)])
def test_the_count_is_k25s_own_resize_rule(size, limits):
    """vLLM's K2.5 processor is the reference: its token count for every size and limit."""
    from vllm.transformers_utils.processors.kimi_k25_vision_fused import navit_resize_image

    rule = ImageTokens(max_patches=limits[0], max_patches_per_side=limits[1], wrapper_tokens=0)
    expected = navit_resize_image(*size, 14, 2, limits[0], limits[1], None)["num_tokens"]
    assert image_tokens(*size, rule) == expected


def test_a_png_passes_as_it_is_and_is_counted():
    data = encoded("PNG", (200, 150))
    body = chat(url(data))
    media = prepare(body)
    assert media.images == 1 and media.tokens == 8 * 6 + SETTINGS.tokens.wrapper_tokens
    assert body["messages"][0]["content"][1]["image_url"]["url"] == url(data)
    assert media.data_chars == len(url(data))


@pytest.mark.parametrize("fmt", ["WEBP", "GIF"])
def test_webp_and_gif_go_on_as_png(fmt):
    sent = url(encoded(fmt), f"image/{fmt.lower()}")
    body = chat(sent)
    assert prepare(body).data_chars == len(sent)  # what the client's body held
    passed = body["messages"][0]["content"][1]["image_url"]["url"]
    assert passed.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(passed.partition(",")[2]))).size == (64, 48)


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("image", "code", "words"),
    [
        ("data:image/png;base64,iVBOR%%%", "invalid_image", "base64"),
        (url(b"plain text"), "invalid_image", "not a decodable image"),
        (url(png_claiming(0, 0)), "invalid_image", ""),
        (url(png_claiming(40000, 40000)), "image_too_large", "pixels"),
        (url(png_claiming(6000, 5000)), "image_too_large", "over 25000000 pixels"),
        (url(encoded("BMP"), "image/bmp"), "invalid_image", "BMP images are not taken"),
        ("data:application/pdf;base64,JVBERi0=", "invalid_image", "not an image type"),
        ("https://example.com/a.png", "image_url_not_allowed", "not fetched"),
        ("ftp://example.com/a.png", "invalid_image", "data: URL or an http(s) URL"),
    ],
)
def test_bad_images_name_their_part(image, code, words):
    error = refusal(chat(url(encoded("PNG")), image))
    assert error.param == "messages.0.content.2"
    assert error.code == code and words in error.message


def test_byte_and_count_limits():
    small = MediaSettings(max_images=2, max_image_bytes=1000)
    assert refusal(chat(url(encoded("PNG", (600, 600), "RGBA"))), small).code == "image_too_large"
    tiny = url(encoded("PNG", (4, 4)))
    assert refusal(chat(tiny, tiny, tiny), small).code == "too_many_images"


def test_audio_and_video_parts_are_refused_by_name():
    body = chat()
    body["messages"][0]["content"].append({"type": "video_url", "video_url": {"url": "x"}})
    error = refusal(body)
    assert error.code == "unsupported_content" and error.param == "messages.0.content.1"


def test_remote_images_only_from_listed_hosts():
    with pytest.raises(ValidationError):
        RemoteImages(enabled=True)
    remote = RemoteImages(enabled=True, allowed_hosts=["images.example.com"])
    settings = MediaSettings(remote=remote)
    for where in ("https://elsewhere.example.com/a.png", "http://images.example.com/a.png"):
        assert refusal(chat(where), settings).code == "image_url_not_allowed"


# ---- the tier's image-token report -----------------------------------------------------


async def tokenize(body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
    text = json.dumps(body["messages"])
    assert "image_url" not in text
    yield token_count(30)


async def outputs(*items: EngineOutput) -> AsyncIterator[EngineOutput]:
    for item in items:
        yield item


async def collected(source: AsyncIterator[EngineOutput], body: dict[str, Any]) -> list[Any]:
    return [item async for item in with_image_tokens(source, body, "r1", tokenize)]


def test_the_tier_reports_what_the_images_added():
    body = chat(url(encoded("PNG")))
    answer = {"object": "chat.completion", "usage": {"prompt_tokens": 87, "completion_tokens": 2}}
    [out] = asyncio.run(collected(outputs(answer), body))
    assert out["usage"]["prompt_tokens_details"] == {"image_tokens": 57}

    chunk = {
        "choices": [],
        "usage": {"prompt_tokens": 90, "prompt_tokens_details": {"cached_tokens": 16}},
    }
    events = ['data: {"choices": []}\n\n', f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]
    out = asyncio.run(collected(outputs(*events), body))
    assert out[0] == events[0] and out[2] == events[2]
    usage = json.loads(out[1][6:])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 16, "image_tokens": 60}


def test_a_chat_without_images_is_passed_untouched():
    body = chat()
    assert without_images(body) is None
    answer = {"usage": {"prompt_tokens": 5}}
    assert asyncio.run(collected(outputs(answer), body)) == [{"usage": {"prompt_tokens": 5}}]


def test_an_image_only_message_keeps_a_text_content():
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}
        ]
    }
    assert without_images(body) == {"messages": [{"role": "user", "content": ""}]}


def test_the_gguf_constrained_path_sends_the_images_with_the_prompt():
    first, second = url(encoded("PNG")), url(encoded("JPEG"), "image/jpeg")
    body = chat(first)
    body["messages"] += [{"role": "assistant", "content": "ok"}, chat(second)["messages"][0]]
    sent = completion_body(body, "<prompt>", "root ::= x")
    assert sent["prompt"] == {
        "prompt_string": "<prompt>",
        "multimodal_data": [first.partition(",")[2], second.partition(",")[2]],
    }
    assert completion_body(chat(), "<prompt>", "root ::= x")["prompt"] == "<prompt>"


def test_usage_in_an_output_of_several_events_is_completed_too():
    body = chat(url(encoded("PNG")))
    usage = {"choices": [], "usage": {"prompt_tokens": 40}}
    joined = f'data: {{"choices": []}}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n'
    [out] = asyncio.run(collected(outputs(joined), body))
    events = out.split("\n\n")
    assert events[0] == 'data: {"choices": []}' and events[2] == "data: [DONE]"
    assert json.loads(events[1][6:])["usage"]["prompt_tokens_details"] == {"image_tokens": 10}
    assert out.endswith("\n\n")
