"""Per-tier autoscaling on the engines' own queue (a Ray Serve custom autoscaling policy).

Ray's default policy counts requests in flight at the replicas. For an LLM engine that
figure misses what matters: how many sequences the engine is running and how many wait
for a batch slot. Each tier replica reports `engine_running`, `engine_waiting` and
`engine_capacity` (`TierServer.record_autoscaling_stats`), and its share of the requests
waiting at the routers' fair queues for the tier (`router_waiting`, heard back from the
load board); the policy sizes the tier so that every replica carries about
`target_ongoing_requests` of that demand. Ray applies
the catalogue's min/max, the upscale/downscale delays and the delay to zero around it.

Scale to zero: when a tier has no demand the policy asks for 0 replicas (bounded below by
`min_replicas`); a request that arrives while it is at zero waits at the Serve handle,
and Ray's cold-start path starts a replica for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Demand:
    running: float  # sequences the tier's engines are running
    waiting: float  # sequences queued inside the engines
    in_flight: float  # requests Ray counts at the tier (queued at handles or replicas)
    queued: float = 0.0  # requests waiting at the routers' fair queues for the tier


def desired_replicas(demand: Demand, current: int, target_per_replica: float) -> tuple[int, str]:
    """How many replicas the demand needs, and why, in words for the controller's log."""
    engine = demand.running + demand.waiting + demand.queued
    # Requests Ray has but the engines have not yet seen (a replica still starting, a
    # request in transit) count too, so a tier with work is never sized to zero.
    load = max(engine, demand.in_flight)
    desired = math.ceil(load / target_per_replica) if load > 0 else 0
    reason = (
        f"demand {engine:g} (running {demand.running:g}, waiting {demand.waiting:g},"
        f" at the routers {demand.queued:g}),"
        f" in flight {demand.in_flight:g}, target {target_per_replica:g}/replica:"
        f" {current} -> {desired} replicas"
    )
    return desired, reason


def _summed(metrics: dict[str, dict[Any, float]] | None, name: str) -> float:
    return float(sum((metrics or {}).get(name, {}).values()))


def engine_queue_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve custom autoscaling policy (`ctx` is an `AutoscalingContext`)."""
    metrics = ctx.aggregated_metrics
    demand = Demand(
        running=_summed(metrics, "engine_running"),
        waiting=_summed(metrics, "engine_waiting"),
        in_flight=float(ctx.total_num_requests),
        queued=_summed(metrics, "router_waiting"),
    )
    target = ctx.config.get_target_ongoing_requests()
    desired, reason = desired_replicas(demand, ctx.current_num_replicas, target)
    state = dict(ctx.policy_state)
    # Log each new wish once (the loop runs every 0.1 s); Ray's delays may still hold it.
    wish = [ctx.current_num_replicas, desired]
    if desired != ctx.current_num_replicas and state.get("kimi_logged") != wish:
        log.info("autoscaling %s: %s", ctx.deployment_name, reason)
        state["kimi_logged"] = wish
    return desired, state
