"""What every adapter over the response store shares: its calls guarded into the API's
errors, "not found" in OpenAI's words, and OpenAI's list pages."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from serve_app.actors import ActorUnavailable
from serve_app.errors import APIError, storage_error
from serve_app.store.protocol import StoreFailed

T = TypeVar("T")


def store_unavailable() -> APIError:
    return APIError(
        503,
        "the response store is restarting; retry shortly",
        code="store_unavailable",
        headers={"retry-after": "2"},
    )


def not_found(what: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"No {what} found with id '{ident}'.", param=param)


async def guarded(call: Awaitable[T]) -> T:
    """A store call; its actor away past the wait is a retryable 503."""
    try:
        return await call
    except ActorUnavailable:
        raise store_unavailable() from None
    except StoreFailed as exc:
        raise storage_error(exc) from None


def page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
    """A list answer of OpenAI's form (`after`, `limit`, `order` from the query; newest
    first unless `order=asc`)."""
    q = request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", param="order")
    raw_limit = q.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise APIError(400, "limit must be an integer from 1 to 100", param="limit")
    ordered = items if order == "asc" else items[::-1]
    if after := q.get("after"):
        at = next((n for n, i in enumerate(ordered) if i.get("id") == after), None)
        if at is None:
            raise APIError(400, f"no item {after!r} in this list", param="after")
        ordered = ordered[at + 1 :]
    data = ordered[: int(raw_limit)]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > len(data),
    }
