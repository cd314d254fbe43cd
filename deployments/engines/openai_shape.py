"""One response shape whichever engine served: small rewrites of engine JSON and SSE;
and the few request fields every engine reads the same way.

vLLM 0.32 names the reasoning field `reasoning`; Kimi's own API and llama.cpp say
`reasoning_content`, so both engines answer with `reasoning_content`. llama.cpp's
`timings` block is engine-internal and dropped. A message always carries `content`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.spec import TierSpec

ENGINE_ONLY_KEYS = ("timings",)
# What renders a chat's prompt (for a template or a token count).
PROMPT_FIELDS = ("messages", "tools", "chat_template_kwargs")


def normalize_response(body: dict[str, Any]) -> dict[str, Any]:
    for key in ENGINE_ONLY_KEYS:
        body.pop(key, None)
    for choice in body.get("choices") or ():
        for part in ("message", "delta"):
            msg = choice.get(part)
            if not isinstance(msg, dict):
                continue
            if "reasoning" in msg:
                msg.setdefault("reasoning_content", msg.pop("reasoning"))
        message = choice.get("message")
        if isinstance(message, dict):
            message.setdefault("content", None)  # OpenAI sends null rather than omitting it
    return body


def normalize_sse(event: str) -> str:
    """Rewrite one `data: {...}` SSE event; `[DONE]` and comments pass through."""
    payload = event[6:].strip() if event.startswith("data: ") else ""
    if not payload.startswith("{"):
        return event
    needs = '"reasoning"' in payload or any(f'"{k}"' in payload for k in ENGINE_ONLY_KEYS)
    if not needs:
        return event
    return f"data: {json.dumps(normalize_response(json.loads(payload)))}\n\n"


def output_limit(body: dict[str, Any]) -> int | None:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(limit) if limit else None


def thinking_on(body: dict[str, Any]) -> bool:
    """K2.5's template thinks unless `chat_template_kwargs.thinking` is false."""
    return (body.get("chat_template_kwargs") or {}).get("thinking", True) is not False


def calls_offered(body: dict[str, Any]) -> bool:
    """The request lets the model call tools."""
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def call_forced(body: dict[str, Any]) -> bool:
    """`tool_choice` is `required` or names a function: a call must come."""
    choice = body.get("tool_choice")
    return calls_offered(body) and (choice == "required" or isinstance(choice, dict))


ANY_OBJECT: dict[str, Any] = {"type": "object"}


def answer_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema the answer must match (`json_object`: any object), or None."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or ANY_OBJECT
    if fmt.get("type") == "json_object":
        return ANY_OBJECT
    return None


def reasoning_budget(body: dict[str, Any], spec: TierSpec) -> int | None:
    """The thinking tokens a turn may spend: what the request asks for, and where an
    answer must come (a forced call, JSON) no more than leaves room for it."""
    asked = body.get("thinking_token_budget")
    must_answer = call_forced(body) or answer_schema(body) is not None
    fitted = spec.thinking_budget(output_limit(body)) if must_answer else None
    bounds = [b for b in (asked, fitted) if b is not None]
    return min(bounds) if bounds else None
