"""Images in a chat request: checked, fetched where a deployment allows, and counted.

Runs in the pipeline after the caller is known and before a tier is chosen, for every
wire format (each adapter hands over OpenAI `image_url` parts). Every image must decode
within the deployment's byte, pixel and count limits, or the request gets a 400 naming the
content part, before any engine sees it. Remote URLs are off by default; where enabled
they are fetched here, from allow-listed hosts only (each redirect checked again, the
connection pinned to the checked address), and handed on as `data:` URLs, so an engine
never fetches anything. Formats an engine may not decode (WebP, GIF) go on as PNG.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx
from PIL import Image

from serve_app import outbound
from serve_app.config import ImageTokens, MediaSettings, RemoteImages
from serve_app.errors import APIError

IMAGE_PART = "image_url"
# Media the schema knows but no tier takes here: named in a 400, never passed to an engine.
UNSERVED_PARTS = {"input_audio": "audio", "video_url": "video", "video": "video", "image": "image"}
PASSED_AS_IS = {"PNG", "JPEG"}  # what every engine decodes; others are re-encoded as PNG


@dataclass(frozen=True)
class Media:
    """What a request's images add: their count and the prompt tokens they will take."""

    images: int = 0
    tokens: int = 0
    data_chars: int = 0  # characters of inline image data in the body (not prompt text)


def image_tokens(width: int, height: int, rule: ImageTokens) -> int:
    """Prompt tokens of one image under K2.5's resize rule (markers included)."""
    patch = rule.patch_size
    fit = math.sqrt(rule.max_patches / (max(1, width // patch) * max(1, height // patch)))
    side = rule.max_patches_per_side * patch
    scale = min(1.0, fit, side / width, side / height)
    new_w = min(max(1, int(width * scale)), side)
    new_h = min(max(1, int(height * scale)), side)
    unit = rule.merge * patch
    return math.ceil(new_w / unit) * math.ceil(new_h / unit) + rule.wrapper_tokens


def image_parts(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each `image_url` part of a chat body with its location (`messages.0.content.1`);
    a 400 for media parts no tier takes."""
    found = []
    for i, message in enumerate(body.get("messages") or ()):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages.{i}.content.{j}"
            if kind == IMAGE_PART:
                found.append((where, part))
            elif kind in UNSERVED_PARTS:
                raise invalid(
                    where,
                    f"{kind} parts are not supported; images go as image_url parts",
                    code="unsupported_content",
                )
    return found


def invalid(where: str, why: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{where}: {why}", param=where, code=code)


def too_many_pixels(where: str, what: str, limit: int) -> APIError:
    return invalid(where, f"{what} is over {limit} pixels", code="image_too_large")


async def prepare_images(body: dict[str, Any], settings: MediaSettings) -> Media:
    """Check (and fetch) every image of `body`, rewriting its URL to what engines take."""
    parts = image_parts(body)
    if not parts:
        return Media()
    if len(parts) > settings.max_images:
        raise APIError(
            400,
            f"{len(parts)} images in one request; at most {settings.max_images} are allowed",
            param="messages",
            code="too_many_images",
        )
    tokens = chars = 0
    for where, part in parts:
        url = str((part.get("image_url") or {}).get("url") or "")
        data = await _image_bytes(url, where, settings)
        width, height, passed = await asyncio.to_thread(_decode, data, where, settings)
        part["image_url"] = {**part["image_url"], "url": passed}
        tokens += image_tokens(width, height, settings.tokens)
        chars += len(url) if url.startswith("data:") else 0  # as the client's body held it
    return Media(images=len(parts), tokens=tokens, data_chars=chars)


async def _image_bytes(url: str, where: str, settings: MediaSettings) -> bytes:
    if url.startswith("data:"):
        return _from_data_url(url, where, settings.max_image_bytes)
    if url.split(":", 1)[0].lower() in ("http", "https"):
        if not settings.remote.enabled:
            raise invalid(
                where,
                "image URLs are not fetched on this deployment; send the image as a"
                " data: URL (base64)",
                code="image_url_not_allowed",
            )
        return await fetch_image(url, where, settings.remote, settings.max_image_bytes)
    raise invalid(where, "an image must be a data: URL or an http(s) URL")


def _from_data_url(url: str, where: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    media_type, *params = header[5:].split(";")
    if not sep or "base64" not in params:
        raise invalid(where, "a data: URL image must be base64 (data:image/png;base64,...)")
    if not media_type.lower().startswith("image/"):
        raise invalid(where, f"{media_type or 'no media type'} is not an image type")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise invalid(where, f"the image is over {max_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(where, "the image's base64 data does not decode") from None


def _decode(data: bytes, where: str, settings: MediaSettings) -> tuple[int, int, str]:
    """Width, height and the data URL engines get; a 400 for anything that is not a whole
    image within the limits. Dimensions are checked from the header, before decoding."""
    if len(data) > settings.max_image_bytes:
        raise invalid(
            where, f"the image is over {settings.max_image_bytes} bytes", code="image_too_large"
        )
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        fmt = image.format or ""
        if fmt not in settings.formats:
            allowed = ", ".join(settings.formats)
            raise invalid(where, f"{fmt or 'this'} images are not taken; send {allowed}")
        if width < 1 or height < 1:
            raise invalid(where, f"a {width}x{height} image has no pixels")
        if width * height > settings.max_pixels:
            raise too_many_pixels(where, f"a {width}x{height} image", settings.max_pixels)
        image.load()  # the whole first frame decodes, or the image is broken
    except APIError:
        raise
    except Image.DecompressionBombError:  # Pillow's own bound, checked as it opens
        raise too_many_pixels(where, "the image", settings.max_pixels) from None
    except (OSError, SyntaxError, ValueError):
        raise invalid(where, "the data is not a decodable image") from None
    if fmt in PASSED_AS_IS:
        passed = data
    else:
        out = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, "PNG")
        passed, fmt = out.getvalue(), "PNG"
    return width, height, f"data:image/{fmt.lower()};base64,{base64.b64encode(passed).decode()}"


async def fetch_image(url: str, where: str, policy: RemoteImages, max_bytes: int) -> bytes:
    """The bytes at `url`, every hop checked by the outbound policy; a 400 if refused."""
    try:
        async with asyncio.timeout(policy.timeout_s), httpx.AsyncClient() as client:
            for _ in range(policy.max_redirects + 1):
                target = await outbound.resolve(url, policy)
                async with client.stream(
                    "GET",
                    target.pinned_url(),
                    headers={"Host": target.host, "Accept": "image/*"},
                    extensions={"sni_hostname": target.host},
                ) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise invalid(where, f"fetching the image gave HTTP {response.status_code}")
                    return await _read_capped(response, where, max_bytes)
    except outbound.Refused as exc:
        raise invalid(
            where, f"the image URL is not allowed: {exc}", "image_url_not_allowed"
        ) from None
    except TimeoutError:
        raise invalid(where, f"fetching the image took over {policy.timeout_s} s") from None
    except httpx.HTTPError as exc:
        raise invalid(where, f"fetching the image failed: {type(exc).__name__}") from None
    raise invalid(where, f"the image URL redirects more than {policy.max_redirects} times")


async def _read_capped(response: httpx.Response, where: str, max_bytes: int) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise invalid(where, f"the image is over {max_bytes} bytes", code="image_too_large")
    return bytes(data)
