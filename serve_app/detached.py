"""Gateway calls that a client's hang-up cannot cancel halfway.

When a client hangs up, Ray Serve cancels the request's task, and Ray cancels the calls
that task submitted too (recursively). A settlement cancelled that way loses its usage
record; an admission cancelled after the gateway granted it leaves the key's in-flight
count one too high. So the router submits gateway calls from one long-lived task of its
replica (calls from there are not the request's children), and when the request has
gone by the time an admission arrives, gives the admission back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("serve_app.detached")

Call = Callable[[], Awaitable[Any]]
OnAbandon = Callable[[Any], Awaitable[None]]


class DetachedCalls:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Call, asyncio.Future[Any], OnAbandon | None]] = (
            asyncio.Queue()
        )
        self._inflight: set[asyncio.Task[None]] = set()  # asyncio holds tasks weakly
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            call, done, on_abandon = await self._queue.get()
            task = asyncio.get_running_loop().create_task(self._deliver(call, done, on_abandon))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _deliver(
        self, call: Call, done: asyncio.Future[Any], on_abandon: OnAbandon | None
    ) -> None:
        try:
            result = await call()
        except Exception as exc:
            if done.cancelled():
                log.exception("a detached gateway call failed after its request had gone")
            else:
                done.set_exception(exc)
            return
        if not done.cancelled():
            done.set_result(result)
        elif on_abandon is not None:  # the request went away meanwhile: undo
            try:
                await on_abandon(result)
            except Exception:
                log.exception("undoing an abandoned gateway call failed")

    async def call(self, call: Call, on_abandon: OnAbandon | None = None) -> Any:
        """`call()`'s result. If the caller is cancelled first, the call still completes,
        and then `on_abandon(result)` runs."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((call, done, on_abandon))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            done.cancel()  # tells the delivery that nobody will use the result
            raise
