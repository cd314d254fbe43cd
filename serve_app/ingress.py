"""The ingress deployment: the HTTP face of the app, as a thin Ray Serve shell.

It builds the pipeline and the wire adapters, keeps the tiers' live figures fresh in the
background, and registers the routes; each route hands its request to an adapter
(`serve_app/api/`), which hands it to the pipeline (`serve_app/pipeline/pipeline.py`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.scheduling.loadboard import TierLoad, board
from serve_app.api.admin import ADMIN, AdminAPI, Doorman
from serve_app.api.anthropic.routes import ANTHROPIC, AnthropicAPI
from serve_app.api.common.app import api_app
from serve_app.api.console.pages import CONSOLE, ConsoleAPI
from serve_app.api.console.scaling_events import ScalingEvents
from serve_app.api.openai.routes import OPENAI, OpenAIAPI
from serve_app.api.ops import OPS, OpsAPI
from serve_app.api.responses.conversations import CONVERSATIONS, ConversationsAPI
from serve_app.api.responses.routes import RESPONSES, ResponsesAPI
from serve_app.api.usage import USAGE, UsageAPI
from serve_app.api.webhooks import WEBHOOKS, WebhookEndpointsAPI
from serve_app.config import AppConfig, state_dir
from serve_app.gateway.client import (
    GatewayClient,
    GuardClient,
    ReasoningClient,
    SignInsClient,
    connect_gateway,
)
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.telemetry import IngressMetrics
from serve_app.reasoning.sealing import deployment_sealer
from serve_app.routing.tier_calls import RayTiers
from serve_app.store.client import connect_store

log = logging.getLogger("serve_app.ingress")
FAMILIES = (OPENAI, ANTHROPIC, RESPONSES, CONVERSATIONS, WEBHOOKS, USAGE, OPS, ADMIN, CONSOLE)


def replica_adapters() -> dict[type, Any]:
    """This replica's adapters (Serve's servable object is the `Ingress` below)."""
    return serve.get_replica_context().servable_object.adapters


app = api_app(FAMILIES, replica_adapters)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict[str, Any], tiers: dict[str, DeploymentHandle]) -> None:
        self.config = AppConfig.model_validate(config)
        gw, router = self.config.gateway, self.config.router
        root = state_dir(gw.state_dir)
        plans = {name: p.model_dump(mode="json") for name, p in self.config.plans.items()}
        calls = connect_gateway(
            root, plans, gw.meter_batch_size, gw.meter_flush_interval_s, gw.restart_wait_s
        )
        gateway = GatewayClient(calls)
        self.board = board()
        replica = serve.get_replica_context().replica_id.unique_id
        self.pipeline = Pipeline(self.config, RayTiers(tiers), gateway, replica, IngressMetrics())
        sealer = deployment_sealer(root)
        store = connect_store(root, self.config.sessions, gw.restart_wait_s)
        trusted = [ipaddress.ip_network(n) for n in router.trusted_proxies]
        doorman = Doorman(GuardClient(calls), trusted)
        admin = AdminAPI(gateway, store, gw.admin_token_env, router.max_body_bytes, doorman)
        self.scaling = ScalingEvents()
        adapters: list[Any] = [
            OpenAIAPI(self.pipeline, self.config, ReasoningClient(calls)),
            AnthropicAPI(self.pipeline, self.config, sealer),
            ResponsesAPI(self.pipeline, self.config, sealer, store),
            ConversationsAPI(self.pipeline, store, router.max_body_bytes),
            WebhookEndpointsAPI(
                self.pipeline,
                store,
                self.config.sessions.webhooks.outbound,
                router.max_body_bytes,
                admin.check_key,
            ),
            UsageAPI(self.pipeline, gateway),
            OpsAPI(self.config, self._snapshot, gateway.health, admin.operator),
            admin,
            ConsoleAPI(
                self.config,
                self.pipeline,
                gateway,
                SignInsClient(calls),
                admin,
                self._snapshot,
                self.scaling,
            ),
        ]
        self.adapters = {type(a): a for a in adapters}
        self._refresher = asyncio.create_task(self._refresh_loads())

    async def _snapshot(self) -> dict[str, TierLoad]:
        return await asyncio.wait_for(self.board.snapshot.remote(), timeout=5)

    async def _refresh_loads(self) -> None:
        """Keep the tiers' engine figures fresh for tier choice, off the request path,
        and tell the board what the fair queues hold here (the tiers' autoscaling, the
        other routers' fair queues)."""
        replica = serve.get_replica_context().replica_id.unique_id
        while True:
            try:
                loads = await asyncio.wait_for(
                    self.board.snapshot.remote(replica, self.pipeline.queue_report()), timeout=5
                )
                self.scaling.observe(loads)
                await self.pipeline.refresh(loads)
            except Exception:
                log.exception("reading tier loads failed")
                self.pipeline.board_unanswered()
            await asyncio.sleep(self.config.router.load_refresh_s)
