"""The prompt tokens a request's images took, as the tier's own engine counts them.

Neither engine reports tokens per modality, so the tier counts the same chat without its
images (the engine's own tokenize, run beside generation) and reports the difference as
`usage.prompt_tokens_details.image_tokens`, in the JSON answer or the stream's usage chunk.
The router meters it as the record's `media_tokens`; they are billed as prompt tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments.protocol import EngineOutput

Tokenize = Callable[[dict[str, Any], str], AsyncIterator[EngineOutput]]


def without_images(body: dict[str, Any]) -> dict[str, Any] | None:
    """The chat with its `image_url` parts taken out; None if it has none."""
    messages, found = [], False
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, list):
            kept = [p for p in content if not is_image_part(p)]
            found = found or len(kept) != len(content)
            message = {**message, "content": kept or ""}
        messages.append(message)
    return {**body, "messages": messages} if found else None


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


async def _count(tokenize: Tokenize, body: dict[str, Any], request_id: str) -> int | None:
    async for item in tokenize(body, f"{request_id}-text"):
        if isinstance(item, dict):
            return int(item["usage"]["prompt_tokens"])
    return None


def _with_details(usage: dict[str, Any], text_tokens: int) -> None:
    details = usage.get("prompt_tokens_details") or {}
    details["image_tokens"] = max(int(usage.get("prompt_tokens") or 0) - text_tokens, 0)
    usage["prompt_tokens_details"] = details


def with_image_tokens(
    source: AsyncIterator[EngineOutput], body: dict[str, Any], request_id: str, tokenize: Tokenize
) -> AsyncIterator[EngineOutput]:
    """`source`'s outputs, the usage they carry completed with the images' tokens
    (`source` itself when there are none: no generator layer on the token path)."""
    text_body = without_images(body)
    if text_body is None:
        return source
    return _counted(source, text_body, request_id, tokenize)


async def _counted(
    source: AsyncIterator[EngineOutput],
    text_body: dict[str, Any],
    request_id: str,
    tokenize: Tokenize,
) -> AsyncIterator[EngineOutput]:
    counting = asyncio.create_task(_count(tokenize, text_body, request_id))
    try:
        async for item in source:
            yield await _completed(item, counting)
    finally:
        if not counting.done():
            counting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counting


async def _completed(item: EngineOutput, counting: asyncio.Task[int | None]) -> EngineOutput:
    if isinstance(item, dict) and isinstance(item.get("usage"), dict):
        if (text_tokens := await counting) is not None:
            _with_details(item["usage"], text_tokens)
        return item
    if not isinstance(item, str) or '"usage"' not in item:
        return item
    # an output may hold several events; only one that carries usage changes
    events = []
    for event in item.split("\n\n"):
        if event.startswith("data: {") and '"usage"' in event:
            parsed = json.loads(event[6:])
            if (
                isinstance(parsed.get("usage"), dict)
                and (text_tokens := await counting) is not None
            ):
                _with_details(parsed["usage"], text_tokens)
                event = f"data: {json.dumps(parsed)}"
        events.append(event)
    return "\n\n".join(events)
