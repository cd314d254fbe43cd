"""The fair queue in front of a tier, through real Ray Serve, two ingress replicas and
vLLM: one key's swarm fills premium and queues at the routers; another key's requests
go ahead of the swarm's backlog. Asserted on order and on what the platform reports
(the board's queue, the answers' `x-kimi-queue-ms`), not on wall-clock bounds."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.compute as pc

from benchmarks.holdback import metrics_ports
from tests.integration.conftest import flushed_usage, new_key, saturated, tier_status, wait_for

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


def exported(pattern: str) -> dict[str, float]:
    """The series of the routers' metrics whose line starts with `pattern`, as exported
    to Prometheus (Ray's agents export every few seconds): line -> value."""
    text = "\n".join(
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text for port in metrics_ports()
    )
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(pattern)
    }


def test_another_keys_requests_go_ahead_of_a_swarms_backlog(serve_url, admin):
    swarm_key, swarm_id = new_key(admin, "enterprise")
    victim_key, victim_id = new_key(admin, "enterprise")
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

    # each key's service through the queue, as its order counts it, and the index
    def served() -> dict[str, float] | None:
        series = exported("ray_kimi_queue_service_tokens_total{")
        mine = {
            who: sum(v for line, v in series.items() if f'key_id="{kid}"' in line)
            for who, kid in (("swarm", swarm_id), ("victim", victim_id))
        }
        return mine if all(mine.values()) else None

    service = wait_for("each key's service exported", served, 90, every_s=2)
    assert service["swarm"] > service["victim"]  # 24 long answers against 3 short ones
    fairness = wait_for(
        "the fairness index exported",
        lambda: exported("ray_kimi_queue_fairness{") or None,
        90,
        every_s=2,
    )
    assert all(0 < v <= 1 for v in fairness.values()), fairness


def test_a_request_that_waits_past_its_time_limit_is_a_503_metered_once(
    serve_url, admin, state_dir
):
    hog_key, _ = new_key(admin, "enterprise")
    key, key_id = new_key(admin, "enterprise", request_timeout_s=1.5)
    headers = {"authorization": f"Bearer {key}"}
    chat = {"model": "kimi-k2.5:premium", "messages": [{"role": "user", "content": "go"}]}
    message = {**chat, "max_tokens": 8}
    with saturated(serve_url, hog_key, "premium", n=24, max_tokens=4000, above=2, holds=2):
        # the hogs' key alone holds every place (no other key active keeps one free), so
        # a newcomer waits for one of their long requests to end: past its 1.5 s limit
        wait_for(
            "premium full with the hogs alone",
            lambda: (s := tier_status(serve_url, "premium"))["running"] >= s["capacity"],
            60,
        )
        answers = [
            httpx.post(f"{serve_url}/v1/chat/completions", json=chat, headers=headers, timeout=60),
            httpx.post(
                f"{serve_url}/v1/messages",
                json=message,
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                timeout=60,
            ),
        ]
    openai_style, anthropic_style = answers
    assert openai_style.status_code == 503, openai_style.text
    assert openai_style.json()["error"]["code"] == "queue_timeout"
    assert anthropic_style.status_code == 529, anthropic_style.text  # Anthropic's overloaded
    assert anthropic_style.json()["error"]["type"] == "overloaded_error"
    for r in answers:
        assert int(r.headers["retry-after"]) > 0 and float(r.headers["x-kimi-queue-ms"]) >= 0
    table = flushed_usage(admin, state_dir)
    records = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    ids = sorted(r.headers["x-request-id"] for r in answers)
    assert sorted(r["request_id"] for r in records) == ids  # each metered, once
    assert all(r["status"] == 503 and r["cost_usd"] == 0 for r in records)  # never billed
