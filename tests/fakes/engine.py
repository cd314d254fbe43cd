"""An in-process engine implementing the real engine interface (`engines/base.py`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from deployments.engines.base import Engine
from deployments.protocol import EngineError, EngineLoad, EngineOutput, engine_down, token_count


class FakeEngine(Engine):
    """Answers `tokens` tokens, one every `delay_s`; or fails before any (`down`); or
    never answers (`hang`). Records what it was asked and whether it was stopped."""

    def __init__(self, tokens: int = 4, delay_s: float = 0.0) -> None:
        self.tokens = tokens
        self.delay_s = delay_s
        self.down = False
        self.hang = False
        self.refusal: EngineError | None = None  # yielded instead of an answer, where set
        self.requests: list[str] = []
        self.bodies: list[dict[str, Any]] = []  # what each request asked, in order
        self.stopped: list[str] = []  # requests ended before they finished

    async def _answer(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        self.requests.append(request_id)
        self.bodies.append(body)
        finished = False
        try:
            if self.down or self.refusal is not None:
                yield self.refusal or engine_down()
                finished = True
                return
            if self.hang:
                await asyncio.Event().wait()
            usage = {"prompt_tokens": 5, "completion_tokens": self.tokens, "total_tokens": 5}
            if not body.get("stream"):
                await asyncio.sleep(self.delay_s * self.tokens)
                message = {"role": "assistant", "content": "x" * self.tokens}
                yield {
                    "object": "chat.completion",
                    "choices": [{"message": message}],
                    "usage": usage,
                }
            else:
                for _ in range(self.tokens):
                    await asyncio.sleep(self.delay_s)
                    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.stopped.append(request_id)

    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        return self._answer(body, request_id)

    def completions(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        return self._answer(body, request_id)

    async def tokenize(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        self.requests.append(request_id)
        self.bodies.append(body)
        yield token_count(len(json.dumps(body["messages"])) // 4)

    async def start(self) -> None:
        pass

    async def load(self) -> EngineLoad:
        return EngineLoad()

    async def check_health(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
