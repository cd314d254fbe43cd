"""The fair queue in the pipeline, on the shared fakes: who reaches a full tier first, the
wait's limit as a 503 settled once and unbilled, and the wait on the answer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from deployments.protocol import Endpoint
from deployments.scheduling.loadboard import TierLoad
from serve_app.canonical import ChatRequest, canonical_body
from serve_app.errors import APIError
from serve_app.gateway.protocol import Caller, KeyOverrides
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Completed, Inbound
from serve_app.pipeline.telemetry import IngressMetrics
from tests.fakes.engine import FakeEngine
from tests.fakes.gateway import CFG, FakeGateway
from tests.fakes.tiers import InProcessTiers


def config(**router: Any) -> Any:
    cfg = CFG.model_copy(deep=True)
    cfg.router = cfg.router.model_copy(update={"num_replicas": 1, **router})
    return cfg


async def premium_of_capacity(capacity: int, engine: FakeEngine, **router: Any) -> tuple:
    gateway = FakeGateway("enterprise")
    tiers = InProcessTiers(premium=engine, standard=FakeEngine(), budget=FakeEngine())
    p = Pipeline(config(**router), tiers, gateway, "ingress-0", IngressMetrics())
    await p.refresh({"premium": TierLoad(capacity=capacity, replicas=1)})
    return p, gateway


def ask(key: str, session: str | None = None) -> Inbound:
    body = {"model": "kimi-k2.5:premium", "messages": [{"role": "user", "content": "hi"}]}
    request = ChatRequest.model_validate(body)
    return Inbound(
        endpoint=Endpoint.CHAT,
        request=request,
        body=canonical_body(request),
        body_bytes=len(json.dumps(body)),
        api_key=None,
        request_id=f"{key}-{session}-{time.monotonic_ns()}",
        session=session,
        caller=Caller(key, "enterprise", KeyOverrides()),
    )


async def swarm_then_victim(order: str) -> list[str]:
    """A swarm key fills premium (capacity 1) and queues 4 more; then another key asks.
    The keys of the engine's requests, in the order the engine got them."""
    engine = FakeEngine(tokens=3, delay_s=0.01)
    p, _ = await premium_of_capacity(1, engine, fair_queue=order)
    swarm = [asyncio.ensure_future(p.serve(ask("swarm", "agents"))) for _ in range(5)]
    await asyncio.sleep(0.005)
    victim = asyncio.ensure_future(p.serve(ask("victim")))
    await asyncio.gather(*swarm, victim)
    return [r.split("-")[0] for r in engine.requests]


async def test_another_key_reaches_a_full_tier_before_the_swarms_backlog():
    assert await swarm_then_victim("fair") == [
        "swarm",
        "victim",
        "swarm",
        "swarm",
        "swarm",
        "swarm",
    ]


async def test_first_come_order_is_the_baseline_it_is_measured_against():
    assert await swarm_then_victim("first_come") == ["swarm"] * 5 + ["victim"]


async def test_a_wait_past_its_limit_is_a_503_with_retry_after_settled_unbilled():
    engine = FakeEngine(tokens=50, delay_s=0.01)
    p, gateway = await premium_of_capacity(1, engine, max_queue_wait_s=0.05)
    holding = asyncio.ensure_future(p.serve(ask("a")))
    await asyncio.sleep(0.005)
    with pytest.raises(APIError) as err:
        await p.serve(ask("b"))
    assert (err.value.status, err.value.code) == (503, "queue_timeout")
    assert err.value.headers["retry-after"] == "5"
    await holding
    refused = [r for r in gateway.records if r.key_id == "b"]
    assert [(r.status, r.billed, r.completion_tokens) for r in refused] == [(503, False, 0)]
    assert len(engine.requests) == 1  # the refused one never reached the engine


async def test_the_answer_says_how_long_it_waited():
    p, _ = await premium_of_capacity(4, FakeEngine())
    result = await p.serve(ask("a"))
    assert isinstance(result, Completed) and result.headers["x-kimi-queue-ms"] == "0"


async def test_off_leaves_the_engines_own_queue():
    engine = FakeEngine(tokens=3, delay_s=0.01)
    p, _ = await premium_of_capacity(1, engine, fair_queue="off")
    results = await asyncio.gather(*(p.serve(ask("a")) for _ in range(3)))
    assert all("x-kimi-queue-ms" not in r.headers for r in results)


async def test_a_key_over_its_part_of_a_full_queue_gets_429_another_key_still_joins():
    engine = FakeEngine(tokens=50, delay_s=0.01)
    p, gateway = await premium_of_capacity(1, engine)
    premium = p.config.tier("premium")
    premium.fair_share = premium.fair_share.model_copy(update={"max_queued": 3})
    await p.refresh({"premium": TierLoad(capacity=1, replicas=1)})
    swarm = [asyncio.ensure_future(p.serve(ask("swarm", "agents"))) for _ in range(4)]
    await asyncio.sleep(0.005)  # one in flight, three waiting: the queue is full
    with pytest.raises(APIError) as err:
        await p.serve(ask("swarm", "agents"))
    assert (err.value.status, err.value.code) == (429, "fair_share_exceeded")
    assert err.value.headers["retry-after"] == "2"
    other = asyncio.ensure_future(p.serve(ask("other")))  # under its part: it joins
    await asyncio.sleep(0.005)
    assert not other.done() and p.gates.gate("premium").queued == 4
    for task in swarm:
        task.cancel()
    await asyncio.gather(*swarm, return_exceptions=True)
    assert isinstance(await other, Completed)
    refused = [r for r in gateway.records if r.status == 429]
    assert [(r.key_id, r.billed) for r in refused] == [("swarm", False)]


async def test_the_router_reports_its_fairness_while_several_keys_wait():
    """The board hears each router's index (the console's tier table shows the lowest):
    none while one key waits, one as soon as a second key waits beside it."""
    engine = FakeEngine(tokens=3, delay_s=0.01)
    p, _ = await premium_of_capacity(1, engine)
    swarm = [asyncio.ensure_future(p.serve(ask("swarm", "agents"))) for _ in range(4)]
    await asyncio.sleep(0.005)
    assert p.queue_report().fairness == {}  # only the swarm waits
    other = [asyncio.ensure_future(p.serve(ask("other", "agents"))) for _ in range(2)]
    await asyncio.sleep(0.005)
    [index] = p.queue_report().fairness.values()
    assert 0 < index < 1  # the swarm was served; the other key not yet
    await asyncio.gather(*swarm, *other)
