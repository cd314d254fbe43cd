"""Usage queries run in processes of their own and take a bounded share of a CPU however
many ask at once: each waits out the rest its predecessor earned (its CPU times
(1 - share) / share)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time

from serve_app.gateway.query_share import QueryShare


def busy(seconds: float) -> tuple[float, float, float, int]:
    """(start, end, CPU, process id) of a query that spins for `seconds` of CPU."""
    start, cpu = time.monotonic(), time.process_time()
    while time.process_time() - cpu < seconds:
        pass
    return start, time.monotonic(), time.process_time() - cpu, os.getpid()


async def test_a_crowd_of_queries_takes_turns_each_after_the_rest_the_last_one_earned():
    share = QueryShare(share=0.2, slots=1)  # busy: a rest of 4x the CPU a query took
    try:
        await share.run(busy, 0)  # its process started
        spans = await asyncio.gather(*(share.run(busy, 0.005) for _ in range(6)))
    finally:
        share.close()
    spans.sort()
    for (_, end, cpu, _), (start, _, _, _) in itertools.pairwise(spans):
        assert start - end >= 4 * cpu * 0.99  # the next one waited out the rest
    assert share.cpu_s >= 6 * 0.005 and share.rested_s >= 4 * share.cpu_s * 0.99
    assert {pid for *_, pid in spans} != {os.getpid()}  # not in the gateway's process


async def test_an_idle_gateway_s_queries_rest_not():
    share = QueryShare(busy=lambda: False, share=0.2, slots=1)
    try:
        await asyncio.gather(*(share.run(busy, 0.005) for _ in range(3)))
    finally:
        share.close()
    assert share.cpu_s >= 3 * 0.005 and share.rested_s == 0


async def test_a_lone_query_waits_for_nothing_and_a_dead_process_is_replaced():
    share = QueryShare(share=0.1, slots=2)
    try:
        *_, pid = await share.run(busy, 0)
        os.kill(pid, 9)
        await asyncio.sleep(0.2)
        *_, again = await share.run(busy, 0)  # the pool found broken, made again
        assert again != pid
    finally:
        share.close()
