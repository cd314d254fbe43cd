"""Usage queries take a bounded share of the gateway's CPU however many ask at once:
each waits out the rest its predecessor earned (its CPU times (1 - share) / share)."""

from __future__ import annotations

import asyncio
import itertools
import time

from serve_app.gateway.query_share import QueryShare


async def test_a_crowd_of_queries_takes_turns_each_after_the_rest_the_last_one_earned():
    share = QueryShare(share=0.2, slots=1)  # a rest of 4x the CPU a query took
    spans: list[tuple[float, float, float]] = []  # (start, end, CPU) of each query

    def query() -> None:
        start, cpu = time.monotonic(), time.thread_time()
        while time.thread_time() - cpu < 0.005:
            pass
        spans.append((start, time.monotonic(), time.thread_time() - cpu))

    await asyncio.gather(*(share.run(query) for _ in range(6)))
    assert len(spans) == 6
    for (_, end, cpu), (start, _, _) in itertools.pairwise(spans):
        assert start - end >= 4 * cpu * 0.99  # the next one waited out the rest
    assert share.cpu_s >= 6 * 0.005


async def test_a_lone_query_waits_for_nothing():
    share = QueryShare(share=0.1, slots=2)
    assert await share.run(lambda: 42) == 42
    assert await share.run(lambda: 43) == 43  # the second slot: no rest to wait out
