"""Usage queries beside admissions: in processes of their own, `slots` at a time (a
query in a thread of the gateway shares the interpreter with the loop that admits
requests, and slows it down well beyond its own CPU), and, while the gateway has
requests in flight, a slot rests after each query in proportion to the CPU it took, so
however many clients ask, queries take at most `share` of a CPU from admissions. The
caller has its answer at once (the rest is the next query's wait); a lone query, or any
query of an idle gateway, waits for nothing."""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("serve_app.gateway.query_share")
T = TypeVar("T")
P = ParamSpec("P")


def timed(query: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    start = time.process_time()
    return query(*args, **kwargs), time.process_time() - start


class QueryShare:
    def __init__(
        self, busy: Callable[[], bool] = lambda: True, share: float = 0.05, slots: int = 2
    ) -> None:
        per_slot = share / slots
        self.rest_per_cpu_s = (1 - per_slot) / per_slot
        self.busy = busy  # whether there are admissions to keep the CPU for
        self.slots = slots
        self._slots = asyncio.Semaphore(slots)
        self._pool: ProcessPoolExecutor | None = None
        self.cpu_s = 0.0  # the queries' CPU, all told
        self.rested_s = 0.0  # and the rests their slots took

    def start(self) -> None:
        """The query processes, spawned (not forked: the gateway has threads)."""
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.slots, mp_context=context)

    async def run(self, query: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`query(*args)` in a query process: a module-level function, picklable
        arguments."""
        await self._slots.acquire()
        cpu = 0.0
        loop = asyncio.get_running_loop()
        call = functools.partial(timed, query, *args, **kwargs)
        try:
            self.start()
            try:
                result, cpu = await loop.run_in_executor(self._pool, call)
            except BrokenProcessPool:  # a query process died (killed, out of memory)
                log.error("a usage query process died: started again")
                self._pool = None
                self.start()
                result, cpu = await loop.run_in_executor(self._pool, call)
            return result
        finally:
            self.cpu_s += cpu
            rest = cpu * self.rest_per_cpu_s if self.busy() else 0.0
            self.rested_s += rest
            loop.call_later(rest, self._slots.release)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
