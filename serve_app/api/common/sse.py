"""Server-sent events both ways, pure: the pipeline's OpenAI chunk stream read back into
chunks, and typed events (Anthropic's, the Responses API's) written."""

from __future__ import annotations

import json
from typing import Any

DONE = "[DONE]"


def sse(event: dict[str, Any]) -> str:
    """A typed event (Anthropic's and the Responses API's streams name each event)."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def sse_payloads(text: str) -> list[dict[str, Any] | str]:
    """The chunks in a piece of the pipeline's OpenAI event stream (several events may
    come in one string), parsed; `DONE` for its end marker."""
    out: list[dict[str, Any] | str] = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            payload = event[6:]
            out.append(DONE if payload == DONE else json.loads(payload))
    return out


def stream_error_status(error: dict[str, Any]) -> int:
    """The HTTP status an error event in a stream stands for."""
    if error.get("code") == "request_timeout":
        return 504
    return 400 if error.get("type") == "invalid_request_error" else 500
