"""K2.5's thinking mode as every wire format asks for it: an effort becomes a thinking
budget, a share of the output the reasoning may spend before the answer starts."""

from __future__ import annotations

from typing import Any

# The share of max_tokens that thinking may spend, by effort (None: no bound but
# max_tokens itself). Anthropic's efforts and OpenAI's reasoning efforts.
EFFORT_SHARE: dict[str, float | None] = {
    "low": 0.125,
    "medium": 0.25,
    "high": 0.5,
    "xhigh": None,
    "max": None,
}


def thinking_fields(on: bool, budget: int | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"chat_template_kwargs": {"thinking": on}}
    if on and budget is not None:
        fields["thinking_token_budget"] = budget
    return fields


def effort_budget(effort: str, max_tokens: int | None) -> int | None:
    share = EFFORT_SHARE.get(effort)
    if share is None or max_tokens is None:
        return None
    return max(1, int(max_tokens * share))
