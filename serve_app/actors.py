"""Calls to the cluster's detached control actors (the gateway, the response store).

- `ActorCalls` awaits a call through the actor's restarts: Ray restarts such an actor and
  its state is on disk, so a call that finds it away is retried for up to `wait_s`, then
  `ActorUnavailable`. Each retry asks for the actor by name again (`connect`), which also
  makes a new one where it died for good (killed without restart): the state on disk is
  all it needs.
- `DetachedCalls` submits calls that a client's hang-up cannot cancel halfway. When a
  client hangs up, Ray Serve cancels the request's task, and Ray cancels the calls that
  task submitted too (recursively). A settlement cancelled that way loses its usage
  record; an admission cancelled after the gateway granted it leaves the key's in-flight
  count one too high. So the ingress submits gateway calls from one long-lived task of
  its replica (calls from there are not the request's children), and when the request
  has gone by the time an admission arrives, gives the admission back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import ActorUnschedulableError, RayActorError
from ray.util import metrics

log = logging.getLogger("serve_app.actors")
NAMESPACE = "kimi-serve"  # the Ray namespace of every detached actor of the app
T = TypeVar("T")
Call = Callable[[], Awaitable[Any]]
OnAbandon = Callable[[Any], Awaitable[None]]


class ActorUnavailable(Exception):
    """The actor did not answer within the wait: it is restarting, or gone."""


def detached_actor(actor_class: Any, name: str, *args: Any) -> Callable[[], Any]:
    """A `connect` for `ActorCalls`: the cluster's one actor of that name, created by the
    first replica that asks (and again by any that finds it gone for good)."""

    def connect() -> Any:
        return actor_class.options(
            name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(*args)

    return connect


class ActorCalls:
    def __init__(
        self,
        connect: Callable[[], Any],
        what: str,
        wait_s: float,
        retried: metrics.Counter,
    ) -> None:
        self.connect = connect
        self.actor = connect()
        self.what = what
        self.wait_s = wait_s
        self.retried = retried

    async def __call__(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """`call(actor)`'s answer: `call` submits one method of the actor, e.g.
        `lambda a: a.admit.remote(...)`, and is made again on each retry."""
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        for attempt in itertools.count():
            try:
                return await call(self.actor)
            except (RayActorError, ActorUnschedulableError) as exc:  # away, or its node gone
                if time.monotonic() + delay > deadline:
                    raise ActorUnavailable(
                        f"the {self.what} did not answer in {self.wait_s:g} s"
                    ) from exc
                if attempt == 0:  # one count and one line per call that had to wait
                    self.retried.inc()
                    log.warning("the %s is unavailable (%r); retrying", self.what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                with contextlib.suppress(Exception):  # the same actor while it restarts
                    self.actor = self.connect()
        raise AssertionError("unreachable")


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
