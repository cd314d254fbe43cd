"""The Ray Serve deployment of one price tier: a replica that owns one engine.

One class serves every tier; the tier's spec picks the engine (vLLM or llama.cpp), its
artifact, resources and autoscaling. `build_tier` turns a spec into a bound deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.deployment import Application
from ray.util import metrics

from deployments import tracing
from deployments.engines.base import Engine
from deployments.engines.image_tokens import with_image_tokens
from deployments.protocol import Endpoint, EngineLoad
from deployments.scheduling.loadboard import ReplicaLoad, board
from deployments.spec import TierSpec
from deployments.streaming import Pacing, TierOutput, coalesce

log = logging.getLogger(__name__)

LOAD_REPORT_S = 0.5
HOLD_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25]


def make_engine(spec: TierSpec) -> Engine:
    if spec.engine == "vllm":
        from deployments.engines.vllm.engine import VLLMEngine

        return VLLMEngine(spec)
    from deployments.engines.llama_cpp.engine import LlamaCppEngine

    return LlamaCppEngine(spec)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class TierServer:
    async def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = TierSpec.model_validate(spec)
        self.tracer = tracing.tracer(f"kimi-tier-{self.spec.name}")
        self.engine = make_engine(self.spec)
        await self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.board = board()
        self.streams = 0  # answers in flight here: the load the hold-back window follows
        self.held = metrics.Histogram(
            "kimi_tier_holdback_seconds",
            "how long a message's oldest chunk waited in the tier replica before it was sent",
            boundaries=HOLD_BUCKETS,
            tag_keys=("tier",),
        )
        self.held.set_default_tags({"tier": self.spec.name})
        self.pacing = Pacing(
            window=lambda: self.spec.hold_back.window_s(self.streams), held=self.held.observe
        )
        # One reader of the engine's figures for the board, the request router and the
        # autoscaler alike (each reads them on its own period; the engine is asked once).
        self.last_load: EngineLoad = await self.engine.load()
        self.router_waiting = 0.0  # its share of the routers' queues for the tier (board)
        self._reporter = asyncio.create_task(self._report_loads())

    async def _report_loads(self) -> None:
        """Push engine figures to the cluster's load board (routers read it from there)."""
        while True:
            try:
                self.last_load = await self.engine.load()
                load = ReplicaLoad(
                    **self.last_load.model_dump(), replica=self.replica, node_id=self.node_id
                )
                self.router_waiting = await self.board.report.remote(self.spec.name, load)
            except Exception:
                log.exception("reporting load failed")
            await asyncio.sleep(LOAD_REPORT_S)

    # `affinity` is read by the tier's request router (replica_router.py), not here.
    async def generate(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        request_id: str,
        trace_ctx: dict[str, str] | None = None,
        affinity: str | None = None,
    ) -> AsyncIterator[TierOutput]:
        """One engine call, its outputs as `coalesce` sends them."""
        span = self.tracer.start_span(
            f"engine.{endpoint.value}",
            context=tracing.extract(trace_ctx),
            attributes={
                "kimi.tier": self.spec.name,
                "kimi.engine": self.spec.engine,
                "kimi.request_id": request_id,
            },
        )
        source = getattr(self.engine, endpoint.value)(body, request_id)
        if endpoint is Endpoint.CHAT:
            source = with_image_tokens(source, body, request_id, self.engine.tokenize)
        items = 0
        self.streams += 1
        try:
            async for item in coalesce(source, self.replica, self.pacing):
                items += 1
                yield item
        finally:
            self.streams -= 1
            span.set_attribute("kimi.messages", items)
            span.end()

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def record_routing_stats(self) -> dict[str, Any]:
        """Engine figures for the request router (replica choice within the tier)."""
        return self.last_load.model_dump()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue depth from the engine itself, for the tier's autoscaling policy."""
        load = self.last_load
        return {
            "engine_running": load.running,
            "engine_waiting": load.waiting,
            "engine_capacity": load.capacity,
            # this replica's share of what waits at the routers' fair queues for the tier
            "router_waiting": self.router_waiting,
        }

    async def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(Exception):
                await self.board.forget.remote(self.spec.name, self.replica)
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()


def deployment_options(spec: TierSpec) -> dict[str, Any]:
    res = spec.resources
    actor: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory_gb:
        actor["memory"] = int(res.memory_gb * 1024**3)
    if res.custom:
        actor["resources"] = dict(res.custom)
    auto = spec.autoscaling
    options: dict[str, Any] = {
        "name": f"tier-{spec.name}",
        "ray_actor_options": actor,
        "autoscaling_config": {
            **auto.model_dump(),
            # Sized on the engines' queue, not Ray's request count (autoscaling.py).
            "policy": {"policy_function": "deployments.scheduling.autoscaling:engine_queue_policy"},
        },
        # Replica choice on engine load with conversation affinity (replica_router.py).
        "request_router_config": {
            "request_router_class": "deployments.scheduling.replica_router:EngineAffinityRouter",
            "request_routing_stats_period_s": 1.0,
            "request_routing_stats_timeout_s": 5.0,
        },
        # Engines batch internally; let Ray queue beyond their slots rather than reject.
        "max_ongoing_requests": 256,
        # Routers poll load() twice a second; requests are logged by the router instead.
        "logging_config": {"enable_access_log": False},
    }
    if res.placement_bundles:
        options["placement_group_bundles"] = res.placement_bundles
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def build_tier(spec: TierSpec) -> Application:
    # Subclasses (the catalogue's entries) carry router-only fields; the replica gets the spec.
    engine_spec = spec.model_dump(mode="json", include=set(TierSpec.model_fields))
    return TierServer.options(**deployment_options(spec)).bind(engine_spec)
