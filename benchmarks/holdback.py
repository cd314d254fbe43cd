"""How long our tier replicas held tokens back during a load level, read from the replicas'
own histogram (`kimi_tier_holdback_seconds`, one observation per message sent: the wait of
its oldest chunk) on the cluster's Prometheus endpoints, before and after the level.

Ray's metrics agent exports every `metrics_report_interval_ms`; a reading waits until the
count stops moving, so that every message so far is in it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx

METRIC = "ray_kimi_tier_holdback_seconds_bucket"


def metrics_ports() -> list[int]:
    """Every node's Prometheus endpoint (a replica's metrics leave from its own node)."""
    import ray

    return [int(n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]]


def buckets(ports: list[int], tier: str) -> dict[float, float]:
    """Cumulative count per upper bound (seconds; inf last), summed over every node."""
    out: dict[float, float] = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for line in text.splitlines():
            if not line.startswith(METRIC + "{") or f'tier="{tier}"' not in line:
                continue
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = math.inf if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def settled(
    ports: list[int], tier: str, quiet_s: float = 1.5, above: float = -1.0, timeout_s: float = 20
) -> dict[float, float]:
    """The buckets once their count is above `above` and has not moved for `quiet_s` (more
    than the agent's export period: every message so far is in); at the timeout, as they
    are."""
    last, since = buckets(ports, tier), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        time.sleep(min(quiet_s, 2.0))
        now = buckets(ports, tier)
        if now != last:
            last, since = now, time.monotonic()
        elif last.get(math.inf, 0.0) > above and time.monotonic() - since >= quiet_s:
            return last
    return last


def summary(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Messages observed in the level, and the bucket bound that holds 50 %, 99 % and all
    of them (so `max_ms_at_most` 10 means no message's oldest chunk waited over 10 ms)."""
    counts = sorted((b, after[b] - before.get(b, 0.0)) for b in after)
    total = counts[-1][1] if counts else 0.0
    if not total:
        return {"messages": 0}

    def bound(share: float) -> float | None:
        b = next(b for b, c in counts if c >= share * total - 1e-9)
        return None if math.isinf(b) else round(b * 1000, 2)

    finite = [b for b, _ in counts if not math.isinf(b)]
    return {
        "messages": int(total),
        "top_bucket_ms": round(finite[-1] * 1000, 2) if finite else None,
        "p50_ms_at_most": bound(0.5),
        "p99_ms_at_most": bound(0.99),
        "max_ms_at_most": bound(1.0),
    }


def bucket_ms(held: dict[str, Any], key: str) -> str:
    """A bound of `summary` as printed: past the histogram's top bucket (None), "> top"."""
    ms = held[f"{key}_ms_at_most"]
    return f"> {held.get('top_bucket_ms')}" if ms is None else str(ms)
