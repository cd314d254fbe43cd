"""OpenAI's Responses API: `/v1/responses` and its stored responses.

A response request becomes the canonical chat request (`responses_convert.py`) over the
items of the turns before it (its `previous_response_id` chain, or its `conversation`),
and goes through the same pipeline as chat completions. The answer comes back as a
Response object or its typed event stream; stored (by default) in the session store,
under the caller's key, for later turns, retrieval and `input_items`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deployments.engine import Endpoint
from serve_app.actor_calls import ActorUnavailable
from serve_app.api.background import FAILURE_CODES, Runs
from serve_app.api.http import (
    SettledStreamingResponse,
    bearer,
    read_json,
    session_of,
    validated,
)
from serve_app.api.responses_convert import (
    ResponseWriter,
    chat_body,
    input_items,
    new_id,
    response_doc,
)
from serve_app.api.responses_models import ResponsesRequest
from serve_app.api.sse import DONE, sse, sse_payloads, stream_error_status
from serve_app.config import AppConfig
from serve_app.errors import APIError, storage_error
from serve_app.gateway import Caller
from serve_app.pipeline import Completed, Inbound, Pipeline, Streamed
from serve_app.schemas import ChatRequest, canonical_body
from serve_app.sealing import Sealer
from serve_app.session_store import StoredResponse
from serve_app.sessions import ItemConflict, SessionClient, StorageFull, StoreFailed

log = logging.getLogger("serve_app.api.responses")
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


@dataclass
class Turn:
    """One response request's state in this adapter, from its history to its storing."""

    req: ResponsesRequest
    caller: Caller
    items: list[dict[str, Any]]  # this request's input items, with ids
    session: str | None
    doc: dict[str, Any]  # the Response object being written

    @property
    def owner(self) -> str:
        return self.caller.key_id


class ResponsesAPI:
    def __init__(
        self, pipeline: Pipeline, config: AppConfig, sealer: Sealer, store: SessionClient
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.sealer = sealer
        self.store = store
        self.runs = Runs(pipeline, store, self)

    async def owner(self, request: Request) -> Caller:
        return await self.pipeline.identify(bearer(request))

    # ---- create ----------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body, size = await read_json(request, self.config.router.max_body_bytes)
        req = validated(body, ResponsesRequest)
        refuse_combinations(req)
        caller = await self.owner(request)
        history, chained = await guarded(self._history(caller.key_id, req))
        response_id = new_id("resp")
        # the session a usage record names: the client's, else the conversation or the
        # chain this response continues, else the chain it starts
        session = req.prompt_cache_key or session_of(request) or chained or response_id
        turn = Turn(req, caller, input_items(req.input), session, response_doc(req, response_id))
        sealer = self.sealer.counting()
        chat = validated(chat_body(req, history + turn.items, sealer), ChatRequest)
        inbound = Inbound(
            endpoint=Endpoint.CHAT,
            request=chat,
            body=canonical_body(chat),
            body_bytes=size,
            api_key=bearer(request),
            request_id=request.headers.get("x-request-id") or response_id,
            session=session,
            strategy=request.headers.get("x-kimi-routing-strategy"),
            api="responses",
            caller=caller,
            opened=sealer.opened,
        )
        writer = ResponseWriter(turn.doc, self.sealer, encrypt_reasoning(req), req.namespaced)
        if req.background:
            return JSONResponse(await guarded(self.runs.start(inbound, writer, turn)))
        result = await self.pipeline.serve(inbound)
        if hosted := req.hosted_tools:
            result.headers["x-kimi-tools-not-run"] = ", ".join(hosted)
        if isinstance(result, Streamed):
            events = self._events(result, writer, turn)
            return SettledStreamingResponse(result, events)
        return await self._completed(result, writer, turn)

    async def _history(
        self, owner: str, req: ResponsesRequest
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The items of the turns before this one, and the session they belong to."""
        if req.previous_response_id:
            chain = await self.store.chain(owner, req.previous_response_id)
            if chain is None:
                raise not_found("response", req.previous_response_id, "previous_response_id")
            items = [i for r in chain for i in (*r.inputs, *r.doc.get("output", ()))]
            return items, chain[-1].session or chain[0].id
        if conversation := req.conversation_id:
            items = await self.store.items(owner, conversation)
            if items is None:
                raise not_found("conversation", conversation, "conversation")
            return items, conversation
        return [], None

    async def _completed(
        self, result: Completed, writer: ResponseWriter, turn: Turn
    ) -> JSONResponse:
        writer.chunk(result.body)
        writer.finish()
        headers = dict(result.headers)
        await self.save(turn, headers)
        return JSONResponse(turn.doc, headers=headers)

    async def _events(
        self, stream: Streamed, writer: ResponseWriter, turn: Turn
    ) -> AsyncIterator[str]:
        yield "".join(sse(e) for e in writer.start())
        async for events in self.written(stream, writer, turn):
            yield "".join(sse(e) for e in events)

    async def written(
        self, stream: Streamed, writer: ResponseWriter, turn: Turn
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The stream's chunks written as the response's events; the response is stored
        before its last event goes out, so a client that heard the end finds it."""
        async for text in stream.events:
            out: list[dict[str, Any]] = []
            for chunk in sse_payloads(text):
                if chunk == DONE or not isinstance(chunk, dict) or writer.ended:
                    continue
                error = chunk.get("error")
                if isinstance(error, dict):
                    code = FAILURE_CODES.get(stream_error_status(error), "server_error")
                    out += writer.fail(code, str(error.get("message", "")))
                    await self.save(turn, {})
                else:
                    out += writer.chunk(chunk)
            if out:
                yield out
        if not writer.ended:
            final = writer.finish()
            await self.save(turn, {})
            yield final

    async def save(self, turn: Turn, headers: dict[str, str]) -> None:
        """Keep the turn where later ones find it: the response (when `store`), and its
        items in its conversation. A store that cannot take it leaves the answer as it
        is, said in the answer (`store: false`) and a header."""
        req, doc = turn.req, turn.doc
        try:
            if req.conversation_id:
                added = await self.store.add_items(
                    turn.owner, req.conversation_id, [*turn.items, *doc["output"]]
                )
                if not added:
                    raise StorageFull("the conversation was deleted meanwhile")
            if req.store:
                stored = StoredResponse(doc["id"], turn.session, doc, turn.items)
                await self.store.put_response(turn.owner, stored, req.previous_response_id)
        except (StorageFull, StoreFailed, ItemConflict, ActorUnavailable) as exc:
            log.warning("response %s not stored: %s", doc["id"], exc)
            doc["store"] = False
            headers["x-kimi-not-stored"] = str(exc)[:200]

    # ---- stored responses ------------------------------------------------------------

    async def _stored(self, request: Request, response_id: str) -> StoredResponse:
        caller = await self.owner(request)
        stored = await guarded(self.store.get_response(caller.key_id, response_id))
        if stored is None:
            raise not_found("response", response_id)
        return stored

    async def retrieve(self, request: Request, response_id: str) -> dict[str, Any]:
        return (await self._stored(request, response_id)).doc

    async def delete(self, request: Request, response_id: str) -> dict[str, Any]:
        caller = await self.owner(request)
        if not await guarded(self.store.delete_response(caller.key_id, response_id)):
            raise not_found("response", response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def input_items(self, request: Request, response_id: str) -> dict[str, Any]:
        return page((await self._stored(request, response_id)).inputs, request)

    async def cancel(self, request: Request, response_id: str) -> dict[str, Any]:
        stored = await self._stored(request, response_id)
        if not stored.doc.get("background"):
            raise APIError(
                400,
                "Only responses created with background=true can be cancelled",
                param="response_id",
            )
        caller = await self.owner(request)
        cancelled = await guarded(self.store.cancel_response(caller.key_id, response_id))
        if cancelled is None:
            raise not_found("response", response_id)
        return cancelled.doc


def refuse_combinations(req: ResponsesRequest) -> None:
    if req.previous_response_id and req.conversation_id:
        raise APIError(
            400,
            "previous_response_id and conversation cannot be used together",
            param="conversation",
        )
    if req.background and not req.store:
        raise APIError(400, "background responses must be stored (store: true)", param="store")
    if req.background and req.stream:
        raise APIError(
            400, "background responses are polled, not streamed: leave stream off", param="stream"
        )


def encrypt_reasoning(req: ResponsesRequest) -> bool:
    return "reasoning.encrypted_content" in (req.include or ())


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
