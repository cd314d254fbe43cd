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
from serve_app.api.console import ConsoleAPI
from serve_app.api.conversations import ConversationsAPI
from serve_app.api.http import openai_error
from serve_app.api.openai import OpenAIAPI
from serve_app.api.openapi import with_bodies
from serve_app.api.ops import OpsAPI
from serve_app.api.responses import ResponsesAPI
from serve_app.api.responses_models import (
    ConversationCreate,
    ConversationUpdate,
    ItemsCreate,
    ResponsesRequest,
)
from serve_app.api.usage import UsageAPI
from serve_app.api.webhook_endpoints import NewEndpoint, WebhookEndpointsAPI
from serve_app.config import AppConfig
from serve_app.errors import APIError
from serve_app.gateway import connect_gateway, state_dir
from serve_app.keys import NewKey
from serve_app.pipeline import Pipeline
from serve_app.scaling_events import ScalingEvents
from serve_app.schemas import ChatRequest, CompletionRequest
from serve_app.sealing import deployment_sealer
from serve_app.sessions import SessionClient, connect_sessions
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
        ("/v1/responses", "post"): ResponsesRequest,
        ("/v1/conversations", "post"): ConversationCreate,
        ("/v1/conversations/{conversation_id}", "post"): ConversationUpdate,
        ("/v1/conversations/{conversation_id}/items", "post"): ItemsCreate,
        ("/v1/webhook_endpoints", "post"): NewEndpoint,
        ("/admin/keys/{key_id}/webhook_endpoints", "post"): NewEndpoint,
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
        self.openai = OpenAIAPI(self.pipeline, self.config, gateway)
        sealer = deployment_sealer(state_dir(gw.state_dir))
        self.anthropic = AnthropicAPI(self.pipeline, self.config, sealer)
        store = self._sessions()
        self.responses = ResponsesAPI(self.pipeline, self.config, sealer, store)
        self.conversations = ConversationsAPI(self.responses, self.config.router.max_body_bytes)
        self.admin = AdminAPI(gateway, store, gw.admin_token_env, self.config.router.max_body_bytes)
        self.ops = OpsAPI(self.config, self._snapshot, gateway.health, self.admin.is_admin)
        self.scaling = ScalingEvents()
        self.console = ConsoleAPI(
            self.config, self.pipeline, gateway, self.admin, self._snapshot, self.scaling
        )
        self.usage = UsageAPI(self.pipeline, gateway)
        self.webhooks = WebhookEndpointsAPI(
            self.pipeline,
            store,
            self.config.sessions.webhooks.outbound,
            self.config.router.max_body_bytes,
        )
        self._refresher = asyncio.create_task(self._refresh_loads())

    def _sessions(self) -> SessionClient:
        gw = self.config.gateway
        return connect_sessions(state_dir(gw.state_dir), self.config.sessions, gw.restart_wait_s)

    async def _snapshot(self) -> dict[str, TierLoad]:
        return await asyncio.wait_for(self.board.snapshot.remote(), timeout=5)

    async def _refresh_loads(self) -> None:
        """Keep the tiers' engine figures fresh for tier choice, off the request path."""
        while True:
            try:
                loads = await self._snapshot()
                self.scaling.observe(loads)
                await self.pipeline.refresh(loads)
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

    @app.post("/v1/responses")
    async def create_response(self, request: Request) -> Response:
        return await self.responses.create(request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str, request: Request) -> dict[str, Any]:
        return await self.responses.retrieve(request, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(self, response_id: str, request: Request) -> dict[str, Any]:
        return await self.responses.delete(request, response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(self, response_id: str, request: Request) -> dict[str, Any]:
        return await self.responses.input_items(request, response_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(self, response_id: str, request: Request) -> dict[str, Any]:
        return await self.responses.cancel(request, response_id)

    @app.post("/v1/conversations")
    async def create_conversation(self, request: Request) -> dict[str, Any]:
        return await self.conversations.create(request)

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(self, conversation_id: str, request: Request) -> dict[str, Any]:
        return await self.conversations.retrieve(request, conversation_id)

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(self, conversation_id: str, request: Request) -> dict[str, Any]:
        return await self.conversations.update(request, conversation_id)

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(self, conversation_id: str, request: Request) -> dict[str, Any]:
        return await self.conversations.delete(request, conversation_id)

    @app.get("/v1/conversations/{conversation_id}/items")
    async def conversation_items(self, conversation_id: str, request: Request) -> dict[str, Any]:
        return await self.conversations.list_items(request, conversation_id)

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_conversation_items(
        self, conversation_id: str, request: Request
    ) -> dict[str, Any]:
        return await self.conversations.add_items(request, conversation_id)

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def conversation_item(
        self, conversation_id: str, item_id: str, request: Request
    ) -> dict[str, Any]:
        return await self.conversations.item(request, conversation_id, item_id)

    @app.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_conversation_item(
        self, conversation_id: str, item_id: str, request: Request
    ) -> dict[str, Any]:
        return await self.conversations.delete_item(request, conversation_id, item_id)

    @app.post("/v1/webhook_endpoints")
    async def create_webhook(self, request: Request) -> dict[str, Any]:
        return await self.webhooks.create(request)

    @app.get("/v1/webhook_endpoints")
    async def list_webhooks(self, request: Request) -> dict[str, Any]:
        return await self.webhooks.list(request)

    @app.get("/v1/webhook_endpoints/{endpoint_id}")
    async def get_webhook(self, endpoint_id: str, request: Request) -> dict[str, Any]:
        return await self.webhooks.retrieve(request, endpoint_id)

    @app.delete("/v1/webhook_endpoints/{endpoint_id}")
    async def delete_webhook(self, endpoint_id: str, request: Request) -> dict[str, Any]:
        return await self.webhooks.delete(request, endpoint_id)

    @app.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret")
    async def rotate_webhook_secret(self, endpoint_id: str, request: Request) -> dict[str, Any]:
        return await self.webhooks.rotate_secret(request, endpoint_id)

    @app.post("/admin/keys/{key_id}/webhook_endpoints")
    async def admin_create_webhook(self, key_id: str, request: Request) -> dict[str, Any]:
        self.admin.check(request)
        return await self.webhooks.create(request, owner=key_id)

    @app.get("/admin/keys/{key_id}/webhook_endpoints")
    async def admin_list_webhooks(self, key_id: str, request: Request) -> dict[str, Any]:
        self.admin.check(request)
        return await self.webhooks.list(request, owner=key_id)

    @app.get("/v1/usage")
    async def key_usage(self, request: Request) -> dict[str, Any]:
        return await self.usage.usage(request)

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
    async def status(self, request: Request) -> dict[str, Any]:
        return await self.ops.status(request)

    @app.get("/console", include_in_schema=False)
    async def console_home(self, request: Request) -> Response:
        return await self.console.home(request)

    @app.get("/console/tiers", include_in_schema=False)
    async def console_tiers(self, request: Request) -> Response:
        return await self.console.tiers_page(request)

    @app.get("/console/static/console.css", include_in_schema=False)
    async def console_css(self) -> Response:
        return self.console.stylesheet_response()

    @app.post("/console/login", include_in_schema=False)
    async def console_login(self, request: Request) -> Response:
        return await self.console.sign_in(request)

    @app.post("/console/logout", include_in_schema=False)
    async def console_logout(self, request: Request) -> Response:
        return await self.console.sign_out(request)

    @app.post("/console/keys", include_in_schema=False)
    async def console_create_key(self, request: Request) -> Response:
        return await self.console.create_key(request)

    @app.post("/console/keys/{key_id}/revoke", include_in_schema=False)
    async def console_revoke_key(self, key_id: str, request: Request) -> Response:
        return await self.console.revoke_key(request, key_id)

    @app.post("/console/keys/{key_id}", include_in_schema=False)
    async def console_update_key(self, key_id: str, request: Request) -> Response:
        return await self.console.update_key(request, key_id)

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
