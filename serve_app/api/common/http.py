"""What every HTTP adapter needs: reading a JSON body within limits, validating it into a
request model with a readable message, the bearer credential and the client's address,
and a streamed response whose settlement runs however the response ends."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from serve_app.canonical import UNION_TAGS
from serve_app.errors import APIError
from serve_app.pipeline.request import Streamed

# Deeper bodies would overflow the recursion of the validators, Ray's serializer or an
# engine's parser downstream; real tool and response schemas stay far below this.
MAX_JSON_DEPTH = 64

M = TypeVar("M", bound=BaseModel)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def json_depth(value: dict | list) -> int:
    """How many objects and arrays deep `value` nests (1 for a flat object)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def not_json(constant: str) -> None:
    # Python's json takes NaN and Infinity, which JSON does not: an engine would choke on them
    raise ValueError(f"{constant} is not JSON")


def is_tag(part: object, before: object) -> bool:
    """Whether a location part names a union's branch, not a field: a type ("str",
    "list[...]"), or the tag of a tagged union's item (a message's role)."""
    if not isinstance(part, str):
        return False
    return (
        "[" in part
        or part in ("str", "int", "float", "bool")
        or (isinstance(before, int) and part in UNION_TAGS)
    )


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    # A union (content: str | parts) reports one error per branch; the deepest says
    # what is wrong, and the branches' type tags ("str", "list[...]") are no field names.
    err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    parts = err.get("loc", ())
    loc = ".".join(
        str(p) for i, p in enumerate(parts) if not is_tag(p, parts[i - 1] if i else None)
    )
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


async def read_json(request: Request, limit: int) -> tuple[dict[str, Any], int]:
    """The body as a JSON object, and its size in bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes")
    try:
        body = json.loads(raw, parse_constant=not_json)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body, len(raw)


def validated(body: dict[str, Any], model: type[M]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param=param) from None


# The headers clients name their conversation in, most specific first: ours, Claude
# Code's (since 2.1.86), Codex's, and the underscore form some agents send.
SESSION_HEADERS = ("x-session-id", "x-claude-code-session-id", "session-id", "session_id")


def session_of(request: Request) -> str | None:
    for name in SESSION_HEADERS:
        if value := request.headers.get(name, "").strip():
            return value[:200]
    return None


def openai_error(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refusal in OpenAI's format (every route's but Anthropic's)."""
    return JSONResponse(exc.body(), exc.status, headers={**exc.headers, **(headers or {})})


def client_address(request: Request, trusted: Sequence[IPNetwork]) -> str:
    """The client's address: the peer's, or where the peer is a trusted proxy, the last
    address in `X-Forwarded-For` that is not one (the entries left of it are the
    client's to write, and not believed)."""
    peer = request.client.host if request.client else ""
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in [peer, *reversed(hops)]:
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return hop  # not an address (a test client's name): as it is
        if not any(ip in net for net in trusted):
            return hop
    return hops[0] if hops else peer  # every hop trusted: the first the chain names


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class SettledStreamingResponse(StreamingResponse):
    """A pipeline stream sent as SSE. The body generator may be left unfinished when the
    transport fails under it, so the stream is closed (and settled) when the response
    ends by any path."""

    def __init__(
        self,
        stream: Streamed,
        content: AsyncIterator[str],
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = {**(headers or stream.headers), "cache-control": "no-cache"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def receive_or_disconnect() -> Any:
            try:
                return await receive()
            except Exception:  # Ray's transport raises when the client is gone
                return {"type": "http.disconnect"}

        self.stream.started()
        try:
            await super().__call__(scope, receive_or_disconnect, send)
        finally:
            await self.stream.close()
