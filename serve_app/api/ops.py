"""Liveness, readiness and the tiers' live figures, for load balancers and operators."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from deployments.scheduling.loadboard import TierLoad
from serve_app.api.common.routes import ApiFamily, get
from serve_app.config import AppConfig

Snapshot = Callable[[], Awaitable[dict[str, TierLoad]]]
Fault = Callable[[], Awaitable[str | None]]


class OpsAPI:
    def __init__(
        self,
        config: AppConfig,
        snapshot: Snapshot,
        fault: Fault,
        is_operator: Callable[[Request], Awaitable[bool]],
    ) -> None:
        self.config = config
        self.snapshot = snapshot
        self.fault = fault  # why the state dir cannot be written, if it cannot
        self.is_operator = is_operator

    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        """Ready while some tier has a healthy replica. A tier at zero replicas whose
        catalogue allows zero is `"idle"`: ready, it starts on the next request."""
        loads = await self.snapshot()
        tiers: dict[str, bool | str] = {}
        for entry in self.config.tiers:
            load = loads.get(entry.name)
            if load is not None and load.replicas > 0:
                tiers[entry.name] = load.healthy
            else:
                tiers[entry.name] = "idle" if entry.autoscaling.min_replicas == 0 else False
        storage = await self._storage()
        ok = any(v is True for v in tiers.values()) and storage == "ok"
        body = {"ready": ok, "tiers": tiers, "storage": storage}
        return JSONResponse(body, 200 if ok else 503)

    async def _storage(self) -> str:
        """ "ok", or why requests are refused (the usage or key store cannot be written,
        the gateway is away)."""
        try:
            fault = await self.fault()
        except Exception as exc:
            return f"the gateway does not answer: {exc}"
        return fault or "ok"

    async def status(self, request: Request) -> dict[str, Any]:
        """Live engine figures per tier, summed over its replicas (each listed under
        `members`), as the replicas last reported them (every 0.5 s). Where the
        deployment requires keys, replica and node ids are for operators (the admin
        credential as bearer); anyone else learns only whether each tier can serve."""
        loads = await self.snapshot()
        detail = self.config.router.anonymous_plan is not None or await self.is_operator(request)
        tiers: dict[str, Any] = {}
        for t in self.config.tiers:
            load = loads.get(t.name)
            if detail:
                tiers[t.name] = load.model_dump() if load is not None else None
            else:
                tiers[t.name] = {"can_serve": load is not None and load.healthy}
        return {"tiers": tiers, "storage": await self._storage()}


OPS = ApiFamily(
    OpsAPI,
    (
        get("/health", lambda api, _: api.health()),
        get("/ready", lambda api, _: api.ready()),
        get("/status", OpsAPI.status),
    ),
)
