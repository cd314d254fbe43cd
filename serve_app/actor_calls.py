"""Calls to a detached control actor (the gateway, the session store), awaited through
its restarts: Ray restarts such an actor and its state is on disk, so a call that finds
it away is retried for up to `wait_s`, then `ActorUnavailable`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from ray.exceptions import RayActorError
from ray.util import metrics

log = logging.getLogger("serve_app.actor_calls")


class ActorUnavailable(Exception):
    """The actor did not answer within the wait: it is restarting, or gone."""


class ActorCalls:
    def __init__(self, actor: Any, what: str, wait_s: float, retried: metrics.Counter) -> None:
        self.actor = actor
        self.what = what
        self.wait_s = wait_s
        self.retried = retried

    async def __call__(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        for attempt in itertools.count():
            try:
                return await getattr(self.actor, method).remote(*args)
            except RayActorError as exc:
                if time.monotonic() + delay > deadline:
                    raise ActorUnavailable(
                        f"the {self.what} did not answer in {self.wait_s:g} s"
                    ) from exc
                if attempt == 0:  # one count and one line per call that had to wait
                    self.retried.inc()
                    log.warning("the %s is unavailable (%r); retrying %s", self.what, exc, method)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")
