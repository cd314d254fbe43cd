"""K2.5's reasoning kept for chat-completions clients that drop it from their history.

In thinking mode with tools, K2.5 reads the reasoning of its earlier tool-call turns; most
frameworks rebuild the history without `reasoning_content`. The gateway keeps, per API
key, the reasoning of each answer that called tools, under a fingerprint of the
conversation up to that turn and of the calls themselves (Kimi's call ids,
`functions.NAME:N`, repeat across conversations, so the id alone would mix them up). A
later history that holds the same turn without its reasoning gets it back. Bounded: a
TTL, and per key a count and a size cap, oldest out first.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _arguments(raw: Any) -> Any:
    """Arguments as data where they parse, so a client's re-serialization still matches."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _calls(calls: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            c.get("id"),
            (c.get("function") or {}).get("name"),
            _arguments((c.get("function") or {}).get("arguments")),
        ]
        for c in calls
    ]


def _message(m: dict[str, Any]) -> list[Any]:
    """What identifies a message in a history, reasoning left out (clients drop it)."""
    return [
        m.get("role"),
        _text(m.get("content")),
        m.get("tool_call_id"),
        _calls(m.get("tool_calls") or []),
    ]


def history(messages: list[dict[str, Any]]) -> list[list[Any]]:
    """The messages as a fingerprint reads them (text only: images, reasoning left out)."""
    return [_message(m) for m in messages]


def fingerprint(prefix: list[list[Any]], calls: list[dict[str, Any]]) -> str:
    """A tool-call turn: the `history` before it and its calls."""
    doc = json.dumps([prefix, _calls(calls)], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def unreasoned_turns(messages: list[dict[str, Any]]) -> dict[str, int]:
    """Fingerprint -> index of each assistant tool-call turn that came without reasoning."""
    read = history(messages)
    return {
        fingerprint(read[:i], m["tool_calls"]): i
        for i, m in enumerate(messages)
        if m.get("role") == "assistant" and m.get("tool_calls") and not m.get("reasoning_content")
    }


class ReasoningMemory:
    def __init__(
        self,
        ttl_s: float = 3600.0,
        max_turns_per_key: int = 512,
        max_chars_per_key: int = 4_000_000,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_turns = max_turns_per_key
        self.max_chars = max_chars_per_key
        self._keys: dict[str, OrderedDict[str, tuple[float, str]]] = {}

    def remember(self, key_id: str, print_: str, reasoning: str, now: float | None = None) -> None:
        if not reasoning or len(reasoning) > self.max_chars:
            return
        now = time.time() if now is None else now
        turns = self._keys.setdefault(key_id, OrderedDict())
        turns.pop(print_, None)
        turns[print_] = (now, reasoning)
        size = sum(len(text) for _, text in turns.values())
        while len(turns) > self.max_turns or size > self.max_chars:
            _, (_, text) = turns.popitem(last=False)
            size -= len(text)

    def recall(self, key_id: str, prints: list[str], now: float | None = None) -> dict[str, str]:
        now = time.time() if now is None else now
        turns = self._keys.get(key_id)
        if not turns:
            return {}
        for stale in [p for p, (at, _) in turns.items() if now - at > self.ttl_s]:
            del turns[stale]
        return {p: turns[p][1] for p in prints if p in turns}

    def forget(self, key_id: str) -> None:
        """A revoked key's turns go with it."""
        self._keys.pop(key_id, None)
