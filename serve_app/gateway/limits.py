"""Rate-limit and budget arithmetic: pure, clock passed in, unit-tested without Ray.

Per key: a token bucket for requests per minute, one for tokens per minute (charged with
an estimate on admission and settled with the real count on completion), a concurrency
counter, and monthly token / spend totals checked against the plan's budget. Per agent
session: its requests in flight, and what they may cost at most held against its caps
(`session_grant`), so a swarm admitted all at once cannot pass them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serve_app.config import Price


@dataclass
class Bucket:
    """Refills continuously at `capacity` per minute; may go negative when a request
    used more than estimated, which delays the next admission accordingly."""

    capacity: float
    level: float = math.nan
    updated: float = 0.0

    def __post_init__(self) -> None:
        if math.isnan(self.level):
            self.level = self.capacity

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0 if now). Amounts above the capacity
        are clamped so a large request waits for a full bucket rather than forever."""
        self.refill(now)
        need = min(amount, self.capacity)
        # the epsilon absorbs float rounding, so waiting exactly the answer is enough
        return 0.0 if self.level + 1e-9 >= need else (need - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def reset_in(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self.refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    monthly_token_budget: int | None = None
    monthly_spend_usd: float | None = None
    max_session_tokens: int | None = None
    max_session_spend_usd: float | None = None
    max_concurrent_per_session: int | None = None

    @property
    def caps_sessions(self) -> bool:
        return (
            self.max_session_tokens is not None
            or self.max_session_spend_usd is not None
            or self.max_concurrent_per_session is not None
        )


@dataclass(frozen=True)
class Ask:
    """What admitting one request takes: the estimates its key's rate limits and budgets
    are charged with, and, for its session's caps, the most it can cost: at most
    `prompt_bound` prompt tokens and `output_bound` output tokens (None: no limit set) at
    the tier's `price`."""

    tokens: int
    cost: float
    session: str | None = None
    prompt_bound: int = 0
    output_bound: int | None = None
    price: Price | None = None


@dataclass
class SessionHold:
    """A session's requests in flight, and what they may still cost at most."""

    requests: int = 0
    tokens: int = 0
    spend: float = 0.0

    def add(self, other: SessionHold, sign: int = 1) -> None:
        self.requests += sign * other.requests
        self.tokens += sign * other.tokens
        self.spend += sign * other.spend

    @property
    def empty(self) -> bool:
        return self.requests <= 0


@dataclass(frozen=True)
class Denial:
    status: int  # 429 rate/concurrency, 402 budget
    code: str
    message: str
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the key's x-ratelimit-*


def session_denial(limits: Limits, tokens: int, spend: float) -> Denial | None:
    """A session that has used its cap is refused from then on (a runaway agent loop
    stops there, whichever router replica its next request reaches)."""
    if limits.max_session_tokens is not None and tokens >= limits.max_session_tokens:
        return Denial(
            402,
            "session_budget_exceeded",
            f"this session used {tokens} tokens, its cap is {limits.max_session_tokens}",
        )
    if limits.max_session_spend_usd is not None and spend >= limits.max_session_spend_usd:
        return Denial(
            402,
            "session_budget_exceeded",
            f"this session spent ${spend:.4f}, its cap is ${limits.max_session_spend_usd:.2f}",
        )
    return None


def session_grant(
    limits: Limits, used_tokens: int, used_spend: float, held: SessionHold, ask: Ask
) -> Denial | tuple[int | None, SessionHold]:
    """Admit a request of a capped session only with the most it can cost held against
    what the caps leave after what the session used and what its requests in flight
    hold: its output limit lowered to fit (None: left as it is), and what it holds; or a
    refusal: the cap used up, or not even its prompt fits, or too many in flight."""
    if (used_up := session_denial(limits, used_tokens, used_spend)) is not None:
        return used_up  # said as such: what it used, not what it would hold
    if (cap := limits.max_concurrent_per_session) is not None and held.requests >= cap:
        return Denial(
            429, "session_concurrency_exceeded", f"at most {cap} requests of a session at once", 1.0
        )
    granted = ask.output_bound
    if (cap := limits.max_session_tokens) is not None:
        left = cap - used_tokens - held.tokens - ask.prompt_bound
        if left < 1:
            return _session_full(f"{used_tokens} tokens used and {held.tokens} held", cap)
        granted = left if granted is None else min(granted, left)
    price = ask.price
    if (cap_usd := limits.max_session_spend_usd) is not None and price is not None:
        left_usd = cap_usd - used_spend - held.spend - price.cost(ask.prompt_bound, 0)
        per_token = price.output_per_mtok / 1e6
        if left_usd <= 0 or left_usd < per_token:
            return _session_full(f"${used_spend:.4f} spent and ${held.spend:.4f} held", cap_usd)
        if per_token > 0:
            fits = int(left_usd / per_token)
            granted = fits if granted is None else min(granted, fits)
    output = granted or 0
    spend = price.cost(ask.prompt_bound, output) if price is not None else 0.0
    hold = SessionHold(1, ask.prompt_bound + output, spend)
    lowered = granted if granted is not None and granted != ask.output_bound else None
    return lowered, hold


def _session_full(what: str, cap: float) -> Denial:
    return Denial(
        402,
        "session_budget_exceeded",
        f"this session has {what} for its requests in flight; the most this request"
        f" can cost does not fit under its cap of {cap:g}",
    )


@dataclass
class KeyState:
    limits: Limits
    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0
    month: str = ""
    month_tokens: int = 0
    month_spend: float = 0.0

    def __post_init__(self) -> None:
        self.apply(self.limits)

    def apply(self, limits: Limits) -> None:
        """(Re)configure buckets, keeping levels when the limit did not change."""
        self.limits = limits
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm is None:
            self.requests = None
        elif self.requests is None or self.requests.capacity != rpm:
            self.requests = Bucket(rpm)
        if tpm is None:
            self.tokens = None
        elif self.tokens is None or self.tokens.capacity != tpm:
            self.tokens = Bucket(tpm)

    def roll_month(self, month: str) -> None:
        if month != self.month:
            self.month, self.month_tokens, self.month_spend = month, 0, 0.0

    def check(self, est_tokens: int, est_cost: float, now: float) -> Denial | None:
        lim = self.limits
        if lim.monthly_token_budget is not None and (
            self.month_tokens + est_tokens > lim.monthly_token_budget
        ):
            return Denial(
                402,
                "insufficient_quota",
                f"monthly token budget of {lim.monthly_token_budget} exhausted",
            )
        if (
            lim.monthly_spend_usd is not None
            and self.month_spend + est_cost > lim.monthly_spend_usd
        ):
            return Denial(
                402,
                "insufficient_quota",
                f"monthly spend budget of ${lim.monthly_spend_usd:.2f} exhausted",
            )
        if lim.max_concurrent is not None and self.in_flight >= lim.max_concurrent:
            return Denial(
                429,
                "concurrency_limit_exceeded",
                f"at most {lim.max_concurrent} concurrent requests",
                1.0,
            )
        waits = []
        if self.requests is not None:
            waits.append(("requests", self.requests.wait_for(1, now)))
        if self.tokens is not None:
            waits.append(("tokens", self.tokens.wait_for(est_tokens, now)))
        worst = max(waits, key=lambda w: w[1], default=("", 0.0))
        if worst[1] > 0:
            return Denial(
                429, "rate_limit_exceeded", f"rate limit on {worst[0]} per minute reached", worst[1]
            )
        return None

    def admit(self, est_tokens: int, now: float) -> None:
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            self.tokens.take(est_tokens, now)
        self.in_flight += 1

    def settle(self, est_tokens: int, real_tokens: int, cost: float, now: float) -> None:
        """Replace the admission estimate by the real count."""
        if self.tokens is not None:
            if real_tokens < est_tokens:
                self.tokens.give_back(est_tokens - real_tokens, now)
            else:
                self.tokens.take(real_tokens - est_tokens, now)
        self.in_flight = max(0, self.in_flight - 1)
        self.month_tokens += real_tokens
        self.month_spend += cost

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for what is left after this request."""
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            out[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = f"{bucket.reset_in(now):.3f}s"
        return out
