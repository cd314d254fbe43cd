"""Relaying a tier's answer while metering it (the pipeline's part of a stream).

The usage record is settled (durably metered) before the client receives the end of its
answer: the JSON body for a plain request, `data: [DONE]` for a stream. A stream the
client abandons is settled too, with the tokens it had received counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.engine import EngineError
from serve_app.config import Price
from serve_app.metering import RequestLabels, UsageRecord

log = logging.getLogger("serve_app.relay")

Settle = Callable[[UsageRecord], Awaitable[None]]
DONE = "data: [DONE]"


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

    def record(self, status: int, error: str | None = None) -> UsageRecord:
        usage = self.usage or {"prompt_tokens": 0, "completion_tokens": self.chunks}
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
            ttft_ms=None if self.first_at is None else (self.first_at - self.started) * 1000,
            latency_ms=(now - self.started) * 1000,
            cost_usd=self.cost(usage),
            error=error,
        )


def add_cost(body: dict[str, Any], meter: RequestMeter) -> float:
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

    async def finish(self, status: int, err: str | None) -> None:
        if self.settled:
            return
        self.settled = True
        await self.settle(self.meter.record(status, err))

    async def abandon(self) -> None:
        if not self.settled:
            self.gen.cancel()  # the engine stops generating for it
            await self.finish(499, "client disconnected")


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


async def relay_stream(
    first: Any, state: StreamSettlement, client_wants_usage: bool, timeout_s: float | None = None
) -> AsyncIterator[str]:
    """Relay SSE chunks (tiers send lists of the chunks ready); settle before `[DONE]`;
    cancel the tier call if the client goes or the plan's time limit (`timeout_s` from
    the request's start) passes."""
    gen, meter, finish = state.gen, state.meter, state.finish
    deadline = None if timeout_s is None else meter.started + timeout_s
    failed: EngineError | None = None  # an engine's error event: the record's status

    async def settle_ended() -> None:
        if failed is None:
            await finish(200, None)
        else:
            await finish(failed.status_code, failed.message)

    async def items() -> AsyncIterator[Any]:
        """The tier's messages, until the deadline (TimeoutError past it)."""
        yield first
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                yield await asyncio.wait_for(gen.__anext__(), left)
            except StopAsyncIteration:
                return

    try:
        async for item in items():
            if meter.first_at is None:
                meter.first_at = time.monotonic()
            out = []
            for chunk in item if isinstance(item, list) else [item]:
                if isinstance(chunk, EngineError):
                    failed = chunk
                    out.append(chunk.sse())
                elif chunk.startswith(DONE):
                    await settle_ended()
                    out.append(chunk)
                elif (event := usage_chunk(chunk)) is not None:
                    add_cost(event, meter)
                    if client_wants_usage or event.get("choices"):
                        if not client_wants_usage:
                            event.pop("usage")
                        out.append(f"data: {json.dumps(event)}\n\n")
                else:
                    meter.chunks += 1
                    out.append(chunk)
            if out:
                yield "".join(out)
        await settle_ended()  # an engine that stopped without `[DONE]` (it died)
    except TimeoutError:
        err = timeout_error(timeout_s or 0)
        yield err.sse()
        gen.cancel()  # the engine stops generating for it
        await finish(504, err.message)
    except asyncio.CancelledError:
        gen.cancel()  # Ray would cancel it with the request's task; not every caller is Ray
        await finish(499, "client disconnected")
        raise
    except Exception as exc:
        log.exception("stream from tier failed")
        err = EngineError(
            status_code=503,
            message="the tier failed mid-stream; retry the request",
            type="server_error",
        )
        yield err.sse()
        await finish(503, repr(exc))
    finally:
        await state.abandon()
