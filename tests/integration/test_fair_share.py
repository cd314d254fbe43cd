"""The fair queue in front of a tier, through real Ray Serve, two ingress replicas and
vLLM: one key's swarm fills premium and queues at the routers; another key's requests
go ahead of the swarm's backlog. Asserted on order and on what the platform reports
(the board's queue, the answers' `x-kimi-queue-ms`), not on wall-clock bounds."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.conftest import new_key, tier_status, wait_for

SWARM = 24  # premium runs 8 at once in the tests' overlay: most of these queue


def streamed(url: str, key: str, max_tokens: int, session: str | None) -> dict:
    """One streamed chat pinned to premium: when its first event came and when it ended
    (monotonic), and the queue wait its answer names."""
    body = {
        "model": "kimi-k2.5:premium",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {key}"}
    if session:
        headers["x-session-id"] = session
    first, sent = None, time.monotonic()
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300
    ) as r:
        assert r.status_code == 200, r.read()[:300]
        queue_ms = float(r.headers["x-kimi-queue-ms"])
        for line in r.iter_lines():
            if first is None and line.startswith("data: "):
                first = time.monotonic()
    return {"sent": sent, "first": first, "ended": time.monotonic(), "queue_ms": queue_ms}


def test_another_keys_requests_go_ahead_of_a_swarms_backlog(serve_url, admin):
    swarm_key, _ = new_key(admin, "enterprise")
    victim_key, _ = new_key(admin, "enterprise")
    queued_seen = threading.Event()
    with ThreadPoolExecutor(SWARM) as pool:
        swarm = [
            pool.submit(streamed, serve_url, swarm_key, 48, "swarm-task") for _ in range(SWARM)
        ]

        def queued() -> int:
            n = (tier_status(serve_url, "premium") or {}).get("queued", 0)
            if n:
                queued_seen.set()
            return n

        wait_for("the swarm queued at the routers", queued, 120, every_s=0.2)
        victim = [streamed(serve_url, victim_key, 4, None) for _ in range(3)]
        answers = [f.result() for f in swarm]
    assert queued_seen.is_set()
    assert any(a["queue_ms"] > 0 for a in answers)  # the swarm waited at the routers
    # each of the other key's requests went ahead of the swarm's backlog: some swarm
    # request queued before it was sent started only after it had been answered
    for v in victim:
        overtaken = [a for a in answers if a["sent"] < v["sent"] and a["first"] > v["ended"]]
        assert overtaken, (v, sorted(a["first"] for a in answers))
    assert max(v["queue_ms"] for v in victim) <= max(a["queue_ms"] for a in answers)
