"""A session's caps are the gateway's, not a router's, and hold under bursts: requests of
one session admitted through two routers (here: two clients of one in-process gateway,
as the router replicas share the one actor) hold what they may cost at most until they
settle, so a swarm admitted at once never passes the cap; a restarted gateway still
knows the session's total (it is on disk)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.config import Price
from serve_app.gateway.limits import Ask, Limits, SessionHold, session_grant
from serve_app.gateway.protocol import Admission, Denial, UsageRecord
from tests.unit.gateway_in_process import CALLER, Gateway, plans, record

PLANS = plans(max_session_tokens=100)
PRICE = Price(input_per_mtok=1.0, output_per_mtok=4.0)


def ask(session: str, prompt: int = 20, output: int | None = 10) -> Ask:
    return Ask(prompt + (output or 0), 0.0, session, prompt, output, PRICE)


def served(n: int, session: str) -> UsageRecord:
    """20 prompt and 10 output tokens, in `session`."""
    return record(n, prompt_tokens=20, completion_tokens=10, cost_usd=0.001, session_id=session)


def test_both_routers_refuse_a_session_whose_next_request_would_pass_its_cap(tmp_path):
    async def run() -> None:
        gateway = Gateway(str(tmp_path), PLANS, 1000, 3600)
        routers = [gateway, gateway]  # each router replica calls the one gateway actor
        for n in range(3):  # 3 x 30 tokens, alternating routers: 90 of the cap of 100
            router = routers[n % 2]
            admitted = await router.admit(CALLER, ask("s1"), f"t{n}")
            assert isinstance(admitted, Admission) and admitted.max_output is None
            await router.settle(f"t{n}", served(n, "s1"))
        for n, router in enumerate(routers):  # 20 prompt tokens no longer fit
            refused = await router.admit(CALLER, ask("s1"), f"late{n}")
            assert isinstance(refused, Denial) and refused.status == 402
            assert refused.code == "session_budget_exceeded"
        other = await gateway.admit(CALLER, ask("s2"), "other")
        assert not isinstance(other, Denial)  # another session of the key is served
        gateway.close()
        again = Gateway(str(tmp_path), PLANS, 1000, 3600)  # the actor restarted
        still = await again.admit(CALLER, ask("s1"), "after")
        assert isinstance(still, Denial) and still.code == "session_budget_exceeded"
        again.close()

    asyncio.run(run())


def test_a_swarm_admitted_at_once_holds_what_it_may_cost_and_never_passes_the_cap(tmp_path):
    """100 requests of one session admitted before any settles: each is let in only with
    its most possible cost held (its output limit lowered to what is left), so even if
    every one used all it was allowed the session stays within its cap."""

    async def run() -> None:
        gateway = Gateway(str(tmp_path), plans(max_session_tokens=2000), 1000, 3600)
        answers = [await gateway.admit(CALLER, ask("swarm", 20, 64), f"t{n}") for n in range(100)]
        admitted = [a for a in answers if isinstance(a, Admission)]
        worst = sum(20 + (a.max_output if a.max_output is not None else 64) for a in admitted)
        # 23 x (20 + 64) = 1932 held; the 24th fits with its output lowered to 48
        assert worst == 2000 and len(admitted) == 24
        assert admitted[-1].max_output == 2000 - 23 * 84 - 20
        refused = [a for a in answers if isinstance(a, Denial)]
        assert {(d.status, d.code) for d in refused} == {(402, "session_budget_exceeded")}
        # each settles with less than it held: the holds go, the room comes back
        for n, a in enumerate(admitted):
            await gateway.settle(a.ticket, served(n, "swarm"))
        assert gateway.holds == {}
        more = await gateway.admit(CALLER, ask("swarm", 20, 64), "more")
        assert isinstance(more, Admission)  # 24 x 30 = 720 used: room again
        gateway.close()

    asyncio.run(run())


def test_concurrency_per_session_is_capped_and_freed_as_requests_end(tmp_path):
    async def run() -> None:
        gateway = Gateway(str(tmp_path), plans(max_concurrent_per_session=2), 1000, 3600)
        first = [await gateway.admit(CALLER, ask("s"), f"t{n}") for n in range(3)]
        assert [isinstance(a, Admission) for a in first] == [True, True, False]
        assert first[2].status == 429 and first[2].code == "session_concurrency_exceeded"
        assert isinstance(await gateway.admit(CALLER, ask("other"), "o"), Admission)
        await gateway.settle("t0", served(0, "s"))
        assert isinstance(await gateway.admit(CALLER, ask("s"), "t3"), Admission)
        gateway.close()

    asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(
    cap_tokens=st.integers(1, 5000),
    cap_usd=st.floats(0.0001, 0.05),
    requests=st.lists(
        st.tuples(st.integers(0, 800), st.one_of(st.none(), st.integers(1, 800))), max_size=60
    ),
)
def test_what_is_admitted_can_never_cost_past_the_caps(cap_tokens, cap_usd, requests):
    """Property: whatever the asks, the worst case of everything admitted (all prompts at
    their bound, all outputs at their granted limit) stays within both caps."""
    limits = Limits(max_session_tokens=cap_tokens, max_session_spend_usd=cap_usd)
    held = SessionHold()
    for prompt, output in requests:
        granted = session_grant(limits, 0, 0.0, held, ask("s", prompt, output))
        if isinstance(granted, Denial):
            continue
        lowered, hold = granted
        out = lowered if lowered is not None else output
        assert out is not None and out >= 1
        assert hold.tokens == prompt + out
        held.add(hold)
    assert held.tokens <= cap_tokens and held.spend <= cap_usd + 1e-12
