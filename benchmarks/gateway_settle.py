"""How many admissions and settlements a second the gateway takes: its actor class run
in-process (no Ray hop), on a state dir on this machine's disk, callers one at a time and
64 at once. Every settlement is durable before it returns (a line in the usage log,
fsynced, and the key's budget totals committed in SQLite), so this is the cluster-wide
ceiling of metered requests a second, whatever the number of router replicas:

    .venv/bin/python -m benchmarks.gateway_settle [REQUESTS]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from serve_app.config import Plan
from serve_app.gateway.actor import GatewayState
from serve_app.gateway.protocol import Ask, Caller, KeyOverrides, UsageRecord

CALLER = Caller("abcdefabcdef", "pro", KeyOverrides())


def record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{n}",
        key_id=CALLER.key_id,
        plan="pro",
        tier="premium",
        model="kimi-k2.5",
        endpoint="chat",
        stream=True,
        time=time.time(),
        status=200,
        prompt_tokens=100,
        completion_tokens=64,
        cost_usd=0.0001,
    )


def in_process(root: str, batch_size: int) -> Any:
    """The gateway actor's class itself (no Ray) on the state dir `root`, with the one
    plan `pro` (premium) that CALLER is on."""
    plans = {"pro": Plan(tiers=["premium"]).model_dump(mode="json")}
    return GatewayState.__ray_actor_class__(root, plans, batch_size, 5.0)


async def rate(concurrency: int, requests: int) -> str:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as root:
        gateway = in_process(root, 1000)
        sent = 0

        async def one() -> None:
            nonlocal sent
            sent += 1
            ticket = uuid.uuid4().hex
            await gateway.admit(CALLER, Ask(164, 0.0001), ticket)
            await gateway.settle(ticket, record(sent))

        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        gateway.close()
    return (
        f"{concurrency:>3} at once: {sent / wall:,.0f} requests/s admitted and settled, "
        f"{cpu / sent * 1000:.3f} ms CPU and {wall / sent * 1000:.3f} ms wall a request"
    )


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    for concurrency in (1, 64):
        print(asyncio.run(rate(concurrency, requests)), flush=True)


if __name__ == "__main__":
    main()
