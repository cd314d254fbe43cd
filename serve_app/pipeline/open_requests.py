"""This router's admitted requests not yet settled, and their leases' renewal: the
gateway settles them from their drafts if this replica dies (`gateway/leases.py`)."""

from __future__ import annotations

import logging
import uuid

from serve_app.gateway.protocol import (
    LOST,
    Gateway,
    Lease,
    Progress,
    Renewal,
    UsageRecord,
)
from serve_app.pipeline.relay import RequestMeter

log = logging.getLogger("serve_app.pipeline.open_requests")


def draft_of(meter: RequestMeter) -> UsageRecord:
    """A request's record as it would read if this router died before settling it."""
    return meter.record(502, LOST)


def progress_of(meter: RequestMeter) -> Progress:
    usage = meter.counted()
    return Progress(
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        ttft_ms=meter.ttft_ms,
    )


class OpenRequests:
    def __init__(self, replica: str) -> None:
        # this process's name: Ray may restart a dead replica under the same id, and the
        # new process must not renew the leases of the old one's requests
        self.router = f"{replica}/{uuid.uuid4().hex[:8]}"
        self.open: dict[str, RequestMeter] = {}  # by ticket
        self.resend: set[str] = set()  # tickets a restarted gateway asked for again

    def lease(self, meter: RequestMeter) -> Lease:
        """What a request's admission leaves with the gateway."""
        return Lease(router=self.router, draft=draft_of(meter))

    def add(self, ticket: str, meter: RequestMeter) -> None:
        self.open[ticket] = meter

    def close(self, ticket: str) -> None:
        self.open.pop(ticket, None)
        self.resend.discard(ticket)

    def renewal(self) -> Renewal:
        return Renewal(
            router=self.router,
            opened={t: draft_of(m) for t in self.resend if (m := self.open.get(t)) is not None},
            progress={t: progress_of(m) for t, m in self.open.items()},
        )

    async def renew(self, gateway: Gateway) -> None:
        """Renew every open request's lease (nothing to do while none is open)."""
        if not self.open:
            return
        renewal = self.renewal()
        try:
            unknown = await gateway.renew(renewal)
        except Exception as exc:  # the gateway restarting: the next renewal carries on
            log.warning("renewing %d leases failed: %r", len(renewal.progress), exc)
            return
        self.resend.difference_update(renewal.opened)
        self.resend.update(t for t in unknown if t in self.open)
