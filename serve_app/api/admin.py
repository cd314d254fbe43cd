"""The operators' API: keys and usage, behind its own credential (the admin token from
the environment variable the config names), never an API key."""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from serve_app.api.common.http import IPNetwork, bearer, client_address, read_json, validated
from serve_app.api.common.routes import ApiFamily, delete, get, post
from serve_app.api.common.stored import guarded
from serve_app.errors import APIError, storage_error
from serve_app.gateway.protocol import (
    GatewayAdmin,
    GatewayUnavailable,
    Guard,
    NewKey,
    StorageFault,
    hash_key,
)
from serve_app.pipeline.pipeline import gateway_error
from serve_app.store.protocol import Store

T = TypeVar("T")


async def answered(call: Awaitable[T]) -> T:
    """The gateway's answer; its faults as the 503s they are (never a 400 or 500)."""
    try:
        return await call
    except StorageFault as exc:
        raise storage_error(exc) from None
    except GatewayUnavailable:
        raise gateway_error() from None


class Doorman:
    """Credential attempts through the gateway's `Guard`: refused unchecked (429 with
    `Retry-After`) while the client's address must wait, and each failure counted."""

    def __init__(self, guard: Guard, trusted: Sequence[IPNetwork]) -> None:
        self.guard = guard
        self.trusted = trusted

    async def attempt(
        self, request: Request, scope: str, check: Callable[[], Awaitable[bool]]
    ) -> bool:
        address = client_address(request, self.trusted)
        if (wait := await answered(self.guard.wait(scope, address))) > 0:
            raise too_many_attempts(wait)
        if await check():
            return True
        await answered(self.guard.failed(scope, address))
        return False


def too_many_attempts(wait_s: float) -> APIError:
    return APIError(
        429,
        f"too many failed attempts from this address; retry in {math.ceil(wait_s)} s",
        code="too_many_attempts",
        headers={"retry-after": str(max(1, math.ceil(wait_s)))},
    )


class AdminAPI:
    def __init__(
        self,
        gateway: GatewayAdmin,
        store: Store,
        token_env: str,
        max_body_bytes: int,
        doorman: Doorman,
    ) -> None:
        self.gateway = gateway
        self.store = store
        self.token_env = token_env
        self.max_body_bytes = max_body_bytes
        self.doorman = doorman
        token = os.environ.get(token_env)
        self._hash = hash_key(token) if token else None

    def is_admin(self, credential: str) -> bool:
        return self._hash is not None and hmac.compare_digest(hash_key(credential), self._hash)

    async def operator(self, request: Request) -> bool:
        """Whether the request's bearer is the admin credential (no bearer: no attempt;
        a wrong one is counted against its address)."""
        credential = bearer(request)
        if credential is None or self._hash is None:
            return False

        async def check() -> bool:
            return self.is_admin(credential)

        return await self.doorman.attempt(request, "admin", check)

    async def check(self, request: Request) -> None:
        if self._hash is None:
            raise APIError(403, f"the admin API is disabled: set {self.token_env}")
        if not await self.operator(request):
            raise APIError(401, "invalid admin credential", code="invalid_admin_key")

    async def check_key(self, request: Request, key_id: str) -> None:
        """An operator's call about one key: the credential, and the key live (a 404
        for an unknown or revoked one, whose stored state is gone)."""
        await self.check(request)
        account = await answered(self.gateway.key_account(key_id))
        if account is None or account.info.revoked_at is not None:
            raise APIError(404, f"No live key found with id '{key_id}'.", param="key_id")

    async def create_key(self, request: Request) -> JSONResponse:
        await self.check(request)
        body, _ = await read_json(request, self.max_body_bytes)
        spec = validated(body, NewKey)
        try:
            key, info = await answered(self.gateway.create_key(spec))
        except ValueError as exc:
            raise APIError(400, str(exc), param="plan") from None
        return JSONResponse({"key": key, **info.model_dump()}, 201)

    async def list_keys(self, request: Request) -> dict[str, Any]:
        await self.check(request)
        keys = await answered(self.gateway.list_keys())
        return {"object": "list", "data": [k.model_dump() for k in keys]}

    async def revoke_key(self, request: Request, key_id: str) -> dict[str, Any]:
        await self.check(request)
        if not await answered(self.gateway.revoke_key(key_id)):
            raise APIError(404, f"no active key {key_id!r}", param="key_id")
        # what the key stored (responses, conversations) goes with it
        deleted = await guarded(self.store.delete_owner(key_id))
        return {"key_id": key_id, "revoked": True, "stored_items_deleted": deleted}

    async def flush_usage(self, request: Request) -> dict[str, bool]:
        await self.check(request)
        if fault := await answered(self.gateway.flush()):
            raise storage_error(StorageFault(fault))
        return {"flushed": True}


ADMIN = ApiFamily(
    AdminAPI,
    (
        post("/admin/keys", AdminAPI.create_key, body=NewKey, status_code=201),
        get("/admin/keys", AdminAPI.list_keys),
        delete("/admin/keys/{key_id}", AdminAPI.revoke_key),
        post("/admin/usage/flush", AdminAPI.flush_usage),
    ),
)
