"""Leases (gateway/leases.py, pipeline/open_requests.py): a request whose router replica
dies is settled once by the gateway from its draft, with the tokens last relayed, billed
nothing; the router's own late settlement meters nothing twice; a restarted gateway gets
the drafts again."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from serve_app.gateway.keys import KeyOverrides
from serve_app.gateway.leases import LOST, Lease, LeaseBook
from serve_app.gateway.protocol import Caller
from serve_app.gateway.usage_log import read_usage
from serve_app.pipeline.open_requests import OpenRequests
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Streamed
from serve_app.pipeline.telemetry import IngressMetrics
from tests.fakes.engine import FakeEngine
from tests.fakes.gateway import CFG
from tests.fakes.tiers import InProcessTiers
from tests.unit.gateway_in_process import Gateway, record
from tests.unit.test_pipeline import inbound

CALLER = Caller("abcdefabcdef", "enterprise", KeyOverrides())
PLANS = {name: plan.model_dump(mode="json") for name, plan in CFG.plans.items()}


def router_and_gateway(tmp_path, engine: FakeEngine) -> tuple[Pipeline, Gateway]:
    gateway = Gateway(str(tmp_path), PLANS, 1000, 3600)
    router = Pipeline(CFG, InProcessTiers(premium=engine), gateway, "ingress-0", IngressMetrics())
    return router, gateway


async def lapse(gateway: Gateway) -> None:
    """The lease runs out (as `LEASE_S` of silence would) and the gateway settles."""
    gateway.leases.lease_s = 0.0
    await asyncio.sleep(0.001)
    await gateway._settle_lapsed()


def records(gateway: Gateway, tmp_path) -> list[dict]:
    gateway.close()
    return read_usage(tmp_path / "usage").to_pylist()


async def test_a_stream_whose_router_dies_is_settled_once_from_its_lease(tmp_path):
    engine = FakeEngine(tokens=1000, delay_s=0.001)
    router, gateway = router_and_gateway(tmp_path, engine)
    request = dataclasses.replace(inbound("kimi-k2.5:premium", stream=True), caller=CALLER)
    result = await router.serve(request)
    assert isinstance(result, Streamed)
    result.started()
    relayed = 0
    async for text in result.events:
        relayed += text.count("data: ")
        if relayed >= 5:
            break
    await router.open.renew(gateway)  # the last renewal before the router dies
    await lapse(gateway)
    assert gateway.states[CALLER.key_id].in_flight == 0  # its admission is back
    await result.close()  # a router thought gone settles after all: nothing twice
    [row] = records(gateway, tmp_path)
    assert row["request_id"] == request.request_id and row["status"] == 502
    assert row["error"] == LOST and row["cost_usd"] == 0.0
    assert 5 <= row["completion_tokens"] < 1000  # what was relayed until the last renewal


async def test_a_request_admitted_but_never_sent_is_settled_with_no_tokens(tmp_path):
    router, gateway = router_and_gateway(tmp_path, FakeEngine())
    request = dataclasses.replace(inbound("kimi-k2.5:premium"), caller=CALLER)
    await router.admit(request)  # admitted (a background run, or waiting its turn)
    await lapse(gateway)  # the router died before any renewal: the admission's lease holds
    [row] = records(gateway, tmp_path)
    assert (row["status"], row["completion_tokens"], row["cost_usd"]) == (502, 0, 0.0)


async def test_a_router_that_keeps_renewing_is_never_settled_for(tmp_path):
    router, gateway = router_and_gateway(tmp_path, FakeEngine())
    request = dataclasses.replace(inbound("kimi-k2.5:premium"), caller=CALLER)
    gateway.leases.lease_s = 0.05
    await router.admit(request)
    await asyncio.sleep(0.1)  # longer than the lease...
    await router.open.renew(gateway)  # ...but renewed
    await gateway._settle_lapsed()
    assert records(gateway, tmp_path) == []


async def test_a_restarted_gateway_is_sent_the_drafts_again(tmp_path):
    router, gateway = router_and_gateway(tmp_path, FakeEngine())
    request = dataclasses.replace(inbound("kimi-k2.5:premium"), caller=CALLER)
    ctx = await router.admit(request)
    gateway.leases = LeaseBook()  # what a new gateway process knows
    await router.open.renew(gateway)  # told it is unknown...
    assert router.open.resend == {ctx.admission.ticket}
    await router.open.renew(gateway)  # ...and sends its draft
    assert not router.open.resend and ctx.admission.ticket in gateway.leases.drafts
    await lapse(gateway)
    [row] = records(gateway, tmp_path)
    assert row["request_id"] == request.request_id and row["status"] == 502


def test_nothing_open_renews_nothing():
    book, open_requests = LeaseBook(), OpenRequests("ingress-0")
    assert open_requests.renewal().progress == {} and book.lapsed() == []


def test_an_admission_renews_its_routers_lease():
    book = LeaseBook(lease_s=60.0)
    book.renewed["ingress-0"] = (0.0, 0.0)  # heard from long ago, then idle
    book.open("t1", Lease(router="ingress-0", draft=record(1, 502)))
    assert book.lapsed() == []


def test_a_gateway_that_was_paused_gives_every_router_a_fresh_lease():
    """Frozen or held up, the gateway heard no renewal: its routers are not the ones gone."""
    book = LeaseBook(lease_s=60.0, pause_s=30.0)
    book.open("t1", Lease(router="ingress-0", draft=record(1, 502)))
    book.renewed["ingress-0"] = (time.monotonic() - 120, 0.0)  # last heard two minutes ago
    book.checked_at -= 100  # ...and the book last checked long ago: the gateway's pause
    assert book.lapsed() == [] and "t1" in book.drafts
    book.renewed["ingress-0"] = (time.monotonic() - 120, 0.0)  # silent since, checked on time
    assert [ticket for ticket, _ in book.lapsed()] == ["t1"]
