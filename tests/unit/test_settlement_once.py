"""Exactly-once settlement, property-based: whatever the interleaving of admissions and
settlements repeated by retries, and a gateway process replaced mid-way (its state from
disk), each request is metered once and the key's month totals count it once."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.gateway.actor import month_of
from serve_app.gateway.keys import KeyStore
from serve_app.gateway.protocol import Ask
from serve_app.gateway.usage_log import read_usage
from tests.unit.gateway_in_process import CALLER, T0, Gateway, plans, record

PLANS = plans()


requests = st.lists(
    st.tuples(st.integers(1, 4), st.sampled_from([200, 200, 499, 503])), min_size=1, max_size=12
)


@settings(max_examples=40, deadline=None)
@given(requests=requests, seed=st.integers(0, 2**32 - 1), restart_at=st.integers(0, 48))
def test_each_request_is_metered_once_however_its_settlement_is_repeated(
    tmp_path_factory, requests, seed, restart_at
):
    root = tmp_path_factory.mktemp("gw")
    rng = random.Random(seed)

    async def run() -> None:
        gateway = Gateway(str(root), PLANS, 1000, 3600)
        tickets = [f"t{n}" for n in range(len(requests))]
        for ticket in tickets:
            assert (await gateway.admit(CALLER, Ask(100, 0.01), ticket)).ticket == ticket
            await gateway.admit(CALLER, Ask(100, 0.01), ticket)  # a retried admission
        calls = [(n, t) for n, t in enumerate(tickets) for _ in range(requests[n][0])]
        rng.shuffle(calls)
        for i, (n, ticket) in enumerate(calls):
            if i == restart_at:  # the process dies; Ray starts a new one on the same dir
                gateway.meter._wal = None  # (what it wrote stays; nothing is flushed)
                gateway = Gateway(str(root), PLANS, 1000, 3600)
            rec = record(n, requests[n][1], cost_usd=0.001 * (n + 1) * (requests[n][1] == 200))
            settles = [gateway.settle(ticket, rec)]
            if rng.random() < 0.5:  # the same settlement twice at once
                settles.append(gateway.settle(ticket, rec))
            await asyncio.gather(*settles)
        gateway.close()

    asyncio.run(run())
    ids = read_usage(root / "usage")["request_id"].to_pylist()
    assert sorted(ids) == sorted(f"req-{n}" for n in range(len(requests)))
    billed = [(n, s) for n, (_, s) in enumerate(requests) if s in (200, 499)]
    tokens = sum(10 + n + 1 for n, _ in billed)
    month = month_of(T0)
    assert KeyStore(root / "keys.db").month_usage(CALLER.key_id, month)[0] == tokens


def test_settlements_at_once_share_their_writes_and_each_is_durable_when_it_returns(
    tmp_path, monkeypatch
):
    """Group commit: 64 settlements at once cost a few fsyncs, not 64 of the usage log and
    64 key-store commits; yet none returns before its record is in the fsynced log and
    its tokens in the committed totals."""
    import os

    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    n = 64

    async def run() -> None:
        gateway = Gateway(str(tmp_path), PLANS, 1000, 3600)
        for i in range(n):
            await gateway.admit(CALLER, Ask(100, 0.01), f"t{i}")
        store = KeyStore(tmp_path / "keys.db")  # another connection: sees commits only

        async def settle(i: int) -> None:
            await gateway.settle(f"t{i}", record(i))
            logged = "".join(p.read_text() for p in (tmp_path / "usage" / "_wal").iterdir())
            assert f'"request_id":"req-{i}"' in logged
            assert store.month_usage(CALLER.key_id, month_of(T0))[0] >= 10 + i + 1

        await asyncio.gather(*(settle(i) for i in range(n)))
        logged = "".join(p.read_text() for p in (tmp_path / "usage" / "_wal").iterdir())
        assert len(logged.splitlines()) == n
        tokens = sum(10 + i + 1 for i in range(n))
        assert store.month_usage(CALLER.key_id, month_of(T0))[0] == tokens
        gateway.close()

    asyncio.run(run())
    assert 0 < len(fsyncs) <= 8, len(fsyncs)
