"""Where the gateway actor's memory goes as requests are metered: its actor class run
in-process (no Ray), each cycle one admission with a lease, one renewal and one
settlement (the soak's per-request calls), the usage log flushed to Parquet as in
production; once as shipped and once with the day's compaction switched off, each in a
fresh process so their resident memory does not mix:

    .venv/bin/python -m benchmarks.gateway_memory [--cycles 6000]

Reports each run's RSS growth over the cycles (after 2,000 warm-up cycles) and what
Python itself allocated meanwhile (tracemalloc): growth that Python does not see is
native (Arrow's buffers, the allocator holding freed pages).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
import uuid

import psutil

from benchmarks.gateway_settle import CALLER, in_process, record
from serve_app.gateway.leases import Lease, Progress, Renewal
from serve_app.gateway.protocol import Ask

WARMUP = 2000


async def cycles(root: str, n: int, compaction: bool) -> dict[str, float]:
    gateway = in_process(root, 200)  # the production batch size
    if not compaction:
        gateway.meter.compact = lambda: 0

    async def one(i: int) -> None:
        ticket, session = f"t-{uuid.uuid4().hex}", f"s-{i % 50}"
        r = record(i).model_copy(update={"request_id": f"r-{ticket}", "session_id": session})
        ask = Ask(tokens=100, cost=0.0, session=session)
        await gateway.admit(CALLER, ask, ticket, Lease(router="ingress-0", draft=r))
        progress = {ticket: Progress(prompt_tokens=10)}
        await gateway.renew(Renewal(router="ingress-0", progress=progress))
        await gateway.settle(ticket, r)

    for i in range(WARMUP):
        await one(i)
    gc.collect()
    tracemalloc.start()
    rss = psutil.Process().memory_info().rss
    for i in range(n):
        await one(i)
        await asyncio.sleep(0)  # the flush loop's turn, as in the actor
    gc.collect()
    python, _ = tracemalloc.get_traced_memory()
    grown = psutil.Process().memory_info().rss - rss
    return {"rss_mib": grown / 2**20, "python_mib": python / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=6000)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="kimi-gw-mem-") as root:
            print(json.dumps(asyncio.run(cycles(root, args.cycles, args.one == "on"))))
        return
    for setting in ("on", "off"):
        cmd = [sys.executable, "-m", "benchmarks.gateway_memory", "--cycles", str(args.cycles)]
        out = subprocess.run([*cmd, "--one", setting], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"compaction {setting}: {args.cycles} cycles, RSS {got['rss_mib']:+.1f} MiB,"
            f" of which Python's own allocations {got['python_mib']:.1f} MiB"
        )


if __name__ == "__main__":
    main()
