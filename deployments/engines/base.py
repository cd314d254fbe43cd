"""The one small interface every engine implements (`deployments/protocol.py` says what
its calls yield)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from deployments.protocol import EngineLoad, EngineOutput


class Engine(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]: ...

    @abc.abstractmethod
    def completions(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]: ...

    @abc.abstractmethod
    def tokenize(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        """A chat body's prompt as the engine renders it, counted: one dict with OpenAI's
        `usage` (`prompt_tokens`), or an `EngineError`."""

    @abc.abstractmethod
    async def load(self) -> EngineLoad: ...

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
