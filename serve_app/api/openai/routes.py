"""OpenAI's API: chat completions, completions and the model list.

The wire format is the canonical one, so translation is validation: the body becomes a
`ChatRequest` or `CompletionRequest`, the pipeline's answer goes back as JSON or SSE,
refusals as OpenAI's error object (`serve_app/errors.py`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

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
from serve_app.api.common.routes import ApiFamily, get, post
from serve_app.api.openai.chat_reasoning import ChatReasoning
from serve_app.api.openai.measured import measured_accuracy
from serve_app.canonical import ChatRequest, CompletionRequest, canonical_body
from serve_app.config import BASE_MODEL, AppConfig
from serve_app.errors import APIError
from serve_app.gateway.protocol import ReasoningKeeper
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Completed, Inbound, Result
from serve_app.reasoning.sealing import Opened


def render(result: Result) -> Response:
    if isinstance(result, Completed):
        return JSONResponse(result.body, headers=result.headers)
    return SettledStreamingResponse(result, result.events)


class OpenAIAPI:
    def __init__(self, pipeline: Pipeline, config: AppConfig, memory: ReasoningKeeper) -> None:
        self.pipeline = pipeline
        self.config = config
        self.accuracy = measured_accuracy(config.tiers)
        self.reasoning = ChatReasoning(memory)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.CHAT, ChatRequest)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.COMPLETIONS, CompletionRequest)

    async def _serve(
        self, request: Request, endpoint: Endpoint, model: type[ChatRequest | CompletionRequest]
    ) -> Response:
        try:
            inbound = await self._inbound(request, endpoint, model)
            if endpoint is not Endpoint.CHAT:
                return render(await self.pipeline.serve(inbound))
            return render(await self._chat(inbound))
        except APIError as exc:
            exc.headers.setdefault("x-kimi-router", self.pipeline.replica)
            raise

    async def _chat(self, inbound: Inbound) -> Result:
        """A chat completion, with the reasoning its history dropped restored (thinking
        mode: K2.5 reads it) and its own remembered for the next turn."""
        caller = await self.pipeline.identify(inbound.api_key)
        prefix = self.reasoning.prefix(inbound)
        opened = Opened(remembered=await self.reasoning.restore(inbound, caller.key_id))
        inbound = dataclasses.replace(inbound, caller=caller, opened=opened)
        result = await self.pipeline.serve(inbound)
        return await self.reasoning.remembering(inbound, prefix, caller.key_id, result)

    async def _inbound(
        self, request: Request, endpoint: Endpoint, model: type[ChatRequest | CompletionRequest]
    ) -> Inbound:
        body, size = await read_json(request, self.config.router.max_body_bytes)
        parsed = validated(body, model)
        headers = request.headers
        return Inbound(
            endpoint=endpoint,
            request=parsed,
            body=canonical_body(parsed),
            body_bytes=size,
            api_key=bearer(request),
            request_id=headers.get("x-request-id") or f"req-{uuid.uuid4().hex}",
            session=session_of(request),
            strategy=headers.get("x-kimi-routing-strategy"),
            service_tier=parsed.service_tier,
        )

    def models(self) -> dict[str, Any]:
        created = int(time.time())
        data: list[dict[str, Any]] = [
            {"id": BASE_MODEL, "object": "model", "created": created, "owned_by": "kimi-serve"}
        ]
        for tier in self.config.tiers:
            data.append(
                {
                    "id": tier.model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "kimi-serve",
                    "max_model_len": tier.max_context,
                    "engine": tier.engine,
                    "quantization": tier.quantization_label,
                    "capabilities": tier.capabilities.model_dump(),
                    "measured": self.accuracy.get(tier.name),
                    "pricing": tier.price.model_dump(),
                }
            )
        return {"object": "list", "data": data}


OPENAI = ApiFamily(
    OpenAIAPI,
    (
        post("/v1/chat/completions", OpenAIAPI.chat, body=ChatRequest),
        post("/v1/completions", OpenAIAPI.completions, body=CompletionRequest),
        get("/v1/models", lambda api, _: api.models()),
    ),
)
