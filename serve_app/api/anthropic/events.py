"""The chat answer back as Anthropic's: a Message, or its event stream (`EventWriter`), and
errors as Anthropic's error types."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serve_app.api.anthropic.protocol import ANTHROPIC_WORDS
from serve_app.api.anthropic.to_chat import tool_use_id
from serve_app.api.common.sse import sse
from serve_app.reasoning.sealing import Sealer

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(
    choice: dict[str, Any], stop_sequences: list[str] | None, called: bool
) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for an OpenAI choice's ending. A turn
    that calls a tool ends in `tool_use`, also where OpenAI says `stop` (a named call)."""
    matched = choice.get("stop_reason")  # vLLM names the stop string that ended it
    if isinstance(matched, str) and matched in (stop_sequences or ()):
        return "stop_sequence", matched
    reason = STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn")
    return ("tool_use" if called and reason == "end_turn" else reason), None


def usage(openai: dict[str, Any] | None, band: str = "default") -> dict[str, Any]:
    """OpenAI's usage in Anthropic's words, with the band served (`service_tier`)."""
    u = openai or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out = {
        "input_tokens": max((u.get("prompt_tokens") or 0) - cached, 0),
        "output_tokens": u.get("completion_tokens") or 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        "service_tier": ANTHROPIC_WORDS.get(band, "standard"),
    }
    if "cost" in u:
        out["cost_usd"] = u["cost"]
    return out


@dataclass(frozen=True)
class Answering:
    """How answers are written for one request."""

    message_id: str
    model: str  # as the client named it
    stop_sequences: list[str] | None
    sealer: Sealer
    omit_thinking: bool  # `display: "omitted"`: thinking travels in its signature only
    band: str = "default"  # the service tier it is served in (`pipeline/bands.py`)


def message(answer: dict[str, Any], how: Answering) -> dict[str, Any]:
    """A chat completion as an Anthropic message."""
    choice = (answer.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if thought := msg.get("reasoning_content"):
        shown = "" if how.omit_thinking else thought
        content.append(
            {"type": "thinking", "thinking": shown, "signature": how.sealer.seal(thought)}
        )
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.get("id") or ""),
                "name": fn.get("name", ""),
                "input": arguments(fn.get("arguments")),
            }
        )
    called = any(block["type"] == "tool_use" for block in content)
    reason, sequence = stop_reason(choice, how.stop_sequences, called)
    return {
        "id": how.message_id,
        "type": "message",
        "role": "assistant",
        "model": how.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(answer.get("usage"), how.band),
    }


def arguments(text: Any) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is (the tiers' grammars and
    parsers only let whole objects through; anything else is kept, not lost)."""
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {"_raw": str(text)}
    return value if isinstance(value, dict) else {"_value": value}


# ---- stream ---------------------------------------------------------------------------


BLOCK_STARTS: dict[str, dict[str, str]] = {
    "thinking": {"type": "thinking", "thinking": "", "signature": ""},
    "text": {"type": "text", "text": ""},
}


class EventWriter:
    """OpenAI chat chunks in, Anthropic's stream events out: one content block open at a
    time (thinking, text or a tool_use), closed when the next kind starts or the message
    ends; the ending and usage in `message_delta`."""

    def __init__(self, how: Answering) -> None:
        self.how = how
        self.thought: list[str] = []  # the open thinking block's text, sealed at its end
        self.index = -1  # the open block's index
        self.open: str | None = None  # its kind
        self.calls: dict[int, int] = {}  # the chunk's tool call index -> block index
        self.choice: dict[str, Any] = {}  # finish_reason and stop_reason, once sent
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def start(self) -> str:
        head = {
            "id": self.how.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.how.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(None, self.how.band),
        }
        return sse({"type": "message_start", "message": head}) + sse({"type": "ping"})

    def chunk(self, event: dict[str, Any]) -> str:
        out: list[str] = []
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if text := delta.get("reasoning_content"):
                out += self._thinking(text)
            if text := delta.get("content"):
                out += self._text(text)
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            if choice.get("finish_reason"):
                self.choice = choice
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        return "".join(out)

    def _thinking(self, text: str) -> list[str]:
        out = self._enter("thinking")
        self.thought.append(text)
        if not self.how.omit_thinking:
            out.append(self._block_delta({"type": "thinking_delta", "thinking": text}))
        return out

    def _text(self, text: str) -> list[str]:
        return [*self._enter("text"), self._block_delta({"type": "text_delta", "text": text})]

    def _enter(self, kind: str) -> list[str]:
        """Into a block of `kind`: the open one, or a new one after closing it."""
        return [] if self.open == kind else self._begin(kind, dict(BLOCK_STARTS[kind]))

    def _block_delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta})

    def _call(self, call: dict[str, Any]) -> list[str]:
        out: list[str] = []
        position = call.get("index", 0)
        fn = call.get("function") or {}
        if position not in self.calls:
            block = {
                "type": "tool_use",
                "id": tool_use_id(call.get("id") or f"functions.call:{position}"),
                "name": fn.get("name") or "",
                "input": {},
            }
            out += self._begin("tool_use", block)
            self.calls[position] = self.index
        if fn.get("arguments") and self.calls[position] == self.index:
            out.append(
                self._block_delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
            )
        return out

    def _begin(self, kind: str, block: dict[str, Any]) -> list[str]:
        out = self._close()
        self.index += 1
        self.open = kind
        out.append(
            sse({"type": "content_block_start", "index": self.index, "content_block": block})
        )
        return out

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            sealed = self.how.sealer.seal("".join(self.thought))
            out.append(self._block_delta({"type": "signature_delta", "signature": sealed}))
            self.thought = []
        self.open = None
        return [*out, sse({"type": "content_block_stop", "index": self.index})]

    def finish(self) -> str:
        """The message's end: its stop reason and usage (input tokens included, which
        are known only now)."""
        if self.ended:
            return ""
        self.ended = True
        reason, sequence = stop_reason(self.choice, self.how.stop_sequences, bool(self.calls))
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage(self.usage, self.how.band),
        }
        return "".join([*self._close(), sse(delta), sse({"type": "message_stop"})])

    def error(self, error: dict[str, Any], status: int) -> str:
        self.ended = True
        return sse(
            {
                "type": "error",
                "error": {"type": error_type(status), "message": error.get("message", "")},
            }
        )


# Anthropic's error types by HTTP status; 503 (saturated, or a tier down) is its 529.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_status(status: int) -> int:
    return 529 if status == 503 else status


def error_type(status: int) -> str:
    status = error_status(status)
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"
