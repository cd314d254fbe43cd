"""Leases on admitted requests, so a request is metered once even when the router
replica serving it dies (its settlement lived there).

A request's admission carries a draft of its record and the router's name (`Lease`);
every router renews its open requests with the gateway as it reads the tier loads
(`router.load_refresh_s`), with the tokens relayed so far (and the drafts again of those
a restarted gateway no longer knows). A router silent for `LEASE_S` is gone: the gateway
settles each of its open requests from its draft, as a 502 (the client saw its connection
break), its tokens recorded as last reported, nothing billed. A router that settles a
request itself closes its lease; settlement is idempotent by ticket, so a late
settlement from a router thought gone meters nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass

from pydantic import BaseModel, Field

from serve_app.gateway.usage_records import UsageRecord

LEASE_S = 10.0  # a router that renews every half second and is silent this long is gone
PAUSE_S = LEASE_S / 2  # a gap this long between checks: the gateway was the one silent
LOST = "the router replica serving it was lost"


class Progress(BaseModel):
    """An open request's tokens so far, as its router relayed them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None


class Lease(BaseModel):
    """What an admission leaves with the gateway for the case its router dies."""

    router: str
    draft: UsageRecord


class Renewal(BaseModel):
    """One router's open requests: drafts of those the gateway has not had yet, and the
    progress of all of them."""

    router: str
    opened: dict[str, UsageRecord] = Field(default_factory=dict)
    progress: dict[str, Progress] = Field(default_factory=dict)


@dataclass
class Draft:
    router: str
    record: UsageRecord
    progress: Progress


class LeaseBook:
    """The gateway's side: each router's open requests and when it last renewed."""

    def __init__(self, lease_s: float = LEASE_S, pause_s: float = PAUSE_S) -> None:
        self.lease_s = lease_s
        self.pause_s = pause_s
        self.drafts: dict[str, Draft] = {}
        self.renewed: dict[str, tuple[float, float]] = {}  # router: (monotonic, wall) time
        self.checked_at = time.monotonic()

    def open(self, ticket: str, lease: Lease) -> None:
        self.drafts[ticket] = Draft(lease.router, lease.draft, Progress())
        self.renewed[lease.router] = (time.monotonic(), time.time())  # a sign of life

    def renew(self, renewal: Renewal, settled: Container[str]) -> list[str]:
        """Keep a router's renewal; the tickets it reports that are neither known nor
        settled (the gateway restarted since their drafts came), for it to send again."""
        self.renewed[renewal.router] = (time.monotonic(), time.time())
        for ticket, record in renewal.opened.items():
            if ticket not in settled:
                self.drafts[ticket] = Draft(renewal.router, record, Progress())
        unknown = []
        for ticket, progress in renewal.progress.items():
            if (draft := self.drafts.get(ticket)) is not None:
                draft.progress = progress
            elif ticket not in settled:
                unknown.append(ticket)
        return unknown

    def close(self, ticket: str) -> None:
        self.drafts.pop(ticket, None)

    def lapsed(self) -> list[tuple[str, UsageRecord]]:
        """The open requests of routers silent past the lease, as their final records
        (they leave the book). Called every few seconds: a longer gap means the gateway
        was the one silent (frozen, its loop held up) while the routers' renewals waited
        in its queue, so each router gets a fresh lease instead."""
        now = time.monotonic()
        paused, self.checked_at = now - self.checked_at > self.pause_s, now
        if paused:
            self.renewed = {r: (now, wall) for r, (_, wall) in self.renewed.items()}
            return []
        gone = {r: wall for r, (at, wall) in self.renewed.items() if now - at > self.lease_s}
        out = []
        for ticket, draft in list(self.drafts.items()):
            if draft.router in gone:
                del self.drafts[ticket]
                p, end = draft.progress, gone[draft.router]
                record = draft.record.model_copy(
                    update={
                        "prompt_tokens": p.prompt_tokens,
                        "completion_tokens": p.completion_tokens,
                        "ttft_ms": p.ttft_ms,
                        "latency_ms": max(end - draft.record.time, 0.0) * 1000,
                    }
                )
                out.append((ticket, record))
        for router in gone:
            del self.renewed[router]
        return out
