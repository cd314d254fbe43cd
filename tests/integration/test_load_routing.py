"""Load-aware routing through real engines: a saturated tier spills degradable plans to
a cheaper tier, the answer says so, usage is metered at the tier served, and the router's
metrics reach the cluster's Prometheus endpoint."""

from __future__ import annotations

import json
import time

import httpx
import pyarrow.compute as pc
import pytest

from benchmarks.holdback import metrics_ports
from tests.integration.conftest import flushed_usage, new_key, saturated

pytestmark = pytest.mark.integration


def test_saturated_tier_spills_degradable_plan(serve_url, admin, state_dir):
    plan_key, _ = new_key(admin, "standard")
    hog_key, _ = new_key(admin, "enterprise")
    # long streams pinned to the standard tier (it may add a replica meanwhile: 16 streams
    # keep even two replicas' 8 slots over 1.5)
    with saturated(serve_url, hog_key, "standard", n=16, max_tokens=3000, above=1.5, holds=1.5):
        r = httpx.post(
            f"{serve_url}/v1/chat/completions",
            timeout=60,
            headers={"authorization": f"Bearer {plan_key}"},
            json={
                "model": "kimi-k2.5",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-kimi-tier"] == "budget"
    assert r.headers["x-kimi-degraded"] == "standard->budget"
    assert r.json()["model"] == "kimi-k2.5:budget"
    table = flushed_usage(admin, state_dir)
    rec = table.filter(pc.equal(table["request_id"], r.headers["x-request-id"])).to_pylist()
    assert len(rec) == 1 and rec[0]["tier"] == "budget" and rec[0]["degraded"]
    # billed at the tier that served it (budget prices; cached prompt tokens cheaper)
    usage = r.json()["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    expected = (
        (usage["prompt_tokens"] - cached) * 0.10 + cached * 0.03 + usage["completion_tokens"] * 0.40
    ) / 1e6
    assert rec[0]["cost_usd"] == pytest.approx(expected)


def test_router_metrics_on_prometheus_endpoint(serve_url, client):
    client.chat.completions.create(
        model="kimi-k2.5:budget", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )

    def wanted(line: str) -> bool:
        return line.startswith("ray_kimi_requests") and all(
            tag in line for tag in ('tier="budget"', 'plan="enterprise"', 'status="200"')
        )

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Ray's agent exports every few seconds
        text = "\n".join(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for port in metrics_ports()
        )
        if any(wanted(line) for line in text.splitlines()):
            break
        time.sleep(2)
    else:
        raise AssertionError("router metrics never reached the Prometheus endpoint")
    names = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_kimi")}
    assert {
        "ray_kimi_requests_total",
        "ray_kimi_tokens_total",
        "ray_kimi_cost_usd_total",
        "ray_kimi_ttft_seconds_bucket",
        "ray_kimi_request_latency_seconds_bucket",
    } <= names


def test_trace_has_router_and_engine_spans(serve_url, client, state_dir):
    raw = client.chat.completions.with_raw_response.create(
        model="kimi-k2.5:premium", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    request_id = raw.headers["x-request-id"]
    path = state_dir / "traces.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
        mine = [s for s in spans if s["attributes"].get("kimi.request_id") == request_id]
        if {s["name"] for s in mine} >= {"router.request", "engine.chat"}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"spans for {request_id} not exported")
    router = next(s for s in mine if s["name"] == "router.request")
    engine = next(s for s in mine if s["name"] == "engine.chat")
    assert engine["trace_id"] == router["trace_id"]  # one trace across the Ray hop
    assert engine["parent_id"] == router["span_id"]
    assert router["service"] == "kimi-router" and engine["service"] == "kimi-tier-premium"
    assert router["attributes"]["kimi.plan"] == "enterprise"
    assert engine["attributes"]["kimi.engine"] == "vllm"
