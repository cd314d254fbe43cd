"""OpenAI's webhook endpoint API (`/v1/webhook_endpoints`, what the `openai` SDK's
`webhooks.create` / `list` / `retrieve` / `delete` / `rotate_secret` call): a key holder
registers where its background responses' events go. Operators do the same for any key
through the admin API (`/admin/keys/{key_id}/webhook_endpoints`)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.common.http import bearer, read_json, validated
from serve_app.api.common.routes import ApiFamily, delete, get, post
from serve_app.api.common.stored import guarded, not_found
from serve_app.config import OutboundPolicy
from serve_app.errors import APIError
from serve_app.gateway.protocol import ANONYMOUS
from serve_app.outbound import Refused, resolve
from serve_app.pipeline.pipeline import Pipeline
from serve_app.store.protocol import Store

EventType = Literal[
    "response.completed", "response.failed", "response.cancelled", "response.incomplete"
]


class NewEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(min_length=1, max_length=2048)
    name: str = Field("", max_length=200)
    event_types: list[EventType] = Field(min_length=1)


class WebhookEndpointsAPI:
    def __init__(
        self,
        pipeline: Pipeline,
        store: Store,
        policy: OutboundPolicy,
        max_body_bytes: int,
        check_key: Callable[[Request, str], Awaitable[None]],
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.check_key = check_key  # the admin routes' check: the credential, the key live

    async def _owner(self, request: Request) -> str:
        caller = await self.pipeline.identify(bearer(request))
        if caller.key_id == ANONYMOUS:
            raise APIError(401, "webhook endpoints belong to an API key: send one")
        return caller.key_id

    async def create(self, request: Request, owner: str | None = None) -> dict[str, Any]:
        """For the caller's key, or (admin API) for `owner`."""
        body, _ = await read_json(request, self.max_body_bytes)
        spec = validated(body, NewEndpoint)
        owner = owner or await self._owner(request)
        try:
            await resolve(spec.url, self.policy)
        except Refused as exc:
            raise APIError(400, f"url: {exc}", param="url") from None
        ident = f"we_{uuid.uuid4().hex}"
        kinds = list(dict.fromkeys(spec.event_types))
        return await guarded(self.store.add_webhook(owner, ident, spec.name, spec.url, kinds))

    async def list(self, request: Request, owner: str | None = None) -> dict[str, Any]:
        owner = owner or await self._owner(request)
        data = await guarded(self.store.list_webhooks(owner))
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    async def retrieve(self, request: Request, endpoint_id: str) -> dict[str, Any]:
        found = await guarded(self.store.get_webhook(await self._owner(request), endpoint_id))
        if found is None:
            raise not_found("webhook endpoint", endpoint_id)
        return found

    async def delete(
        self, request: Request, endpoint_id: str, owner: str | None = None
    ) -> dict[str, Any]:
        owner = owner or await self._owner(request)
        if not await guarded(self.store.delete_webhook(owner, endpoint_id)):
            raise not_found("webhook endpoint", endpoint_id)
        return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}

    async def rotate_secret(self, request: Request, endpoint_id: str) -> dict[str, Any]:
        owner = await self._owner(request)
        found = await guarded(self.store.rotate_webhook(owner, endpoint_id))
        if found is None:
            raise not_found("webhook endpoint", endpoint_id)
        return found

    async def create_for_key(self, request: Request, key_id: str) -> dict[str, Any]:
        await self.check_key(request, key_id)
        return await self.create(request, owner=key_id)

    async def list_for_key(self, request: Request, key_id: str) -> dict[str, Any]:
        await self.check_key(request, key_id)
        return await self.list(request, owner=key_id)

    async def delete_for_key(
        self, request: Request, key_id: str, endpoint_id: str
    ) -> dict[str, Any]:
        await self.check_key(request, key_id)
        return await self.delete(request, endpoint_id, owner=key_id)


WEBHOOKS = ApiFamily(
    WebhookEndpointsAPI,
    (
        post("/v1/webhook_endpoints", WebhookEndpointsAPI.create, body=NewEndpoint),
        get("/v1/webhook_endpoints", WebhookEndpointsAPI.list),
        get("/v1/webhook_endpoints/{endpoint_id}", WebhookEndpointsAPI.retrieve),
        delete("/v1/webhook_endpoints/{endpoint_id}", WebhookEndpointsAPI.delete),
        post(
            "/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
            WebhookEndpointsAPI.rotate_secret,
        ),
        post(
            "/admin/keys/{key_id}/webhook_endpoints",
            WebhookEndpointsAPI.create_for_key,
            body=NewEndpoint,
        ),
        get("/admin/keys/{key_id}/webhook_endpoints", WebhookEndpointsAPI.list_for_key),
        delete(
            "/admin/keys/{key_id}/webhook_endpoints/{endpoint_id}",
            WebhookEndpointsAPI.delete_for_key,
        ),
    ),
)
