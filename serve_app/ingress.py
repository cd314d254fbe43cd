"""The ingress deployment: the HTTP face of the app, as a thin Ray Serve shell.

It builds the pipeline and the wire adapters, keeps the tiers' live figures fresh in the
background, and registers the routes; each route hands its request to an adapter
(`serve_app/api/`), which hands it to the pipeline (`serve_app/pipeline.py`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.loadboard import TierLoad, board
from serve_app.api.admin import AdminAPI
from serve_app.api.anthropic import AnthropicAPI
from serve_app.api.anthropic_models import AnthropicError, CountTokensRequest, MessagesRequest
from serve_app.api.http import openai_error
from serve_app.api.openai import OpenAIAPI
from serve_app.api.openapi import with_bodies
from serve_app.api.ops import OpsAPI
from serve_app.config import AppConfig
from serve_app.errors import APIError
from serve_app.gateway import connect_gateway, state_dir
from serve_app.keys import NewKey
from serve_app.pipeline import Pipeline
from serve_app.schemas import ChatRequest, CompletionRequest
from serve_app.sealing import deployment_sealer
from serve_app.telemetry import IngressMetrics
from serve_app.tier_calls import RayTiers

log = logging.getLogger("serve_app.ingress")

app = FastAPI(title="Kimi K2.5 tiered serving", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return openai_error(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return openai_error(APIError(400, str(exc.errors()[0].get("msg", "invalid request"))))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")  # the trace goes to the log, never to the client
    return openai_error(APIError(500, "internal error; the request was not served"))


app.openapi = with_bodies(  # type: ignore[method-assign]
    app,
    {
        ("/v1/chat/completions", "post"): ChatRequest,
        ("/v1/completions", "post"): CompletionRequest,
        ("/v1/messages", "post"): MessagesRequest,
        ("/v1/messages/count_tokens", "post"): CountTokensRequest,
        ("/admin/keys", "post"): NewKey,
    },
    {"/v1/messages": AnthropicError},
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict[str, Any], tiers: dict[str, DeploymentHandle]) -> None:
        self.config = AppConfig.model_validate(config)
        gw = self.config.gateway
        plans = {name: p.model_dump(mode="json") for name, p in self.config.plans.items()}
        gateway = connect_gateway(
            state_dir(gw.state_dir),
            plans,
            gw.meter_batch_size,
            gw.meter_flush_interval_s,
            gw.restart_wait_s,
        )
        self.board = board()
        replica = serve.get_replica_context().replica_id.unique_id
        self.pipeline = Pipeline(self.config, RayTiers(tiers), gateway, replica, IngressMetrics())
        self.openai = OpenAIAPI(self.pipeline, self.config)
        sealer = deployment_sealer(state_dir(gw.state_dir))
        self.anthropic = AnthropicAPI(self.pipeline, self.config, sealer)
        self.admin = AdminAPI(gateway, gw.admin_token_env, self.config.router.max_body_bytes)
        self.ops = OpsAPI(self.config, self._snapshot)
        self._refresher = asyncio.create_task(self._refresh_loads())

    async def _snapshot(self) -> dict[str, TierLoad]:
        return await asyncio.wait_for(self.board.snapshot.remote(), timeout=5)

    async def _refresh_loads(self) -> None:
        """Keep the tiers' engine figures fresh for tier choice, off the request path."""
        while True:
            try:
                await self.pipeline.refresh(await self._snapshot())
            except Exception:
                log.exception("reading tier loads failed")
            await asyncio.sleep(self.config.router.load_refresh_s)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.openai.chat(request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.openai.completions(request)

    @app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        return await self.anthropic.messages(request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request) -> Response:
        return await self.anthropic.count_tokens(request)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return self.openai.models()

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return self.ops.health()

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        return await self.ops.ready()

    @app.get("/status")
    async def status(self) -> dict[str, Any]:
        return await self.ops.status()

    @app.post("/admin/keys", status_code=201)
    async def create_key(self, request: Request) -> JSONResponse:
        return await self.admin.create_key(request)

    @app.get("/admin/keys")
    async def list_keys(self, request: Request) -> dict[str, Any]:
        return await self.admin.list_keys(request)

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(self, key_id: str, request: Request) -> dict[str, Any]:
        return await self.admin.revoke_key(request, key_id)

    @app.post("/admin/usage/flush")
    async def flush_usage(self, request: Request) -> dict[str, bool]:
        return await self.admin.flush_usage(request)
