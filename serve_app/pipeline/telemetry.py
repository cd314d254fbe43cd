"""The ingress's metrics, exported through Ray's metrics agent to the cluster's Prometheus
endpoint (and so to the Ray dashboard and Grafana)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.util import metrics

from deployments.engines.openai_shape import thinking_on
from deployments.scheduling.loadboard import TierLoad
from serve_app.gateway.protocol import UsageRecord
from serve_app.reasoning.sealing import Opened

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
log = logging.getLogger("serve_app.pipeline.telemetry")
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


def per_plan_and_tier(name: str, doc: str, buckets: list[float]) -> metrics.Histogram:
    return metrics.Histogram(name, doc, boundaries=buckets, tag_keys=("plan", "tier"))


class QueueMetrics:
    """The fair queue in front of each tier (`routing/fair_queue.py`)."""

    def __init__(self) -> None:
        self.waiting = metrics.Gauge(
            "kimi_queue_waiting",
            "requests waiting at this router for a full tier (fair queue), by service tier",
            tag_keys=("tier", "band"),
        )
        self.waited = metrics.Histogram(
            "kimi_queue_wait_seconds",
            "time a request waited at the router for its tier, by plan and service tier",
            boundaries=TTFT_BUCKETS,
            tag_keys=("plan", "tier", "band"),
        )
        self.queue_timeouts = metrics.Counter(
            "kimi_queue_timeouts", "requests that waited past their limit (503)", ("tier",)
        )
        self.refused = metrics.Counter(
            "kimi_queue_refused",
            "requests of a key over its part of a full queue (429)",
            ("tier",),
        )
        self.service = metrics.Counter(
            "kimi_queue_service_tokens",
            "service through the fair queue per key, as its order counts it: prompt tokens"
            " plus twice the output tokens",
            ("tier", "key_id"),
        )
        self.fairness = metrics.Gauge(
            "kimi_queue_fairness",
            "Jain's index of the weighted service of the last ~10 s among the keys waiting"
            " at this router now (1: even; 1 where fewer than two wait)",
            ("tier",),
        )


class IngressMetrics:
    def __init__(self) -> None:
        tags = ("plan", "tier", "status", "degraded")
        self.requests = metrics.Counter(
            "kimi_requests", "requests by plan, tier served, status", tag_keys=tags
        )
        self.tokens = metrics.Counter(
            "kimi_tokens", "tokens by plan, tier and kind", tag_keys=("plan", "tier", "kind")
        )
        self.cost = metrics.Counter("kimi_cost_usd", "billed USD", tag_keys=("plan", "tier"))
        self.ttft = per_plan_and_tier("kimi_ttft_seconds", "time to first token", TTFT_BUCKETS)
        self.latency = per_plan_and_tier(
            "kimi_request_latency_seconds", "end-to-end latency", LATENCY_BUCKETS
        )
        self.shed = metrics.Counter("kimi_shed", "requests shed under load", tag_keys=("plan",))
        self.tpot = per_plan_and_tier(
            "kimi_tpot_seconds",
            "time per output token after the first (mean inter-token latency of a request)",
            TPOT_BUCKETS,
        )
        self.queue = metrics.Gauge(
            "kimi_tier_sequences",
            "sequences in the tier's engines, by state (running, waiting)",
            tag_keys=("tier", "state"),
        )
        self.replicas = metrics.Gauge(
            "kimi_tier_replicas", "healthy replicas reporting", tag_keys=("tier",)
        )
        self.reasoning = metrics.Counter(
            "kimi_reasoning_back",
            "earlier turns' reasoning by how it came back, per API: sealed (a signature or"
            " encrypted_content opened), memory (the server's, for chat completions), text"
            " (the client kept it), dropped (a seal that did not open), missing (a tool-call"
            " turn in thinking mode with none)",
            tag_keys=("api", "how"),
        )
        self.queues = QueueMetrics()
        self.kv = metrics.Gauge(
            "kimi_tier_kv_cache_usage", "highest KV-cache use among the tier's replicas", ("tier",)
        )

    def observe_reasoning(self, api: str, body: dict[str, Any], opened: Opened | None) -> None:
        counts = reasoning_back(body, opened or Opened())
        for how, n in counts.items():
            if n:
                self.reasoning.inc(n, {"api": api, "how": how})

    def observe_loads(self, loads: Mapping[str, TierLoad]) -> None:
        for tier, load in loads.items():
            self.queue.set(load.running, {"tier": tier, "state": "running"})
            self.queue.set(load.waiting, {"tier": tier, "state": "waiting"})
            self.replicas.set(load.replicas, {"tier": tier})
            self.kv.set(load.kv_cache_usage, {"tier": tier})

    def observe(self, rec: UsageRecord) -> None:
        """Never raises: a metrics fault must not fail or unmeter a request."""
        try:
            self._observe(rec)
        except Exception:
            log.exception("recording metrics failed")

    def _observe(self, rec: UsageRecord) -> None:
        pt = {"plan": rec.plan, "tier": rec.tier}
        self.requests.inc(1, {**pt, "status": str(rec.status), "degraded": str(rec.degraded)})
        for kind, count in (("prompt", rec.prompt_tokens), ("completion", rec.completion_tokens)):
            if count > 0:  # Ray counters take positive increments only
                self.tokens.inc(count, {**pt, "kind": kind})
        if rec.cost_usd > 0:
            self.cost.inc(rec.cost_usd, pt)
        if rec.ttft_ms is not None:
            self.ttft.observe(rec.ttft_ms / 1000, pt)
            if rec.completion_tokens > 1:
                tpot = (rec.latency_ms - rec.ttft_ms) / 1000 / (rec.completion_tokens - 1)
                self.tpot.observe(max(tpot, 0.0), pt)
        self.latency.observe(rec.latency_ms / 1000, pt)


def reasoning_back(body: dict[str, Any], opened: Opened) -> dict[str, int]:
    """How the reasoning of the history's tool-call turns came back. K2.5 in thinking mode
    reads its own earlier reasoning there; a turn without it is `missing`."""
    calls = [
        m
        for m in body.get("messages") or ()
        if m.get("role") == "assistant" and m.get("tool_calls")
    ]
    kept = sum(1 for m in calls if m.get("reasoning_content"))
    thinking = thinking_on(body)
    return {
        "sealed": opened.sealed,
        "memory": opened.remembered,
        "dropped": opened.dropped,
        "text": max(kept - opened.sealed - opened.remembered, 0),
        "missing": len(calls) - kept if thinking else 0,
    }
