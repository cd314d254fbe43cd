"""What the app and the tiers share: the engine calls a request makes (`Endpoint`), the
values an engine hands back (`EngineOutput`, `EngineError`), and its live figures
(`EngineLoad`). The engine interface itself is `engines/base.py`.

Every engine request method is an async generator with one convention (Ray Serve LLM's): a
streaming request yields ready SSE strings (`data: ...\\n\\n`); a non-streaming request
yields one response dict; a failure before any output yields one `EngineError`. A failure
after output has started is reported inside the stream as an SSE error event.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class EngineError(BaseModel):
    status_code: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    # a prompt past the context (`context_overflow`): the engine's own counts, which the
    # router words as each API does (agent CLIs compact on those words and numbers)
    prompt_tokens: int | None = None
    max_context: int | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,  # OpenAI's code is a string or null, never the status
            }
        }

    def sse(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def token_count(count: int) -> dict[str, Any]:
    """A tokenize answer: the prompt's tokens as usage, nothing generated."""
    usage = {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}
    return {"object": "tokenization", "usage": usage}


def context_overflow(prompt_tokens: int, max_context: int) -> EngineError:
    """The engine's refusal of a prompt longer than its context, in one shape for every
    engine."""
    return EngineError(
        status_code=400,
        message=f"the prompt has {prompt_tokens} tokens; the context holds {max_context}",
        param="messages",
        code="context_length_exceeded",
        prompt_tokens=prompt_tokens,
        max_context=max_context,
    )


def mid_answer_error(error: dict[str, Any]) -> EngineError:
    """An engine server's error event in the middle of an answer (vLLM's, llama-server's
    `{"error": {...}}`) as ours: its status where it gives a valid one, else a 500."""
    code = error.get("code")
    return EngineError(
        status_code=code if isinstance(code, int) and 400 <= code < 600 else 500,
        message=f"the engine failed mid-answer: {error.get('message') or 'unknown error'}",
        type="server_error",
    )


def engine_down() -> EngineError:
    """The engine died under a request: a 503 to retry (before any token, the router
    sends the request to the plan's next tier itself)."""
    return EngineError(
        status_code=503,
        message="the tier's engine stopped while serving this request; retry it",
        type="server_error",
    )


class EngineLoad(BaseModel):
    """Live figures for routing and autoscaling, from the engine's own counters."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    capacity: int = 1  # requests the engine runs at once before queueing
    healthy: bool = True
    aborted_total: int = 0  # requests aborted because the client went away
    generated_tokens_total: int = 0  # tokens the engine has generated since it started
    restarts: int = 0  # engine processes restarted by the replica


EngineOutput = str | dict[str, Any] | EngineError


class Endpoint(StrEnum):
    """The engine call a request makes: a method of `Engine` and of the tier deployment,
    and the usage record's `endpoint`."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    TOKENIZE = "tokenize"  # a chat's prompt counted, nothing generated (not billed)
