"""OpenAI's Responses API: `/v1/responses` and its stored responses.

A response request becomes the canonical chat request (`responses_convert.py`) over the
items of the turns before it (its `previous_response_id` chain, or its `conversation`),
and goes through the same pipeline as chat completions. The answer comes back as a
Response object or its typed event stream; stored (by default) in the session store,
under the caller's key, for later turns, retrieval and `input_items`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deployments.protocol import Endpoint
from serve_app.api.common.http import (
    SettledStreamingResponse,
    bearer,
    read_json,
    session_of,
    validated,
)
from serve_app.api.common.routes import ApiFamily, delete, get, post
from serve_app.api.common.sse import sse
from serve_app.api.common.stored import guarded, not_found, page
from serve_app.api.responses.background import Runs
from serve_app.api.responses.protocol import ResponsesRequest
from serve_app.api.responses.to_chat import chat_body, input_items, new_id
from serve_app.api.responses.turns import Turn, Turns
from serve_app.api.responses.writer import ResponseWriter, response_doc
from serve_app.canonical import ChatRequest, canonical_body
from serve_app.config import AppConfig
from serve_app.errors import APIError
from serve_app.gateway.protocol import Caller
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Completed, Inbound, Streamed
from serve_app.reasoning.sealing import Sealer
from serve_app.store.protocol import Store, StoredResponse

log = logging.getLogger("serve_app.api.responses.routes")
T = TypeVar("T")


class ResponsesAPI:
    def __init__(self, pipeline: Pipeline, config: AppConfig, sealer: Sealer, store: Store) -> None:
        self.pipeline = pipeline
        self.config = config
        self.sealer = sealer
        self.store = store
        self.turns = Turns(store)
        self.runs = Runs(pipeline, store, self.turns)

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
            service_tier=req.service_tier,
            caller=caller,
            opened=sealer.opened,
        )
        writer = ResponseWriter(turn.doc, self.sealer, encrypt_reasoning(req), req.namespaced)
        if req.background:
            return JSONResponse(await guarded(self.runs.start(inbound, writer, turn)))
        result = await self.pipeline.serve(inbound)
        writer.served(result.headers)
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
        await self.turns.save(turn, headers)
        return JSONResponse(turn.doc, headers=headers)

    async def _events(
        self, stream: Streamed, writer: ResponseWriter, turn: Turn
    ) -> AsyncIterator[str]:
        yield "".join(sse(e) for e in writer.start())
        async for events in self.turns.written(stream, writer, turn):
            yield "".join(sse(e) for e in events)

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


RESPONSES = ApiFamily(
    ResponsesAPI,
    (
        post("/v1/responses", ResponsesAPI.create, body=ResponsesRequest),
        get("/v1/responses/{response_id}", ResponsesAPI.retrieve),
        delete("/v1/responses/{response_id}", ResponsesAPI.delete),
        get("/v1/responses/{response_id}/input_items", ResponsesAPI.input_items),
        post("/v1/responses/{response_id}/cancel", ResponsesAPI.cancel),
    ),
)
