"""One request as the pipeline sees it: what an adapter hands over (`Inbound`), where it
may go (`Route`), its state from admission to settlement (`RequestContext`), and what
comes back (`Completed`, `Streamed`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.protocol import Endpoint
from serve_app.canonical import ChatRequest, CompletionRequest
from serve_app.config import DEFAULT_BAND, Band, Plan, Price, ServiceTier, TierEntry
from serve_app.gateway.protocol import Admission, Caller
from serve_app.pipeline.bands import banded
from serve_app.pipeline.media import Media
from serve_app.pipeline.relay import RequestMeter, StreamSettlement
from serve_app.reasoning.sealing import Opened
from serve_app.routing.fair_queue import Slot
from serve_app.routing.tier_choice import LoadPolicy, estimate_tokens


@dataclass(frozen=True)
class Inbound:
    """A request as every adapter hands it over: validated, in the canonical (OpenAI
    chat or completion) shape the engines take."""

    endpoint: Endpoint
    request: ChatRequest | CompletionRequest
    body: dict[str, Any]  # the engine body (`schemas.canonical_body`)
    body_bytes: int
    api_key: str | None
    request_id: str
    session: str | None = None  # the client's conversation id, for replica affinity
    strategy: str | None = None  # a routing strategy asked for per request
    api: str = "openai"  # the wire format, for the usage record
    clamp_output: bool = False  # max_tokens past the limits is lowered, not refused
    caller: Caller | None = None  # already identified by the adapter (`Pipeline.identify`)
    media: Media = field(default_factory=Media)  # its images, checked (`prepare_images`)
    opened: Opened | None = None  # what the earlier turns' sealed reasoning gave back
    service_tier: str | None = None  # the band asked for, in OpenAI's words

    @property
    def text_bytes(self) -> int:
        """The body without its inline image data: what stands for the prompt's text
        (messages, tools and schemas all reach it)."""
        return self.body_bytes - self.media.data_chars

    def prompt_estimate(self) -> int:
        """The prompt's tokens at ~4 bytes a token, images counted apart: what admission
        and the fair queue charge before the engine's count is known."""
        return self.text_bytes // 4 + self.media.tokens

    def prompt_floor(self) -> int:
        """A low estimate of the prompt's tokens, for context fit."""
        return estimate_tokens(self.text_bytes) + self.media.tokens


@dataclass(frozen=True)
class Completed:
    body: dict[str, Any]  # the OpenAI-shaped answer, `usage.cost` filled in
    headers: dict[str, str]


@dataclass
class Streamed:
    """An answer as a stream of OpenAI-shaped SSE events (`data: ...\\n\\n`, several may
    come in one string). The consumer calls `started()` once it starts sending and
    `close()` when it ends by any path; the record is settled exactly once either way."""

    events: AsyncIterator[str]
    settlement: StreamSettlement
    headers: dict[str, str]

    def started(self) -> None:
        self.settlement.delivered = True

    async def close(self) -> None:
        await self.settlement.abandon()


Result = Completed | Streamed


@dataclass(frozen=True)
class Route:
    """Who asks, under which plan, and the tiers that may serve it, best first."""

    caller: Caller
    plan: Plan
    policy: LoadPolicy
    candidates: list[TierEntry]
    tier: TierEntry  # the first choice
    degraded: bool  # the first choice is not the plan's first tier
    skipped: tuple[str, ...] = ()  # plan tiers passed over: "premium (no vision)"
    band: ServiceTier = "default"  # the service tier it is served in
    terms: Band = DEFAULT_BAND  # what that band changes: price and fair-queue weight


@dataclass
class RequestContext:
    """One request's state from admission to settlement."""

    inbound: Inbound
    route: Route
    tier: TierEntry  # serving it now
    meter: RequestMeter
    admission: Admission
    headers: dict[str, str]
    timeout_s: float | None
    wants_usage: bool  # as the client asked; engines are always asked for usage
    settled: bool = False
    others: list[TierEntry] = field(default_factory=list)  # where it may still move
    slot: Slot | None = None  # its place in the tier's fair queue, held until settled

    @property
    def id(self) -> str:
        return self.inbound.request_id

    def leave_queue(self, output_tokens: int = 0) -> None:
        """Give the tier's place back (its output charged to the caller's share)."""
        if self.slot is not None:
            self.slot.close(output_tokens)
            self.slot = None

    def move_to(self, tier: TierEntry) -> None:
        """Serve it on `tier` instead; it stays one request, timed from its start."""
        self.tier = tier
        self.others = [c for c in self.others if c is not tier]
        labels = self.meter.labels.model_copy(update={"tier": tier.name, "degraded": True})
        price = price_of(self.inbound, tier, self.route.terms)
        self.meter = RequestMeter(labels=labels, price=price, started=self.meter.started)
        self.headers.update(
            {
                "x-kimi-tier": tier.name,
                "x-kimi-retried": "1",
                "x-kimi-degraded": f"{self.route.candidates[0].name}->{tier.name}",
            }
        )


FREE = Price(input_per_mtok=0, output_per_mtok=0)


def price_of(inbound: Inbound, tier: TierEntry, band: Band) -> Price:
    """What the tier charges for this request in its band: counting a prompt is free."""
    return FREE if inbound.endpoint is Endpoint.TOKENIZE else banded(tier.price, band)


def session_of(inbound: Inbound) -> str | None:
    """The session a request is metered (and capped) under, as its record names it."""
    return inbound.session[:200] if inbound.session else None
