"""A key holder's own usage: `GET /v1/usage?group_by=day,session`, from the metered
records (those still in the write-ahead log included), never another key's."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from serve_app.api.common.http import bearer
from serve_app.api.common.routes import ApiFamily, get
from serve_app.errors import APIError
from serve_app.gateway.protocol import (
    ANONYMOUS,
    GatewayAdmin,
    GatewayUnavailable,
    UsageRecounting,
)
from serve_app.pipeline.pipeline import Pipeline, gateway_error

GROUPINGS = ("day", "tier", "model", "session", "api", "plan", "service_tier")


def recounting_error(recounting: UsageRecounting) -> APIError:
    return APIError(
        503,
        "usage totals are being counted again from the metered records (after an upgrade,"
        f" or where their rollups were lost): {recounting.pending} days left; retry shortly",
        code="usage_recounting",
        headers={"retry-after": "30"},
    )


class UsageAPI:
    def __init__(self, pipeline: Pipeline, gateway: GatewayAdmin) -> None:
        self.pipeline = pipeline
        self.gateway = gateway

    async def usage(self, request: Request) -> dict[str, Any]:
        caller = await self.pipeline.identify(bearer(request))
        if caller.key_id == ANONYMOUS:
            raise APIError(401, "usage is per API key: send one", code="invalid_api_key")
        by = [g for g in request.query_params.get("group_by", "day").split(",") if g]
        if not by or any(g not in GROUPINGS for g in by):
            raise APIError(
                400,
                f"group_by takes a comma-separated list of {', '.join(GROUPINGS)}",
                param="group_by",
            )
        try:
            rows = await self.gateway.usage(caller.key_id, by)
        except GatewayUnavailable:
            raise gateway_error() from None
        if isinstance(rows, UsageRecounting):
            raise recounting_error(rows)
        if isinstance(rows, str):
            raise APIError(400, rows, param="group_by")
        return {"object": "list", "group_by": by, "data": rows}


USAGE = ApiFamily(UsageAPI, (get("/v1/usage", UsageAPI.usage),))
