"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from deployments.protocol import EngineError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    504: "timeout",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every non-2xx answer's body, as the OpenAPI document declares it."""

    error: ErrorDetail


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type or TYPES.get(status, "invalid_request_error")

    @classmethod
    def from_engine(cls, err: EngineError, headers: dict[str, str]) -> APIError:
        """An engine's refusal as the client sees it, its type and code kept; a prompt
        past the engine's context as each API words one."""
        if err.prompt_tokens is not None and err.max_context is not None:
            overflow = ContextOverflow(err.prompt_tokens, err.max_context)
            overflow.headers.update(headers)
            return overflow
        return cls(
            err.status_code,
            err.message,
            param=err.param,
            code=err.code,
            headers=headers,
            type=err.type,
        )

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(
            message=self.message,
            type=self.type,
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=detail).model_dump()


class WordedError(APIError):
    """A refusal a client reacts to by its wording: each wire format words it its own
    way (OpenAI's is the message; Anthropic's, `anthropic_words`)."""

    def anthropic_words(self, model: str) -> str:
        raise NotImplementedError


class ContextOverflow(WordedError):
    """A prompt longer than any tier the request may use serves: worded as each API
    words it, since agent CLIs compact their history on exactly these words."""

    def __init__(self, needs: int, limit: int) -> None:
        super().__init__(
            400,
            f"This model's maximum context length is {limit} tokens. However, your"
            f" messages resulted in at least {needs} tokens. Please reduce the length of"
            " the messages.",
            param="messages",
            code="context_length_exceeded",
        )
        self.needs = needs
        self.limit = limit

    def anthropic_words(self, model: str) -> str:
        """Anthropic's sentence, on which Claude Code compacts its conversation."""
        return f"prompt is too long: {self.needs} tokens > {self.limit} maximum"


class OutputCapExceeded(WordedError):
    """`max_tokens` past what the plan (or the key) allows, where it is refused rather
    than lowered."""

    def __init__(self, asked: int, limit: int) -> None:
        super().__init__(
            400,
            f"max_tokens exceeds the plan's limit of {limit}",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
        self.asked = asked
        self.limit = limit

    def anthropic_words(self, model: str) -> str:
        """Anthropic's own sentence, which Claude Code reads to retry with the limit."""
        return (
            f"max_tokens: {self.asked} > {self.limit}, which is the maximum allowed number"
            f" of output tokens for {model}"
        )


def storage_error(cause: object) -> APIError:
    """The 503 of a state store (usage, keys, responses) that cannot be written."""
    return APIError(503, str(cause), code="storage_unavailable", headers={"retry-after": "5"})
