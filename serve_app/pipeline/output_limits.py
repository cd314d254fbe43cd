"""A request's output limit against its plan's (or key's) cap: refused past it, lowered
to it where the adapter asks (`Inbound.clamp_output`), filled in where none was asked."""

from __future__ import annotations

from deployments.engines.openai_shape import output_limit
from serve_app.config import AppConfig, Plan
from serve_app.errors import APIError, OutputCapExceeded
from serve_app.gateway.protocol import Caller
from serve_app.pipeline.request import Inbound


def output_cap(plan: Plan, caller: Caller) -> int | None:
    """The most output tokens a request may ask for: the key's own cap, or its plan's."""
    return caller.overrides.max_output_tokens or plan.max_output_tokens


def clamp_output(config: AppConfig, inbound: Inbound, caller: Caller) -> None:
    """Lower `max_tokens` to what the plan and its longest tier allow (it is an upper
    bound; agent CLIs ask for more than any tier here has): a thinking budget keeps room
    for the answer."""
    plan = config.plans[caller.plan]
    cap = output_cap(plan, caller)
    longest = max(config.tier(t).max_context for t in plan.tiers)
    room = max(longest - inbound.prompt_floor(), 1)
    limit = min(cap or room, room)
    if output_limit(inbound.body) is not None:  # none asked (a token count): none set
        lower_output_limit(inbound.body, limit)


def lower_output_limit(body: dict, limit: int) -> None:
    """`max_tokens` at most `limit` (set where none was): a thinking budget keeps room
    for the answer."""
    asked = output_limit(body)
    if asked is not None and asked <= limit:
        return
    body["max_tokens"] = limit
    body.pop("max_completion_tokens", None)
    budget = body.get("thinking_token_budget")
    if budget is not None and budget >= limit:
        body["thinking_token_budget"] = max(1, limit // 2)


def refuse_past_cap(config: AppConfig, inbound: Inbound, caller: Caller) -> None:
    """Refuse a max output past the plan's (or key's) cap, before any tier is chosen."""
    cap = output_cap(config.plans[caller.plan], caller)
    asked = output_limit(inbound.body)
    if cap is not None and asked is not None and asked > cap:
        raise OutputCapExceeded(asked, cap)


def fill_output_limit(inbound: Inbound, plan: Plan, caller: Caller, default: int) -> int:
    """Write the cap into the body as `max_tokens` where the request set none, and
    return the max output to admit against (`default` where neither sets one). A cap
    exceeded was refused or clamped before routing."""
    cap = output_cap(plan, caller)
    asked = output_limit(inbound.body)
    if cap is not None and asked is None:
        inbound.body["max_tokens"] = asked = cap
    floor = inbound.request.min_tokens
    if floor is not None and asked is not None and floor > asked:
        raise APIError(400, f"min_tokens exceeds max_tokens ({asked})", param="min_tokens")
    return asked or default
