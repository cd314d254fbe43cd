"""Tier calls in-process (`routing/tier_calls.py`'s `Tiers`): engines behind the tier's own
`coalesce`, so the pipeline sees what a tier replica sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from deployments.streaming import coalesce
from serve_app.routing.tier_calls import ReplicaLost, TierRequest
from tests.fakes.engine import FakeEngine


class InProcessCall:
    """A tier call as Ray's streaming handle gives it: the engine runs on its own (here a
    task, there the replica) and its outputs queue up for `__anext__`; only `cancel`
    stops it, not a reader that stops waiting."""

    END = object()

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(source))

    async def _run(self, source: AsyncIterator[Any]) -> None:
        try:
            async for item in source:
                self._queue.put_nowait(item)
        except Exception as exc:
            self._queue.put_nowait(exc)
        finally:
            self._queue.put_nowait(self.END)

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is self.END:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self._task.cancel()


class LostCall:
    async def __anext__(self) -> Any:
        raise ReplicaLost("the replica's actor died")

    def cancel(self) -> None:
        pass


class InProcessTiers:
    def __init__(self, **engines: FakeEngine) -> None:
        self.engines = engines
        self.lose_next: dict[str, int] = {}  # tier -> calls whose replica dies first

    def call(self, req: TierRequest) -> InProcessCall | LostCall:
        if self.lose_next.get(req.tier):
            self.lose_next[req.tier] -= 1
            return LostCall()
        engine = self.engines[req.tier]
        source = getattr(engine, req.endpoint.value)(req.body, req.request_id)
        return InProcessCall(coalesce(source, f"{req.tier}-0"))
