"""The tiers on a multi-node cluster: placement by node resources, autoscaling on the
engines' queue (up under a load step, down after), scale to zero and wake-up, replica
choice with conversation affinity, and tier choice under a saturated premium tier."""

from __future__ import annotations

import glob
import os
import time

import anthropic
import httpx
import pyarrow.compute as pc
import pytest
import ray

from tests.integration.conftest import (
    OVERLAY,
    Hogs,
    flushed_usage,
    new_key,
    saturated,
    tier_status,
    wait_for,
)

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]


def chat(url: str, key: str | None, model: str = "kimi-k2.5", **extra: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(extra.pop("headers", {}))  # type: ignore[arg-type]
    body = {"model": model, "messages": MSG, "max_tokens": 2, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def node_resources() -> dict[str, dict[str, float]]:
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def test_tiers_are_placed_on_the_nodes_their_resources_ask_for(serve_url, cluster):
    nodes = node_resources()
    for tier in ("premium", "standard"):
        status = wait_for(f"{tier} reporting", lambda t=tier: tier_status(serve_url, t), 60)
        wanted = next(iter(OVERLAY[tier]["resources"]["custom"]))
        for member in status["members"]:
            assert wanted in nodes[member["node_id"]], (tier, member)
    premium_nodes = {m["node_id"] for m in tier_status(serve_url, "premium")["members"]}
    standard_nodes = {m["node_id"] for m in tier_status(serve_url, "standard")["members"]}
    assert premium_nodes.isdisjoint(standard_nodes)


def test_http_reaches_the_router_replicas_through_haproxy_not_the_python_proxy(serve_url):
    """cluster/ray.env: Ray Serve's throughput-optimized path, in which HAProxy listens on
    the app's port and hands each connection to a router replica's own HTTP server."""
    import psutil

    port = int(serve_url.rsplit(":", 1)[1])
    conns = psutil.net_connections("tcp")
    listeners = {c.pid for c in conns if c.laddr.port == port and c.status == "LISTEN"}
    assert {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}
    r = chat(serve_url, None, headers={"x-request-id": "through-haproxy"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "through-haproxy"
    assert r.headers["x-kimi-router"]


def replicas(url: str, tier: str) -> int:
    s = tier_status(url, tier)
    return 0 if not s else int(s["replicas"])


def controller_log(cluster) -> str:
    logs = cluster.head_node.get_logs_dir_path()
    return "".join(
        open(p, errors="replace").read()
        for p in glob.glob(os.path.join(logs, "serve", "controller_*.log"))
    )


def test_load_step_scales_tier_up_then_down_with_affinity_between(serve_url, admin, cluster):
    """12 long streams on the standard tier (4 slots a replica, target 4 sequences a
    replica, max 2 replicas): the engine queue grows, a second replica starts; when the
    load stops the tier returns to one replica after `downscale_delay_s`."""
    auto = OVERLAY["standard"]["autoscaling"]
    key = new_key(admin, "enterprise")[0]
    # start from one replica (earlier load may still be inside its downscale delay)
    wait_for("one standard replica", lambda: replicas(serve_url, "standard") == 1, 90)
    with Hogs(serve_url, key, "kimi-k2.5:standard", n=12, max_tokens=3000):
        # upscale_delay_s (2 s) + metrics push + the replica's start (llama-server, ~5 s).
        # (No wait for the queue first: the second replica can take half the streams
        # before a reading shows the first one queueing.)
        wait_for("a second standard replica", lambda: replicas(serve_url, "standard") == 2, 120)
    assert "autoscaling tier-standard: demand" in controller_log(cluster)

    # Both replicas idle now, before the downscale delay ends: one conversation stays on
    # one replica; different conversations use both.
    wait_for("standard to drain", lambda: tier_status(serve_url, "standard")["running"] == 0, 30)
    # let the request routers see the drain: engine figures refresh every second, and
    # Ray's per-replica in-flight counts of the cancelled streams expire after 10 s
    time.sleep(11)
    assert replicas(serve_url, "standard") == 2  # downscale_delay_s (30 s) not yet over
    homes = {
        chat(serve_url, key, "kimi-k2.5:standard", headers={"x-session-id": "conv-1"}).headers[
            "x-kimi-replica"
        ]
        for _ in range(4)
    }
    assert len(homes) == 1
    spread = {
        chat(serve_url, key, "kimi-k2.5:standard", headers={"x-session-id": f"c{i}"}).headers[
            "x-kimi-replica"
        ]
        for i in range(10)
    }
    assert len(spread) == 2

    timeout = auto["downscale_delay_s"] + 45
    wait_for("standard back to one replica", lambda: replicas(serve_url, "standard") == 1, timeout)


def test_budget_tier_scales_to_zero_and_wakes_on_a_request(serve_url, admin):
    ready = lambda: httpx.get(f"{serve_url}/ready", timeout=30).json()["tiers"]  # noqa: E731
    delay = OVERLAY["budget"]["autoscaling"]["downscale_to_zero_delay_s"]
    wait_for("budget to scale to zero", lambda: ready()["budget"] == "idle", delay + 60)
    assert httpx.get(f"{serve_url}/ready", timeout=30).status_code == 200  # others serve
    r = chat(serve_url, new_key(admin, "free")[0])
    assert r.status_code == 200, r.text
    assert r.headers["x-kimi-tier"] == "budget" and r.json()["usage"]["completion_tokens"] == 2
    wait_for("budget reporting again", lambda: replicas(serve_url, "budget") == 1, 30)


def test_saturated_premium_spills_degradable_plans_and_keeps_premium_plans(
    serve_url, admin, state_dir
):
    enterprise, premium = new_key(admin, "enterprise")[0], new_key(admin, "premium")[0]
    # 8 sequences fit the premium engine (max-num-seqs 8); 20 streams keep it queueing.
    with saturated(serve_url, enterprise, "premium", n=20, max_tokens=300, above=1.5, holds=1.2):
        spilled = chat(serve_url, enterprise)
        kept = chat(serve_url, premium)
        baseline = chat(serve_url, enterprise, headers={"x-kimi-routing-strategy": "plan_only"})
    assert spilled.status_code == 200, spilled.text
    assert spilled.headers["x-kimi-tier"] == "standard"
    assert spilled.headers["x-kimi-degraded"] == "premium->standard"
    # the premium plan may not degrade: it stays (and queues) on premium
    assert kept.status_code == 200 and kept.headers["x-kimi-tier"] == "premium"
    assert "x-kimi-degraded" not in kept.headers
    # plan-only routing (the baseline) would have queued the enterprise request there too
    assert baseline.headers["x-kimi-tier"] == "premium"
    table = flushed_usage(admin, state_dir)
    rid = spilled.headers["x-request-id"]
    rec = table.filter(pc.equal(table["request_id"], rid)).to_pylist()
    assert len(rec) == 1 and rec[0]["tier"] == "standard" and rec[0]["degraded"]
    assert rec[0]["cost_usd"] == pytest.approx(spilled.json()["usage"]["cost"])


def test_lowest_plan_is_shed_with_retry_after_when_its_tier_saturates(serve_url, admin):
    enterprise, free = new_key(admin, "enterprise")[0], new_key(admin, "free")[0]
    # 16 long streams on 4 slots: pressure 4, well above shed_pressure 2.0 (1,500 tokens:
    # the budget tier's context is 2,048, and longer asks are refused with a 400)
    claude = anthropic.Anthropic(base_url=serve_url, api_key=free, max_retries=0)
    with saturated(serve_url, enterprise, "budget", n=16, max_tokens=1500, above=3, holds=2.5):
        shed = chat(serve_url, free)
        # on Anthropic's API the same refusal is its 529, overloaded_error
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            claude.messages.create(
                model="kimi-k2.5", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
    assert shed.status_code == 503, shed.text
    assert shed.json()["error"]["code"] == "overloaded"
    assert int(shed.headers["retry-after"]) >= 1
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    assert int(overloaded.value.response.headers["retry-after"]) >= 1
