"""Relaying a tier's answer while metering it (the pipeline's part of a stream).

The usage record is settled (durably metered) before the client receives the end of its
answer: the JSON body for a plain request, `data: [DONE]` for a stream. A stream the
client abandons is settled too, with the tokens it had received counted (billed, unless
it left while the stream had stalled on our side past `router.stream_stall_s`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.protocol import EngineError
from serve_app.config import Price
from serve_app.gateway.protocol import RequestLabels, UsageRecord, billable

log = logging.getLogger("serve_app.pipeline.relay")

Settle = Callable[[UsageRecord], Awaitable[None]]
DONE = "data: [DONE]"
END = object()  # a tier call's end


@dataclass
class RequestMeter:
    labels: RequestLabels
    price: Price
    started: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)
    first_at: float | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0

    def cost(self, usage: dict[str, Any]) -> float:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return round(
            self.price.cost(
                usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), cached
            ),
            9,
        )

    def counted(self) -> dict[str, Any]:
        """The usage so far: the engine's once it reported it, else the chunks relayed."""
        return self.usage or {"prompt_tokens": 0, "completion_tokens": self.chunks}

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_at is None else (self.first_at - self.started) * 1000

    def record(self, status: int, error: str | None = None) -> UsageRecord:
        usage = self.counted()
        now = time.monotonic()
        return UsageRecord(
            **self.labels.model_dump(),
            time=self.wall,
            status=status,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            reasoning_tokens=(usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
            or 0,
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            media_tokens=(usage.get("prompt_tokens_details") or {}).get("image_tokens") or 0,
            ttft_ms=self.ttft_ms,
            latency_ms=(now - self.started) * 1000,
            cost_usd=self.cost(usage) if billable(status) else 0.0,
            error=error,
        )


def add_cost(body: dict[str, Any], meter: RequestMeter) -> float:
    """The answer's (or the stream's usage chunk's) cost, written into its usage, and
    the band it was served in (OpenAI's `service_tier`)."""
    body["service_tier"] = meter.labels.service_tier
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0.0
    meter.usage = usage
    usage["cost"] = meter.cost(usage)
    return float(usage["cost"])


def usage_chunk(chunk: str) -> dict[str, Any] | None:
    """The parsed event if this SSE chunk carries usage (cheap test first)."""
    if '"usage"' not in chunk or chunk.startswith(DONE):
        return None
    try:
        event = json.loads(chunk[6:])
    except ValueError:
        return None
    return event if isinstance(event.get("usage"), dict) else None


def timeout_error(timeout_s: float) -> EngineError:
    return EngineError(
        status_code=504,
        message=f"the request exceeded its plan's time limit of {timeout_s:g} s",
        type="timeout",
        code="request_timeout",
    )


@dataclass(eq=False)  # kept in sets by identity
class StreamSettlement:
    """Settles a stream's usage record exactly once, however the stream ends."""

    meter: RequestMeter
    settle: Settle
    gen: Any  # the tier call, cancelled when the client goes
    settled: bool = False
    delivered: bool = False  # the response started; from then on it settles itself
    created: float = field(default_factory=time.monotonic)
    # a client that leaves a stream in which nothing came for this long left because of
    # us: a router frozen with its node holds its stream until the client gives up, and
    # on waking may read what its tier had buffered before it learns the client is gone
    stall_s: float | None = None
    last_at: float = field(default_factory=time.monotonic)  # the tier's last message
    longest_gap_s: float = 0.0  # the longest silence between the tier's messages

    def heard(self) -> None:
        """A message came from the tier."""
        now = time.monotonic()
        self.longest_gap_s = max(self.longest_gap_s, now - self.last_at)
        self.last_at = now

    async def finish(self, status: int, err: str | None) -> None:
        if self.settled:
            return
        self.settled = True
        await self.settle(self.meter.record(status, err))

    async def abandon(self) -> None:
        """The client went: a 499 billed for what it had, unless the stream had stalled
        (nothing came for longer than the stall bound, at any point; the failure is then
        ours: a 503, not billed)."""
        if self.settled:
            return
        self.gen.cancel()  # the engine stops generating for it; not every caller is Ray
        silent = max(self.longest_gap_s, time.monotonic() - self.last_at)
        if self.delivered and self.stall_s is not None and silent > self.stall_s:
            await self.finish(503, f"the client left after the stream stalled {silent:.0f} s")
        else:
            await self.finish(499, "client disconnected")


class SilentReplicas:
    """Streams whose tier replica fell silent are ended: one that has sent nothing for
    `stall_s` while its replica is missing from the load board (no report for 3 s: its
    process or node stopped) gets a retryable error event and is settled (503), instead
    of waiting for Ray to declare the node dead. A replica that still reports is slow,
    not gone: its streams wait (the plan's time limit bounds them)."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.relays: set[StreamRelay] = set()

    def sweep(self, reporting: set[str]) -> int:
        """Stall the silent streams, given the replicas reporting now; how many."""
        now, stalled = time.monotonic(), 0
        for relay in list(self.relays):
            if relay.state.settled:
                self.relays.discard(relay)
            elif (
                relay.replica is not None
                and relay.replica not in reporting
                and now - relay.last_at > self.stall_s
            ):
                self.relays.discard(relay)
                relay.stall()
                stalled += 1
        return stalled


class UndeliveredStreams:
    """Streams handed to the web framework whose response never started: a client that
    hangs up at that moment cancels the request task before the response runs, and
    nothing else would settle the record or cancel the tier call."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self._open: set[StreamSettlement] = set()

    def add(self, state: StreamSettlement) -> None:
        self._open.add(state)

    async def reap(self) -> int:
        now, reaped = time.monotonic(), 0
        for state in list(self._open):
            if state.settled or state.delivered:
                self._open.discard(state)
            elif now - state.created > self.grace_s:
                self._open.discard(state)
                await state.abandon()
                reaped += 1
        return reaped


STALLED = "the tier replica serving this stream stopped answering; retry the request"


class StreamRelay:
    """One stream: the tier's messages (lists of the SSE chunks ready) to the client's
    events, metered; settled before `[DONE]`; the tier call cancelled if the client goes,
    the plan's time limit (`timeout_s` from the request's start) passes, or its tier
    replica falls silent (`SilentReplicas`)."""

    def __init__(
        self,
        first: Any,
        state: StreamSettlement,
        wants_usage: bool,
        timeout_s: float | None,
        replica: str | None = None,
    ) -> None:
        self.first = first
        self.state = state
        self.wants_usage = wants_usage
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else state.meter.started + timeout_s
        self.failed: EngineError | None = None  # an engine's error event: the record's status
        self.replica = replica  # the tier replica serving it
        self.last_at = time.monotonic()  # when its last message came
        self.stalled = False
        self._waiting: asyncio.Timeout | None = None  # the wait for the next message

    def stall(self) -> None:
        """End the stream: its replica is silent (the wait for its next message ends
        now, as a time limit would, and says why)."""
        self.stalled = True
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())

    async def run(self) -> AsyncIterator[str]:
        state = self.state
        try:
            item = self.first
            while item is not END:
                if out := await self._events(item):
                    yield out
                item = await self._next()
            await self._settle_ended()  # an engine that stopped without `[DONE]` (it died)
        except TimeoutError:
            if self.stalled:
                err = EngineError(status_code=503, message=STALLED, type="server_error")
            else:
                err = timeout_error(self.timeout_s or 0)
            yield err.sse()
            state.gen.cancel()  # the engine stops generating for it
            await state.finish(err.status_code, err.message)
        except asyncio.CancelledError:  # the client went (Ray cancels the request's task)
            await state.abandon()
            raise
        except Exception as exc:
            log.exception("stream from tier failed")
            err = EngineError(
                status_code=503,
                message="the tier failed mid-stream; retry the request",
                type="server_error",
            )
            yield err.sse()
            await state.finish(503, repr(exc))
        finally:
            await state.abandon()  # a no-op once settled

    async def _next(self) -> Any:
        """The tier's next message (`END` after the last); TimeoutError past the deadline.
        A timeout scope per message, not `wait_for`: that would make a task per message."""
        if self.stalled:
            raise TimeoutError
        at = None
        if self.deadline is not None:
            at = asyncio.get_running_loop().time() + max(self.deadline - time.monotonic(), 0)
        try:
            async with asyncio.timeout_at(at) as self._waiting:
                item = await self.state.gen.__anext__()
        except StopAsyncIteration:
            return END
        finally:
            self._waiting = None
        self.state.heard()
        self.last_at = self.state.last_at
        return item

    async def _events(self, item: Any) -> str:
        """One message's chunks as the client gets them (usage only if it asked)."""
        meter = self.state.meter
        if meter.first_at is None:
            meter.first_at = time.monotonic()
        out = []
        for chunk in item if isinstance(item, list) else [item]:
            if isinstance(chunk, EngineError):
                self.failed = chunk
                out.append(chunk.sse())
            elif chunk.startswith(DONE):
                await self._settle_ended()
                out.append(chunk)
            elif (event := usage_chunk(chunk)) is not None:
                add_cost(event, meter)
                if self.wants_usage or event.get("choices"):
                    if not self.wants_usage:
                        event.pop("usage")
                    out.append(f"data: {json.dumps(event)}\n\n")
            else:
                meter.chunks += 1
                out.append(chunk)
        return "".join(out)

    async def _settle_ended(self) -> None:
        if self.failed is None:
            await self.state.finish(200, None)
        else:
            await self.state.finish(self.failed.status_code, self.failed.message)
