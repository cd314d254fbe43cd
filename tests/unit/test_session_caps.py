"""A session cap is the gateway's, not a router's: requests of one session admitted and
settled through two routers (here: two clients of one in-process gateway, as the router
replicas share the one actor) are refused by both once the session used its cap, and a
restarted gateway still knows the session's total (it is on disk)."""

from __future__ import annotations

import asyncio

from serve_app.gateway.protocol import Denial, UsageRecord
from tests.unit.gateway_in_process import CALLER, Gateway, plans, record

PLANS = plans(max_session_tokens=100)


def served(n: int, session: str) -> UsageRecord:
    """20 prompt and 10 output tokens, in `session`."""
    return record(n, prompt_tokens=20, completion_tokens=10, cost_usd=0.001, session_id=session)


def test_both_routers_refuse_a_session_past_its_cap_and_a_restart_remembers(tmp_path):
    async def run() -> None:
        gateway = Gateway(str(tmp_path), PLANS, 1000, 3600)
        routers = [gateway, gateway]  # each router replica calls the one gateway actor
        for n in range(4):  # 4 x 30 tokens, alternating routers: the cap of 100 is passed
            router = routers[n % 2]
            admitted = await router.admit(CALLER, 10, 0.0, f"t{n}", "s1")
            assert not isinstance(admitted, Denial), admitted
            await router.settle(f"t{n}", served(n, "s1"))
        for n, router in enumerate(routers):
            refused = await router.admit(CALLER, 10, 0.0, f"late{n}", "s1")
            assert isinstance(refused, Denial) and refused.status == 402
            assert refused.code == "session_budget_exceeded"
        other = await gateway.admit(CALLER, 10, 0.0, "other", "s2")
        assert not isinstance(other, Denial)  # another session of the key is served
        gateway.close()
        again = Gateway(str(tmp_path), PLANS, 1000, 3600)  # the actor restarted
        still = await again.admit(CALLER, 10, 0.0, "after", "s1")
        assert isinstance(still, Denial) and still.code == "session_budget_exceeded"
        again.close()

    asyncio.run(run())
