"""Usage queries beside admissions: off the event loop, `slots` at a time, and a slot
rests after each query in proportion to the CPU it took, so however many clients ask,
queries take at most `share` of a CPU (a query in a thread shares the interpreter with
the loop that admits requests). The caller has its answer at once (the rest is the next
query's wait); a lone query waits for nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class QueryShare:
    def __init__(self, share: float = 0.05, slots: int = 2) -> None:
        per_slot = share / slots
        self.rest_per_cpu_s = (1 - per_slot) / per_slot
        self._slots = asyncio.Semaphore(slots)
        self.cpu_s = 0.0  # the queries' CPU, all told

    async def run(self, query: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def timed() -> tuple[T, float]:
            start = time.thread_time()
            return query(*args, **kwargs), time.thread_time() - start

        await self._slots.acquire()
        cpu = 0.0
        try:
            result, cpu = await asyncio.to_thread(timed)
            return result
        finally:
            self.cpu_s += cpu
            asyncio.get_running_loop().call_later(cpu * self.rest_per_cpu_s, self._slots.release)
