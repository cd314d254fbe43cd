"""The Responses and Conversations adapters on fakes (conftest.py): turns, chains,
streams, stored state, background runs."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from serve_app.api.responses import background
from serve_app.gateway.actor import plan_limits
from serve_app.gateway.limits import KeyState
from serve_app.gateway.protocol import KeyOverrides
from serve_app.store.responses_db import RUN_LOST_S
from tests.fakes.gateway import CFG
from tests.unit.adapters.conftest import Served


def said(body: dict) -> list[tuple[str, str]]:
    """The (role, text) of each message the engine was asked with."""
    out = []
    for m in body["messages"]:
        content = m.get("content")
        text = (
            content
            if isinstance(content, str)
            else "".join(p.get("text", "") for p in content or [])
        )
        out.append((m["role"], text))
    return out


async def test_a_chain_of_turns_sends_the_earlier_turns_and_stores_each(served: Served):
    first = await served.oai.responses.create(model="kimi-k2.5", input="first question")
    second = await served.oai.responses.create(
        model="kimi-k2.5", input="second question", previous_response_id=first.id
    )
    assert first.status == second.status == "completed"
    earlier, latest = served.engine.bodies
    assert said(earlier)[-1] == ("user", "first question")
    roles = said(latest)
    assert ("user", "first question") in roles and roles[-1] == ("user", "second question")
    assert ("assistant", "x" * 6) in roles  # the first answer, from the store
    again = await served.oai.responses.retrieve(second.id)
    assert again.id == second.id and again.previous_response_id == first.id
    items = await served.oai.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["second question"]
    # one usage record per turn, both under the chain's session
    assert [r.session_id for r in served.gateway.records] == [first.id, first.id]


async def test_an_unknown_previous_response_is_a_404_before_any_engine_call(served: Served):
    with pytest.raises(openai.NotFoundError) as err:
        await served.oai.responses.create(
            model="kimi-k2.5", input="hi", previous_response_id="resp_nosuch"
        )
    assert err.value.body["param"] == "previous_response_id"
    assert served.engine.requests == [] and served.gateway.records == []


async def test_a_streamed_turn_is_stored_before_its_last_event(served: Served):
    stream = await served.oai.responses.create(model="kimi-k2.5", input="hi", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    stored = await served.oai.responses.retrieve(events[0].response.id)
    assert stored.status == "completed" and stored.output_text == "x" * 6


async def test_a_conversation_gathers_each_turns_items(served: Served):
    conversation = await served.oai.conversations.create(
        items=[{"type": "message", "role": "user", "content": "context"}]
    )
    await served.oai.responses.create(
        model="kimi-k2.5", input="question", conversation=conversation.id
    )
    items = await served.oai.conversations.items.list(conversation.id, order="asc")
    kinds = [(i.type, getattr(i, "role", None)) for i in items.data]
    assert kinds == [("message", "user"), ("message", "user"), ("message", "assistant")]
    assert said(served.engine.bodies[0])[-2:] == [("user", "context"), ("user", "question")]
    await served.oai.conversations.delete(conversation.id)
    with pytest.raises(openai.NotFoundError):
        await served.oai.conversations.retrieve(conversation.id)


async def wait_for_status(served: Served, response_id: str, wanted: str) -> str:
    for _ in range(200):
        status = (await served.oai.responses.retrieve(response_id)).status
        if status == wanted:
            return status
        await asyncio.sleep(0.01)
    return status


async def test_a_background_run_completes_and_announces_its_end(served: Served, monkeypatch):
    monkeypatch.setattr(background, "HEARTBEAT_S", 0.02)
    owner = served.gateway.caller.key_id
    await served.store.add_webhook(
        owner, "we_1", "", "https://hooks.example/x", ["response.completed"]
    )
    queued = await served.oai.responses.create(model="kimi-k2.5", input="hi", background=True)
    assert queued.status == "queued" and queued.output == []
    assert await wait_for_status(served, queued.id, "completed") == "completed"
    await asyncio.sleep(0.05)  # the announcement follows the stored end
    deliveries = served.store._calls.actor.instance.db.db.execute(
        "SELECT endpoint, body FROM deliveries"
    ).fetchall()
    assert [d[0] for d in deliveries] == ["we_1"] and queued.id in deliveries[0][1]
    [record] = served.gateway.records
    assert record.status == 200 and record.completion_tokens == 6


async def test_a_background_response_over_its_keys_limit_is_refused_at_creation(
    served: Served,
):
    limits = plan_limits(CFG.plans["enterprise"], KeyOverrides(requests_per_minute=1))
    served.gateway.state = KeyState(limits)
    await served.oai.responses.create(model="kimi-k2.5", input="hi")  # the minute's one
    with pytest.raises(openai.RateLimitError) as refused:
        await served.oai.with_options(max_retries=0).responses.create(
            model="kimi-k2.5", input="hi", background=True
        )
    assert refused.value.response.headers["retry-after"]
    stored = served.store._calls.actor.instance.db.db.execute("SELECT COUNT(*) FROM responses")
    assert stored.fetchone()[0] == 1  # the foreground one; nothing queued to fail later
    assert len(served.gateway.records) == 1


async def test_a_background_run_cancelled_before_it_began_is_metered_once(
    served: Served, monkeypatch
):
    monkeypatch.setattr(background, "HEARTBEAT_S", 0.02)
    admitted: list = []
    serve_admitted = served.responses.runs.pipeline.serve_admitted

    async def late(ctx):  # the run is slow to begin: the cancellation comes first
        admitted.append(ctx)
        await asyncio.sleep(3600)
        return await serve_admitted(ctx)

    monkeypatch.setattr(served.responses.runs.pipeline, "serve_admitted", late)
    queued = await served.oai.responses.create(model="kimi-k2.5", input="hi", background=True)
    await served.oai.responses.cancel(queued.id)
    for _ in range(100):
        if served.gateway.records:
            break
        await asyncio.sleep(0.02)
    [record] = served.gateway.records
    assert record.status == 499 and record.cost_usd == 0 and served.engine.requests == []
    assert served.gateway.tickets == {}  # its admission handed back


async def test_cancelling_a_background_run_stops_its_engine_and_meters_it(
    served: Served, monkeypatch
):
    monkeypatch.setattr(background, "HEARTBEAT_S", 0.02)
    served.engine.tokens, served.engine.delay_s = 500, 0.01
    queued = await served.oai.responses.create(model="kimi-k2.5", input="hi", background=True)
    await wait_for_status(served, queued.id, "in_progress")
    cancelled = await served.oai.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    for _ in range(100):  # the run hears it at its next heartbeat
        if served.gateway.records:
            break
        await asyncio.sleep(0.02)
    [record] = served.gateway.records
    assert 0 < record.completion_tokens < 500
    assert served.engine.stopped == served.engine.requests
    assert (await served.oai.responses.retrieve(queued.id)).status == "cancelled"


async def test_a_run_whose_replica_died_is_failed_by_the_store(served: Served, monkeypatch):
    monkeypatch.setattr(background, "HEARTBEAT_S", 0.02)
    served.engine.hang = True
    queued = await served.oai.responses.create(model="kimi-k2.5", input="hi", background=True)
    await asyncio.sleep(0.05)
    assert served.responses.runs.tasks
    for task in asyncio.all_tasks():  # the replica goes, and all it was running
        if task is not asyncio.current_task():
            task.cancel()
    await asyncio.sleep(0)
    db = served.store._calls.actor.instance.db
    assert db.reap_lost_runs(now=time.time() + RUN_LOST_S + 1) == 1
    failed = await served.oai.responses.retrieve(queued.id)
    assert failed.status == "failed" and failed.error is not None
