"""Gateway calls survive a cancelled request, and an abandoned admission is given back."""

from __future__ import annotations

import asyncio

from serve_app.actors import DetachedCalls


async def test_result_reaches_the_caller():
    calls = DetachedCalls()

    async def admit() -> str:
        return "ticket-1"

    assert await calls.call(admit) == "ticket-1"


async def test_cancelled_caller_does_not_cancel_the_call_and_undoes_it():
    calls = DetachedCalls()
    started, finished, undone = asyncio.Event(), asyncio.Event(), []

    async def admit() -> str:
        started.set()
        await asyncio.sleep(0.05)  # the gateway is still admitting when the client goes
        finished.set()
        return "ticket-2"

    async def give_back(ticket: str) -> None:
        undone.append(ticket)

    waiter = asyncio.create_task(calls.call(admit, on_abandon=give_back))
    await started.wait()
    waiter.cancel()
    await asyncio.sleep(0.1)
    assert waiter.cancelled() and finished.is_set()
    assert undone == ["ticket-2"]  # the admission was given back, not leaked


async def test_errors_reach_the_caller():
    calls = DetachedCalls()

    async def fails() -> None:
        raise RuntimeError("gateway down")

    try:
        await calls.call(fails)
    except RuntimeError as exc:
        assert "gateway down" in str(exc)
    else:
        raise AssertionError("the error was swallowed")
