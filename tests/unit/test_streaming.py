"""A tier replica's messages: what `coalesce` joins, what it holds and for how long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from deployments.protocol import EngineError, EngineOutput
from deployments.spec import HoldBack
from deployments.streaming import Pacing, Served, coalesce


async def paced(items: list[EngineOutput], every_s: float) -> AsyncIterator[EngineOutput]:
    for item in items:
        yield item
        await asyncio.sleep(every_s)


async def collect(
    source: AsyncIterator[EngineOutput], window_s: float
) -> tuple[list[tuple[float, object]], list[float]]:
    held: list[float] = []
    pacing = Pacing(window=lambda: window_s, held=held.append)
    start, out = time.monotonic(), []
    async for message in coalesce(source, "r1", pacing):
        out.append((time.monotonic() - start, message))
    return out, held


def chunks_of(messages: list[tuple[float, object]]) -> list[str]:
    flat: list[str] = []
    for _, m in messages:
        m = m.output if isinstance(m, Served) else m
        flat.extend(m if isinstance(m, list) else [])
    return flat


async def test_first_output_leaves_at_once_and_later_chunks_ride_together():
    chunks = [f"data: {i}\n\n" for i in range(40)]
    messages, held = await collect(paced(chunks, 0.002), window_s=0.03)
    first_at, first = messages[0]
    assert isinstance(first, Served) and first.replica == "r1"
    assert first.output == chunks[:1] and first_at < 0.015
    assert chunks_of(messages) == chunks  # nothing lost, nothing reordered
    assert len(messages) <= 8  # ~0.08 s of tokens in 0.03 s windows, not 40 messages
    assert max(held) < 0.03 + 0.02  # the window, plus the loop's scheduling


async def test_no_window_sends_what_is_ready():
    chunks = [f"data: {i}\n\n" for i in range(10)]
    messages, held = await collect(paced(chunks, 0.003), window_s=0.0)
    assert chunks_of(messages) == chunks
    assert len(messages) == 10 and max(held) < 0.01


async def test_the_end_of_an_answer_is_not_held():
    async def short() -> AsyncIterator[EngineOutput]:
        yield "data: a\n\n"
        yield "data: b\n\n"
        await asyncio.sleep(0.01)
        yield "data: [DONE]\n\n"

    messages, _ = await collect(short(), window_s=1.0)
    assert chunks_of(messages)[-1] == "data: [DONE]\n\n"
    assert messages[-1][0] < 0.2  # not the 1 s window


async def test_an_error_event_ends_a_hold_and_goes_alone():
    err = EngineError(status_code=500, message="boom", type="server_error")

    async def failing() -> AsyncIterator[EngineOutput]:
        yield "data: a\n\n"
        await asyncio.sleep(0.01)
        yield "data: b\n\n"
        await asyncio.sleep(0.01)
        yield err
        await asyncio.sleep(5)

    gen = coalesce(failing(), "r1", Pacing(window=lambda: 1.0))
    start = time.monotonic()
    got = [await gen.__anext__() for _ in range(3)]
    await gen.aclose()
    assert got[1] == ["data: b\n\n"] and got[2] is err
    assert time.monotonic() - start < 0.5


async def test_engine_errors_are_raised_and_a_closed_stream_closes_the_source():
    closed = asyncio.Event()

    async def raising() -> AsyncIterator[EngineOutput]:
        yield "data: a\n\n"
        raise RuntimeError("engine broke")

    with pytest.raises(RuntimeError, match="engine broke"):
        await collect(raising(), window_s=0.01)

    async def endless() -> AsyncIterator[EngineOutput]:
        try:
            while True:
                yield "data: x\n\n"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    gen = coalesce(endless(), "r1", Pacing(window=lambda: 0.005))
    await gen.__anext__()
    await gen.__anext__()
    await gen.aclose()
    await asyncio.wait_for(closed.wait(), 1)


def test_the_window_grows_with_the_streams_and_is_capped():
    hb = HoldBack(min_ms=4, per_stream_ms=1.5, max_ms=40)
    assert hb.window_s(0) == hb.window_s(1) == pytest.approx(0.004)
    assert hb.window_s(9) == pytest.approx(0.016)
    assert hb.window_s(100) == pytest.approx(0.040)
    with pytest.raises(ValueError):
        HoldBack(min_ms=11)  # a lone client never waits more than 10 ms
