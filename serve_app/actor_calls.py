"""Calls to a detached control actor (the gateway, the session store), awaited through
its restarts: Ray restarts such an actor and its state is on disk, so a call that finds
it away is retried for up to `wait_s`, then `ActorUnavailable`. Each retry asks for the
actor by name again (`connect`), which also makes a new one where it died for good
(killed without restart): the state on disk is all it needs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import ActorUnschedulableError, RayActorError
from ray.util import metrics

log = logging.getLogger("serve_app.actor_calls")


class ActorUnavailable(Exception):
    """The actor did not answer within the wait: it is restarting, or gone."""


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

    async def __call__(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        for attempt in itertools.count():
            try:
                return await getattr(self.actor, method).remote(*args)
            except (RayActorError, ActorUnschedulableError) as exc:  # away, or its node gone
                if time.monotonic() + delay > deadline:
                    raise ActorUnavailable(
                        f"the {self.what} did not answer in {self.wait_s:g} s"
                    ) from exc
                if attempt == 0:  # one count and one line per call that had to wait
                    self.retried.inc()
                    log.warning("the %s is unavailable (%r); retrying %s", self.what, exc, method)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                with contextlib.suppress(Exception):  # the same actor while it restarts
                    self.actor = self.connect()
        raise AssertionError("unreachable")
