"""The fair queue's order (routing/fair_queue.py): who goes next, a lone key never held,
a newcomer not behind a backlog, the service gap between backlogged keys bounded."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.routing.fair_queue import FairQueue, QueueFull, QueueTimeout, RecentService


async def turn() -> None:
    """Let every waiter the gate just let through resume."""
    for _ in range(6):
        await asyncio.sleep(0)


async def test_a_lone_key_is_never_held_while_the_tier_has_room():
    gate = FairQueue(bound=4, shared_bound=2)
    slots = [await gate.enter("swarm", f"s{n}", 10, 1.0, None) for n in range(4)]
    assert gate.in_flight == 4 and gate.queued == 0
    assert all(s.waited_s == 0.0 for s in slots)


async def test_another_key_goes_before_a_backlogged_key():
    gate = FairQueue(bound=2, shared_bound=2)
    running = [await gate.enter("swarm", "a", 100, 1.0, None) for _ in range(2)]
    backlog = [asyncio.ensure_future(gate.enter("swarm", "a", 100, 1.0, None)) for _ in range(5)]
    await turn()
    victim = asyncio.ensure_future(gate.enter("victim", "v", 10, 1.0, None))
    await turn()
    assert gate.queued == 6
    running[0].close(output_tokens=50)
    await turn()
    assert victim.done() and not any(b.done() for b in backlog)
    for slot in [running[1], victim.result()]:
        slot.close(10)
    for b in backlog:  # the swarm's backlog drains afterwards
        (await b).close(10)
    assert gate.in_flight == 0 and gate.queued == 0


async def test_first_come_order_when_fairness_is_off():
    gate = FairQueue(bound=1, shared_bound=1, fair=False)
    first = await gate.enter("swarm", "a", 100, 1.0, None)
    backlog = [asyncio.ensure_future(gate.enter("swarm", "a", 100, 1.0, None)) for _ in range(3)]
    await turn()
    victim = asyncio.ensure_future(gate.enter("victim", "v", 10, 1.0, None))
    await turn()
    first.close(10)
    await turn()
    assert backlog[0].done() and not victim.done()


async def test_within_a_key_an_interactive_session_goes_before_the_swarm_session():
    gate = FairQueue(bound=1, shared_bound=1)
    first = await gate.enter("key", "swarm", 100, 1.0, None)
    swarm = [asyncio.ensure_future(gate.enter("key", "swarm", 100, 1.0, None)) for _ in range(3)]
    await turn()
    chat = asyncio.ensure_future(gate.enter("key", "chat", 10, 1.0, None))
    await turn()
    first.close(10)
    await turn()
    assert chat.done() and not any(s.done() for s in swarm)


async def test_beside_its_chat_a_keys_swarm_session_keeps_to_the_shared_places():
    gate = FairQueue(bound=8, shared_bound=4)
    chat = await gate.enter("key", "chat", 10, 1.0, None)
    chat.close(2)  # the chat is idle now, but active
    swarm = [asyncio.ensure_future(gate.enter("key", "swarm", 10, 1.0, None)) for _ in range(9)]
    await turn()
    # its part (2 of the 4 shared places) and one more, one kept for the chat
    assert gate.in_flight == 3
    again = await gate.enter("key", "chat", 10, 1.0, None)
    assert again.waited_s == 0.0  # at once, into a small batch
    again.close(2)
    for s in swarm[:3]:
        (await s).close(5)
    await turn()
    assert sum(s.done() for s in swarm) == 6 and gate.in_flight == 3


async def test_a_swarm_of_one_request_a_session_keeps_the_whole_tier():
    gate = FairQueue(bound=8, shared_bound=2)
    agents = [await gate.enter("key", f"agent-{i}", 10, 1.0, None) for i in range(8)]
    assert gate.in_flight == 8 and all(a.waited_s == 0.0 for a in agents)


async def test_a_session_active_at_another_router_is_kept_a_place_here():
    gate = FairQueue(bound=4, shared_bound=4)
    gate.sessions_elsewhere = {"key": frozenset({"chat", "swarm"})}
    swarm = [asyncio.ensure_future(gate.enter("key", "swarm", 10, 1.0, None)) for _ in range(6)]
    await turn()
    assert sum(s.done() for s in swarm) == 3
    chat = await gate.enter("key", "chat", 10, 1.0, None)
    assert chat.waited_s == 0.0


async def test_a_key_with_one_session_keeps_no_place_back():
    gate = FairQueue(bound=4, shared_bound=2)
    first = await gate.enter("key", "swarm", 10, 1.0, None)
    first.close(2)
    swarm = [asyncio.ensure_future(gate.enter("key", "swarm", 10, 1.0, None)) for _ in range(6)]
    await turn()
    assert gate.in_flight == 4 and sum(s.done() for s in swarm) == 4
    assert gate.local_sessions() == {}


async def test_a_newcomer_goes_at_once_and_the_swarm_shrinks_to_the_shared_bound():
    gate = FairQueue(bound=8, shared_bound=2)
    swarm = [await gate.enter("swarm", None, 10, 1.0, None) for _ in range(6)]
    assert gate.limit(len(gate.active_keys())) == 8  # alone, the whole capacity
    victim = await gate.enter("victim", None, 10, 1.0, None)
    assert victim.waited_s == 0.0 and gate.in_flight == 7  # under its share: at once
    more = asyncio.ensure_future(gate.enter("swarm", None, 10, 1.0, None))
    await turn()
    assert not more.done()  # over its share and the shared bound: it waits
    for slot in swarm[:5]:  # the swarm's batch drains to the shared bound
        slot.close(5)
        await turn()
        assert not more.done()
    swarm[5].close(5)  # in flight now: the victim alone
    await turn()
    assert more.done() and gate.in_flight == 2


async def test_a_swarm_past_its_share_leaves_room_for_an_idle_active_key():
    gate = FairQueue(bound=4, shared_bound=4)
    swarm = [await gate.enter("swarm", "s", 10, 1.0, None) for _ in range(4)]
    backlog = [asyncio.ensure_future(gate.enter("swarm", "s", 10, 1.0, None)) for _ in range(6)]
    first = asyncio.ensure_future(gate.enter("victim", None, 10, 1.0, None))
    await turn()
    assert not first.done()  # the tier was full before it came: it waits for one to end
    swarm[0].close(5)
    await turn()
    assert first.done() and not any(b.done() for b in backlog)  # it goes ahead
    first.result().close(2)
    await turn()
    # the victim, idle now but active, keeps a place: the swarm refills to 3 of 4
    assert gate.in_flight == 3 and sum(b.done() for b in backlog) == 0
    again = await gate.enter("victim", None, 10, 1.0, None)
    assert again.waited_s == 0.0  # at once
    again.close(2)
    for slot in swarm[1:]:
        slot.close(5)
    await turn()
    assert gate.in_flight == 3 and sum(b.done() for b in backlog) == 3


async def test_a_key_active_at_another_router_is_kept_a_place_here():
    gate = FairQueue(bound=4, shared_bound=4)
    gate.elsewhere = frozenset({"victim"})
    swarm = [asyncio.ensure_future(gate.enter("swarm", "s", 10, 1.0, None)) for _ in range(6)]
    await turn()
    assert sum(s.done() for s in swarm) == 3
    victim = await gate.enter("victim", None, 10, 1.0, None)
    assert victim.waited_s == 0.0


async def test_the_places_kept_for_idle_keys_are_at_most_half_the_shared_bound():
    gate = FairQueue(bound=8, shared_bound=8)
    gate.elsewhere = frozenset(f"idle-{i}" for i in range(20))
    swarm = [asyncio.ensure_future(gate.enter("swarm", "s", 10, 1.0, None)) for _ in range(8)]
    await turn()
    assert sum(s.done() for s in swarm) == 4


async def test_a_wait_past_its_limit_leaves_the_queue():
    gate = FairQueue(bound=1, shared_bound=1)
    held = await gate.enter("a", None, 10, 1.0, None)
    with pytest.raises(QueueTimeout):
        await gate.enter("b", None, 10, 1.0, 0.01)
    assert gate.queued == 0 and gate.limit(len(gate.active_keys())) == 1
    held.close(1)
    assert gate.in_flight == 0


async def test_a_cancelled_waiter_gives_its_place_back():
    gate = FairQueue(bound=1, shared_bound=1)
    held = await gate.enter("a", None, 10, 1.0, None)
    waiter = asyncio.ensure_future(gate.enter("b", None, 10, 1.0, None))
    await turn()
    waiter.cancel()
    await turn()
    assert gate.queued == 0
    held.close(1)
    assert gate.in_flight == 0


async def service_gaps(weight_b: float, costs: dict[str, list[int]]) -> list[float]:
    """Keys a (weight 1) and b keep requests waiting for a tier of one slot; each slot's
    request outputs its cost. The weighted service gap after every completion while
    both are still backlogged."""
    gate = FairQueue(bound=1, shared_bound=1)
    weights = {"a": 1.0, "b": weight_b}
    waiting = {k: [asyncio.ensure_future(gate.enter(k, None, 0, weights[k], None)) for _ in v]
               for k, v in costs.items()}  # fmt: skip
    served = {"a": 0.0, "b": 0.0}
    gaps = []
    for _ in range(len(costs["a"]) + len(costs["b"])):
        await turn()
        [(key, slot)] = [(k, f) for k, fs in waiting.items() for f in fs if f.done()]
        waiting[key].remove(slot)
        cost = costs[key][len(costs[key]) - len(waiting[key]) - 1]
        served[key] += 2 * cost / weights[key]
        slot.result().close(cost)
        if waiting["a"] and waiting["b"]:
            gaps.append(abs(served["a"] - served["b"]))
    return gaps


@settings(max_examples=40, deadline=None)
@given(
    costs=st.lists(st.integers(1, 64), min_size=20, max_size=20),
    other=st.lists(st.integers(1, 64), min_size=20, max_size=20),
    weight=st.sampled_from([1.0, 2.0, 3.0]),
)
def test_the_service_gap_between_backlogged_keys_stays_bounded(costs, other, weight):
    """VTC's bound: while both wait, their weighted service differs by at most about
    one request's worth (2 x the largest output / the smaller weight) per slot."""
    gaps = asyncio.run(service_gaps(weight, {"a": costs, "b": other}))
    bound = 2 * (2 * 64)  # two requests' worth of the largest output, at weight 1
    assert gaps and all(gap <= bound for gap in gaps)


async def test_a_key_between_its_requests_still_keeps_the_swarms_batch_small():
    gate = FairQueue(bound=8, shared_bound=2, active_s=60)
    (await gate.enter("victim", None, 10, 1.0, None)).close(4)  # asked, answered, idle now
    swarm = [asyncio.ensure_future(gate.enter("swarm", None, 10, 1.0, None)) for _ in range(4)]
    await turn()
    # its share of the shared bound (1), the other place kept for the victim's next request
    assert [s.done() for s in swarm] == [True, False, False, False]
    later = FairQueue(bound=8, shared_bound=2, active_s=0.0)  # the victim long gone
    (await later.enter("victim", None, 10, 1.0, None)).close(4)
    await asyncio.sleep(0.001)
    assert all([(await later.enter("swarm", None, 10, 1.0, None)).waited_s == 0 for _ in range(4)])
    for s in swarm[:3]:
        await turn()
        s.result().close(1)
    await turn()
    assert all(s.done() for s in swarm)
    for s in swarm[2:]:
        s.result().close(1)


async def test_a_newcomer_tied_with_the_least_served_goes_before_its_backlog():
    gate = FairQueue(bound=2, shared_bound=2)
    running = [await gate.enter("swarm", None, 0, 1.0, None) for _ in range(2)]
    backlog = asyncio.ensure_future(gate.enter("swarm", None, 0, 1.0, None))
    await turn()
    victim = asyncio.ensure_future(gate.enter("victim", None, 0, 1.0, None))
    await turn()
    assert gate.keys.served["victim"] == gate.keys.served["swarm"]  # lifted: a tie
    running[0].close(0)
    await turn()
    assert victim.done() and not backlog.done()
    for slot in (running[1], victim.result()):
        slot.close(0)
    await turn()
    (await backlog).close(0)


async def test_a_full_queue_refuses_the_key_holding_its_part_of_it():
    gate = FairQueue(bound=1, shared_bound=1)
    gate.max_queued = 4
    first = await gate.enter("swarm", "s", 10, 1.0, None)
    waiting = [asyncio.ensure_future(gate.enter("swarm", "s", 10, 1.0, None)) for _ in range(4)]
    await turn()
    with pytest.raises(QueueFull):  # alone, its part is the whole queue
        await gate.enter("swarm", "s", 10, 1.0, None)
    other = asyncio.ensure_future(gate.enter("other", None, 10, 1.0, None))
    await turn()
    assert gate.queued == 5  # the other key joined past the bound
    with pytest.raises(QueueFull):  # two keys active: each holds at most 2 of 4
        await gate.enter("swarm", "s", 10, 1.0, None)
    first.close(1)
    await turn()
    assert other.done()  # and it goes first
    for w in waiting:
        w.cancel()


async def test_the_batch_is_split_by_weight_between_backlogged_keys():
    gate = FairQueue(bound=8, shared_bound=8)
    light = [asyncio.ensure_future(gate.enter("light", "s", 10, 1.0, None)) for _ in range(8)]
    heavy = [asyncio.ensure_future(gate.enter("heavy", "s", 10, 3.0, None)) for _ in range(8)]
    await turn()
    # the light key came first and filled the tier; as its requests end, the places go
    # to the heavy key until the batch is split 1:3 (2 and 6 of 8)
    for _ in range(12):
        done = [w for w in light + heavy if w.done() and not w.result().closed]
        running_light = [w for w in done if w in light]
        if len(running_light) <= 2:
            break
        running_light[0].result().close(5)
        await turn()
    assert gate.running["light"] == 2 and gate.running["heavy"] == 6
    for w in light + heavy:
        w.cancel()


async def backlogged_pair(fair: bool, weights: tuple[float, float] = (1.0, 1.0)) -> FairQueue:
    """Key a's 30 requests arrive before key b's 30, one place; 20 served, one at a time."""
    gate = FairQueue(bound=1, shared_bound=1, fair=fair)
    waiting = [
        asyncio.ensure_future(gate.enter(key, key, 10, weight, None))
        for key, weight in zip("ab", weights, strict=True)
        for _ in range(30)
    ]
    await turn()
    for _ in range(20):
        [slot] = [w.result() for w in waiting if w.done() and not w.result().closed]
        slot.close(output_tokens=20)
        await turn()
    for w in waiting:
        w.cancel()
    return gate


async def test_the_fairness_index_reads_the_recent_service_of_the_keys_waiting():
    assert (await backlogged_pair(fair=True)).fairness() == pytest.approx(1.0, abs=0.01)
    # first come: a's backlog goes first, b has had nothing
    assert (await backlogged_pair(fair=False)).fairness() == pytest.approx(0.5, abs=0.01)
    # weights 1:3 served 1:3 are even, as the order counts service (tokens over weight)
    assert (await backlogged_pair(True, (1.0, 3.0))).fairness() == pytest.approx(1.0, abs=0.05)
    alone = FairQueue(bound=1, shared_bound=1)
    (await alone.enter("a", "a", 10, 1.0, None)).close(5)
    assert alone.fairness() is None  # nobody waits: nothing to choose between


def test_recent_service_fades_with_time(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("serve_app.routing.fair_queue.time.monotonic", lambda: clock[0])
    recent = RecentService(tau_s=10.0)
    recent.charge("a", 100.0)
    clock[0] += 10.0
    recent.charge("b", 100.0)
    assert recent.value("a") == pytest.approx(100 / 2.718281828, rel=1e-6)
    clock[0] += 1000.0
    recent.charge("b", 1.0)  # long idle: a leaves the table
    assert "a" not in recent.served
    assert recent.jain({"a", "b"}) < 0.95  # b was served lately, a a while ago


async def test_the_queue_counts_its_waiting_by_service_tier():
    gate = FairQueue(bound=1, shared_bound=1)
    first = await gate.enter("a", "a", 10, 1.0, None)
    flex = [asyncio.ensure_future(gate.enter("a", "a", 10, 0.25, None, "flex")) for _ in range(3)]
    now = asyncio.ensure_future(gate.enter("b", "b", 10, 4.0, None, "priority"))
    await turn()
    assert gate.queued_by_band() == {"flex": 3, "priority": 1}
    first.close(1)
    await turn()
    assert now.done()  # the priority band's weight, and a key not yet served
    now.result().close(1)
    for f in flex:
        (await f).close(1)
    assert gate.queued_by_band() == {"flex": 0, "priority": 0}  # still reported, at 0
