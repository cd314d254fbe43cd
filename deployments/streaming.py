"""A tier replica's answer as the messages it sends the router.

Every message crosses two Ray hops (tier -> router -> proxy), and each costs about the same
CPU however many SSE chunks it carries. So the first output leaves at once (the time to
first token) and later chunks may be held for a short window (`spec.HoldBack`, growing with
the streams in flight) and leave together, as a list of every chunk ready by then.
The end of the answer or an error event is never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from deployments.protocol import EngineOutput


@dataclass(frozen=True)
class Served:
    """The first message of every answer: which replica took it, with its first output
    (riding along, so naming the replica costs no extra message)."""

    replica: str
    output: EngineOutput | list[str]


TierOutput = EngineOutput | list[str] | Served


@dataclass(frozen=True)
class Pacing:
    """One stream's hold-back: `window()` is read per message (the replica's load changes
    while it streams); `held(s)` hears how long each message's oldest chunk waited."""

    window: Callable[[], float] = lambda: 0.0
    held: Callable[[float], None] = lambda s: None


class Inbox:
    """The engine's outputs not yet sent, with their arrival times; the sender sleeps on
    it until something arrives, or, holding, until its deadline, the end or a non-chunk."""

    def __init__(self) -> None:
        self.items: deque[tuple[float, EngineOutput]] = deque()
        self.ended = False
        self._wake: asyncio.Future[None] | None = None
        self._holding = False

    def put(self, item: EngineOutput) -> None:
        self.items.append((time.monotonic(), item))
        if not self._holding or not isinstance(item, str):
            self._fire()

    def end(self) -> None:
        self.ended = True
        self._fire()

    def _fire(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait(self, until: float | None = None) -> None:
        """Until an output arrives; with `until` (monotonic), until then unless the end
        or a non-chunk output comes first."""
        loop = asyncio.get_running_loop()
        self._wake = wake = loop.create_future()
        self._holding = until is not None
        # the loop's clock is time.monotonic, so `until` converts as it is
        timer = None if until is None else loop.call_at(until, self._fire)
        try:
            await wake
        finally:
            self._wake, self._holding = None, False
            if timer is not None:
                timer.cancel()

    def take_chunks(self) -> list[str]:
        batch: list[str] = []
        while self.items and isinstance(self.items[0][1], str):
            batch.append(self.items.popleft()[1])  # type: ignore[arg-type]
        return batch


async def coalesce(
    source: AsyncIterator[EngineOutput], replica: str, pacing: Pacing = Pacing()
) -> AsyncIterator[TierOutput]:
    """The messages of one answer: the first `Served`; SSE chunks as lists."""
    inbox = Inbox()

    async def pump() -> None:
        try:
            async for item in source:
                inbox.put(item)
        finally:
            inbox.end()

    task = asyncio.create_task(pump())
    first = True
    try:
        while inbox.items or not inbox.ended:
            if not inbox.items:
                await inbox.wait()
                continue
            arrived, item = inbox.items[0]
            if not isinstance(item, str):
                inbox.items.popleft()
                message: TierOutput = item
            else:
                if not first:
                    await hold(inbox, arrived + pacing.window())
                pacing.held(time.monotonic() - arrived)
                message = inbox.take_chunks()
            yield Served(replica, message) if first else message
            first = False
        await task  # re-raise what the engine raised
    finally:
        if not task.done():
            task.cancel()  # the client went away: closing the source aborts the request
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def hold(inbox: Inbox, until: float) -> None:
    """Wait for more chunks until `until` (not past the answer's end)."""
    if until > time.monotonic() and not inbox.ended:
        await inbox.wait(until)
