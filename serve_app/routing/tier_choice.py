"""Tier choice: a pure policy over the plan, the catalogue and the request's needs.

`candidate_tiers` answers which tiers may serve a request (or why none may): the plan's
tiers, or the one it pins, that have the capabilities and the context the request needs.
`choose_tier` picks one from the plan's order and the tiers' live figures (the engines'
own running/waiting counts, summed over a tier's replicas, and the time to first token
the routers observed recently against the tier's objective), spilling degradable plans
to a cheaper tier under overload and shedding the lowest-priority plans first.
Documented in docs/routing.md.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from deployments.protocol import EngineLoad
from serve_app.canonical import ChatRequest, CompletionRequest
from serve_app.config import BASE_MODEL, AppConfig, Plan, Strategy, TierEntry
from serve_app.errors import APIError, ContextOverflow


@dataclass(frozen=True)
class Needs:
    tools: bool = False
    thinking: bool = True
    vision: bool = False
    json_schema: bool = False
    context_tokens: int = 0  # a low estimate of prompt + requested output

    @property
    def capabilities(self) -> bool:
        """Whether the request needs a capability some tier may lack."""
        return self.vision or self.tools or self.json_schema


def needs_of(
    request: ChatRequest | CompletionRequest, prompt_tokens: int, output: int | None
) -> Needs:
    """`prompt_tokens` is a low estimate (`estimate_tokens` of the body, images counted
    apart)."""
    context = prompt_tokens + (output or 0)
    if not isinstance(request, ChatRequest):
        return Needs(context_tokens=context)
    fmt = request.response_format.type if request.response_format else None
    return Needs(
        tools=bool(request.tools) and request.tool_choice != "none",
        thinking=request.thinking,
        vision=request.wants_vision,
        json_schema=fmt in ("json_schema", "json_object"),
        context_tokens=context,
    )


def estimate_tokens(chars: int) -> int:
    """A deliberately low token estimate for `chars` characters of text (~6 a token;
    real text runs 3-4), so a request is never refused for a context it would fit;
    the engine still enforces the exact limit."""
    return chars // 6


def resolve_alias(model: str, plan: Plan, config: AppConfig) -> str:
    """The model an alias names (an agent CLI's own model name). An alias to a tier the
    plan may not pin means the plan's own tiers: the alias prefers, the plan decides."""
    target = config.alias(model)
    if target is None:
        return model
    tier = target.partition(":")[2]
    if tier and (tier not in plan.tiers or not plan.allow_pin):
        return BASE_MODEL
    return target


def plan_tiers(model: str, plan: Plan, plan_name: str, config: AppConfig) -> list[str]:
    """The tiers `model` names for this plan: the plan's own for the base model, the
    one a pinned model names if the plan allows pinning it."""
    if model == BASE_MODEL:
        return plan.tiers
    tier = model.split(":", 1)[1] if model.startswith(f"{BASE_MODEL}:") else None
    if tier is None or tier not in {t.name for t in config.tiers}:
        raise APIError(
            404,
            f"The model '{model}' does not exist",
            param="model",
            code="model_not_found",
        )
    if tier not in plan.tiers or not plan.allow_pin:
        raise APIError(
            403,
            f"Plan '{plan_name}' may not use '{model}'",
            param="model",
            code="tier_not_in_plan",
        )
    return [tier]


def named_tiers(model: str, plan: Plan, plan_name: str, config: AppConfig) -> list[TierEntry]:
    """The tiers `model` (or the alias it is) names for this plan, in its order."""
    names = plan_tiers(resolve_alias(model, plan, config), plan, plan_name, config)
    return [config.tier(n) for n in names]


def lacking_tiers(
    model: str, plan: Plan, plan_name: str, config: AppConfig, needs: Needs
) -> list[tuple[TierEntry, str]]:
    """The tiers `model` names for this plan that lack a capability the request needs."""
    if not needs.capabilities:
        return []
    tiers = named_tiers(model, plan, plan_name, config)
    return [(t, lacking) for t in tiers if (lacking := missing_capability(t, needs))]


def candidate_tiers(
    model: str, plan: Plan, plan_name: str, config: AppConfig, needs: Needs
) -> list[TierEntry]:
    tiers = named_tiers(model, plan, plan_name, config)
    able = [t for t in tiers if missing_capability(t, needs) is None]
    if not able:
        lacking = missing_capability(tiers[0], needs)
        raise APIError(
            400,
            f"'{model}' cannot serve this request: {lacking} is not supported"
            f" on tier '{tiers[0].name}'",
            param="messages" if lacking == "vision" else None,
            code="capability_unsupported",
        )
    fits = [t for t in able if t.max_context >= needs.context_tokens]
    if not fits:
        raise ContextOverflow(needs.context_tokens, max(t.max_context for t in able))
    return fits


def missing_capability(tier: TierEntry, needs: Needs) -> str | None:
    caps = tier.capabilities
    if needs.vision and not caps.vision:
        return "vision"
    if needs.tools and not caps.tools:
        return "tools"
    if needs.json_schema and not caps.json_schema:
        return "response_format"
    return None


@dataclass(frozen=True)
class LoadPolicy:
    """When a tier counts as overloaded, and when low-priority plans are shed."""

    overload_pressure: float = 1.0  # (running + waiting) / capacity above which to spill
    shed_pressure: float = 2.0  # above this on the chosen tier, low plans are refused
    shed_below_priority: int = 1  # plans with a lower priority are shed first
    # "load" is the product; "plan_only" (always the plan's first tier) and "random" (any
    # allowed tier) are the baselines benchmarks/routing_quality.py compares it with.
    strategy: Strategy = "load"


@dataclass(frozen=True)
class Live:
    """What the router knows of a tier right now."""

    loads: Mapping[str, EngineLoad] = field(default_factory=dict)
    ttft_p90_ms: Mapping[str, float] = field(default_factory=dict)  # recent, per tier
    # requests this router sent to each tier since `loads` was read: a burst counts at
    # once instead of half a second later
    sent: Mapping[str, int] = field(default_factory=dict)
    # requests waiting at the routers' fair queues (the board's sum over every router):
    # demand on the tier as real as the engines' own waiting
    queued: Mapping[str, int] = field(default_factory=dict)

    def pressure(self, tier: str) -> float:
        return pressure(self.loads.get(tier), self.sent.get(tier, 0) + self.queued.get(tier, 0))


@dataclass(frozen=True)
class Decision:
    tier: TierEntry
    degraded: bool = False  # served by a later tier than the plan's first choice
    shed: bool = False  # refuse now (503 + Retry-After) rather than queue


class LatencyWindow:
    """Times to first token per tier over the last `window_s`; its p90 once there are
    `min_samples` (one slow request is not a trend, and old ones must not hold a spill
    after the tier recovered)."""

    def __init__(self, window_s: float = 30.0, min_samples: int = 5, keep: int = 512) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        self._keep = keep

    def observe(self, tier: str, ms: float, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        self._samples.setdefault(tier, deque(maxlen=self._keep)).append((at, ms))

    def p90_ms(self, now: float | None = None) -> dict[str, float]:
        return self.quantile_ms(0.9, now)

    def counts(self, now: float | None = None) -> dict[str, int]:
        """The samples each tier's quantiles rest on now."""
        return {tier: len(self._fresh(tier, now)) for tier in self._samples}

    def _fresh(self, tier: str, now: float | None) -> deque[tuple[float, float]]:
        now = time.monotonic() if now is None else now
        samples = self._samples[tier]
        while samples and now - samples[0][0] > self.window_s:
            samples.popleft()
        return samples

    def quantile_ms(self, q: float, now: float | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for tier in self._samples:
            samples = self._fresh(tier, now)
            if len(samples) >= self.min_samples:
                ordered = sorted(ms for _, ms in samples)
                out[tier] = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return out


def pressure(load: EngineLoad | None, extra: int = 0) -> float:
    if load is None:
        return 0.0
    return (load.running + load.waiting + extra) / max(load.capacity, 1)


def overloaded(tier: TierEntry, live: Live, policy: LoadPolicy) -> bool:
    """Over its batch capacity, or missing its time-to-first-token objective."""
    if live.pressure(tier.name) > policy.overload_pressure:
        return True
    slo = tier.slo.ttft_ms
    ttft = live.ttft_p90_ms.get(tier.name)
    return slo is not None and ttft is not None and ttft > slo


def up(tier: TierEntry, loads: Mapping[str, EngineLoad]) -> bool:
    """Whether a tier can serve now, as far as the figures tell (none at all: nothing is
    known yet, so every tier is taken to be up)."""
    load = loads.get(tier.name)
    if load is None:  # no replica reports: scaled to zero, or lost with its node
        return not loads or tier.autoscaling.min_replicas == 0
    return load.healthy


def choose_tier(
    candidates: list[TierEntry],
    live: Live | None = None,
    plan: Plan | None = None,
    policy: LoadPolicy | None = None,
) -> Decision:
    """Pick a tier from the plan's candidates (in preference order) and the live figures.

    - Tiers that are down are skipped (unless all are): unhealthy ones, and those that
      report nothing though they keep replicas (their node was lost). A tier that may
      scale to zero and reports nothing is up: a request wakes it.
    - The first healthy tier serves while it is not overloaded (pressure at or below
      `overload_pressure`, recent TTFT p90 within the tier's objective). Otherwise a plan
      that may degrade spills to the first later tier that is not overloaded; a plan
      that may not keeps its tier and queues there.
    - Plans below `shed_below_priority` are refused (shed) when the tier they would get
      is above `shed_pressure`, so that higher plans keep their latency.
    """
    live = live or Live()
    policy = policy or LoadPolicy()
    if policy.strategy == "plan_only":
        return Decision(tier=candidates[0])
    if policy.strategy == "random":
        chosen = random.choice(candidates)
        return Decision(tier=chosen, degraded=chosen is not candidates[0])
    loads = live.loads
    healthy = [t for t in candidates if up(t, loads)]
    healthy = healthy or candidates
    chosen = healthy[0]
    if plan is not None and plan.allow_degrade and overloaded(chosen, live, policy):
        spill = next((t for t in healthy[1:] if not overloaded(t, live, policy)), None)
        chosen = spill or chosen
    shed = (
        plan is not None
        and plan.priority < policy.shed_below_priority
        and live.pressure(chosen.name) > policy.shed_pressure
    )
    return Decision(tier=chosen, degraded=chosen is not candidates[0], shed=shed)
