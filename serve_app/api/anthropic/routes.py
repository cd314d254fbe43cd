"""Anthropic's Messages API: `/v1/messages` and `/v1/messages/count_tokens`.

The request becomes the canonical chat request (`anthropic_convert.py`) and goes
through the same pipeline as chat completions: keys, plans, tier choice, limits,
budgets, metering, tracing and cancellation are the pipeline's. Answers and refusals
go back in Anthropic's shapes: a message or its event stream, and
`{"type": "error", "error": {"type", "message"}}` with Anthropic's statuses (529 when
saturated) and a `request-id` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deployments.protocol import Endpoint
from serve_app.api.anthropic.events import Answering, EventWriter, error_status, error_type, message
from serve_app.api.anthropic.protocol import (
    ANTHROPIC_ASKED,
    AnthropicError,
    Conversation,
    CountTokensRequest,
    MessagesRequest,
    thinking_omitted,
)
from serve_app.api.anthropic.to_chat import chat_body
from serve_app.api.common.http import (
    SettledStreamingResponse,
    bearer,
    read_json,
    session_of,
    validated,
)
from serve_app.api.common.routes import ApiFamily, post
from serve_app.api.common.sse import DONE, sse, sse_payloads, stream_error_status
from serve_app.canonical import ChatRequest, canonical_body
from serve_app.config import AppConfig
from serve_app.errors import APIError, WordedError
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Inbound, Streamed
from serve_app.reasoning.sealing import Sealer

log = logging.getLogger("serve_app.api.anthropic.routes")

PING_S = 10.0  # a stream waiting this long for its next event gets a ping


def error_response(exc: APIError, request_id: str) -> JSONResponse:
    status = error_status(exc.status)
    body = {"type": "error", "error": {"type": error_type(exc.status), "message": exc.message}}
    headers = {**exc.headers, "request-id": request_id}
    return JSONResponse(body, status, headers=headers)


async def with_pings(source: AsyncIterator[str], every_s: float) -> AsyncIterator[str | None]:
    """`source`'s items, and None whenever it has been quiet for `every_s`."""
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            item, pending = pending, None
            try:
                yield item.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()


async def anthropic_events(stream: Streamed, writer: EventWriter) -> AsyncIterator[str]:
    """The pipeline's OpenAI chunk events as Anthropic's event stream."""
    yield writer.start()
    async for text in with_pings(stream.events, PING_S):
        if text is None:
            yield sse({"type": "ping"})
            continue
        out = []
        for chunk in sse_payloads(text):
            if chunk == DONE:
                out.append(writer.finish())
            elif isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                out.append(writer.error(chunk["error"], stream_error_status(chunk["error"])))
            elif isinstance(chunk, dict):
                out.append(writer.chunk(chunk))
        if joined := "".join(out):
            yield joined
    if not writer.ended:  # the tier's stream ended without its [DONE]
        yield writer.finish()


class AnthropicAPI:
    def __init__(self, pipeline: Pipeline, config: AppConfig, sealer: Sealer) -> None:
        self.pipeline = pipeline
        self.config = config
        self.sealer = sealer

    async def messages(self, request: Request) -> Response:
        return await self._serve(request, MessagesRequest, Endpoint.CHAT)

    async def count_tokens(self, request: Request) -> Response:
        return await self._serve(request, CountTokensRequest, Endpoint.TOKENIZE)

    async def _serve(
        self, request: Request, model: type[Conversation], endpoint: Endpoint
    ) -> Response:
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        try:
            body, size = await read_json(request, self.config.router.max_body_bytes)
            req = validated(body, model)
            inbound = self._inbound(request, req, size, endpoint, request_id)
            result = await self.pipeline.serve(inbound)
        except APIError as exc:
            exc.headers.setdefault("x-kimi-router", self.pipeline.replica)
            if isinstance(exc, WordedError):
                exc.message = exc.anthropic_words(str(body.get("model")))
            return error_response(exc, request_id)
        except Exception:
            log.exception("unhandled error")  # the trace goes to the log, never to the client
            refusal = APIError(500, "internal error; the request was not served")
            return error_response(refusal, request_id)
        headers = {**result.headers, "request-id": request_id}
        how = Answering(
            message_id=f"msg_{uuid.uuid4().hex[:24]}",
            model=req.model,
            stop_sequences=stop_sequences(req),
            sealer=self.sealer,
            omit_thinking=thinking_omitted(req),
            band=result.headers.get("x-kimi-service-tier", "default"),
        )
        if isinstance(result, Streamed):
            events = anthropic_events(result, EventWriter(how))
            return SettledStreamingResponse(result, events, headers)
        if endpoint is Endpoint.TOKENIZE:
            counted = {"input_tokens": result.body["usage"]["prompt_tokens"]}
            return JSONResponse(counted, headers=headers)
        return JSONResponse(message(result.body, how), headers=headers)

    def _inbound(
        self, request: Request, req: Conversation, size: int, endpoint: Endpoint, request_id: str
    ) -> Inbound:
        sealer = self.sealer.counting()
        chat = validated(chat_body(req, sealer), ChatRequest)
        return Inbound(
            endpoint=endpoint,
            request=chat,
            body=canonical_body(chat),
            body_bytes=size,
            api_key=request.headers.get("x-api-key") or bearer(request),
            request_id=request_id,
            session=session_of(request) or metadata_session(req),
            strategy=request.headers.get("x-kimi-routing-strategy"),
            api="anthropic",
            service_tier=ANTHROPIC_ASKED.get(req.service_tier or "auto"),
            clamp_output=self.config.router.clamp_messages_max_tokens,
            opened=sealer.opened,
        )


def stop_sequences(req: Conversation) -> list[str] | None:
    return req.stop_sequences if isinstance(req, MessagesRequest) else None


def metadata_session(req: Conversation) -> str | None:
    """Claude Code before 2.1.86 put its session in `metadata.user_id`, as JSON with a
    `session_id` or as `user_..._session_<uuid>`."""
    metadata = getattr(req, "metadata", None)
    user = metadata.user_id if metadata is not None else None
    if not user:
        return None
    try:
        parsed = json.loads(user)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str):
        return parsed["session_id"]
    _, found, session = user.rpartition("_session_")
    return session if found and session else None


ANTHROPIC = ApiFamily(
    AnthropicAPI,
    (
        post("/v1/messages", AnthropicAPI.messages, body=MessagesRequest),
        post("/v1/messages/count_tokens", AnthropicAPI.count_tokens, body=CountTokensRequest),
    ),
    error=AnthropicError,
)
