"""OpenAI's webhook endpoint API (`/v1/webhook_endpoints`, what the `openai` SDK's
`webhooks.create` / `list` / `retrieve` / `delete` / `rotate_secret` call): a key holder
registers where its background responses' events go. Operators do the same for any key
through the admin API (`/admin/keys/{key_id}/webhook_endpoints`)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.http import bearer, read_json, validated
from serve_app.api.responses import guarded, not_found
from serve_app.config import OutboundPolicy
from serve_app.errors import APIError
from serve_app.gateway import ANONYMOUS
from serve_app.outbound import Refused, resolve
from serve_app.pipeline import Pipeline
from serve_app.sessions import SessionClient
from serve_app.webhooks import new_secret

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
        store: SessionClient,
        policy: OutboundPolicy,
        max_body_bytes: int,
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.policy = policy
        self.max_body_bytes = max_body_bytes

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
        return await guarded(
            self.store.webhooks("add", owner, ident, spec.name, spec.url, new_secret(), kinds)
        )

    async def list(self, request: Request, owner: str | None = None) -> dict[str, Any]:
        owner = owner or await self._owner(request)
        data = await guarded(self.store.webhooks("list", owner))
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    async def retrieve(self, request: Request, ident: str) -> dict[str, Any]:
        found = await guarded(self.store.webhooks("get", await self._owner(request), ident))
        if found is None:
            raise not_found("webhook endpoint", ident)
        return found

    async def delete(self, request: Request, ident: str) -> dict[str, Any]:
        if not await guarded(self.store.webhooks("delete", await self._owner(request), ident)):
            raise not_found("webhook endpoint", ident)
        return {"id": ident, "object": "webhook_endpoint.deleted", "deleted": True}

    async def rotate_secret(self, request: Request, ident: str) -> dict[str, Any]:
        owner = await self._owner(request)
        found = await guarded(self.store.webhooks("rotate", owner, ident, new_secret()))
        if found is None:
            raise not_found("webhook endpoint", ident)
        return found
