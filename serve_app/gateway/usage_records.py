"""The usage record: one per request, whatever its end, and what it is charged."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel


class RequestLabels(BaseModel):
    """Who asked for what, and which tier served it."""

    request_id: str
    key_id: str
    plan: str
    tier: str
    model: str
    endpoint: str
    stream: bool
    degraded: bool = False
    api: str = "openai"  # the wire format it came in (openai, anthropic)
    session_id: str | None = None  # the client's conversation, where it names one
    service_tier: str = "default"  # the band it was served (and priced) in


def billable(status: int) -> bool:
    """Whether a request that ended with `status` is charged for. An answer is (200), and
    so is a stream its client left (499: it had what it read). A request whose client got
    an error is not: its tokens stay on the record, at no charge, and spend no budget."""
    return status < 400 or status == 499


class UsageRecord(RequestLabels):
    time: float
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    media_tokens: int = 0  # of prompt_tokens, those the request's images took
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    error: str | None = None

    @property
    def billed(self) -> bool:
        return billable(self.status)

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.time, UTC).strftime("%Y-%m-%d")
