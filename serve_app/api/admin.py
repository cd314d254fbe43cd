"""The operators' API: keys and usage, behind its own credential (the admin token from
the environment variable the config names), never an API key."""

from __future__ import annotations

import hmac
import os
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from serve_app.api.http import bearer, read_json, validated
from serve_app.errors import APIError
from serve_app.gateway import GatewayClient, StorageFault
from serve_app.keys import NewKey, hash_key
from serve_app.sessions import SessionClient


def storage_error(exc: StorageFault) -> APIError:
    return APIError(503, str(exc), code="storage_unavailable", headers={"retry-after": "5"})


class AdminAPI:
    def __init__(
        self, gateway: GatewayClient, store: SessionClient, token_env: str, max_body_bytes: int
    ) -> None:
        self.gateway = gateway
        self.store = store
        self.token_env = token_env
        self.max_body_bytes = max_body_bytes
        token = os.environ.get(token_env)
        self._hash = hash_key(token) if token else None

    def check(self, request: Request) -> None:
        if self._hash is None:
            raise APIError(403, f"the admin API is disabled: set {self.token_env}")
        if not hmac.compare_digest(hash_key(bearer(request) or ""), self._hash):
            raise APIError(401, "invalid admin credential", code="invalid_admin_key")

    async def create_key(self, request: Request) -> JSONResponse:
        self.check(request)
        body, _ = await read_json(request, self.max_body_bytes)
        spec = validated(body, NewKey)
        try:
            key, info = await self.gateway.create_key(spec)
        except ValueError as exc:
            raise APIError(400, str(exc), param="plan") from None
        except StorageFault as exc:
            raise storage_error(exc) from None
        return JSONResponse({"key": key, **info.model_dump()}, 201)

    async def list_keys(self, request: Request) -> dict[str, Any]:
        self.check(request)
        try:
            keys = await self.gateway.list_keys()
        except StorageFault as exc:
            raise storage_error(exc) from None
        return {"object": "list", "data": [k.model_dump() for k in keys]}

    async def revoke_key(self, request: Request, key_id: str) -> dict[str, Any]:
        self.check(request)
        try:
            revoked = await self.gateway.revoke_key(key_id)
        except StorageFault as exc:
            raise storage_error(exc) from None
        if not revoked:
            raise APIError(404, f"no active key {key_id!r}", param="key_id")
        # what the key stored (responses, conversations) goes with it
        deleted = await self.store.delete_owner(key_id)
        return {"key_id": key_id, "revoked": True, "stored_items_deleted": deleted}

    async def flush_usage(self, request: Request) -> dict[str, bool]:
        self.check(request)
        if fault := await self.gateway.flush():
            raise storage_error(StorageFault(fault))
        return {"flushed": True}
