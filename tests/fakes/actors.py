"""A detached actor's class run in-process and reached as Ray's handle is, so the real
client and the real actor meet without Ray (`actors.ActorCalls`'s interface)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class LocalMethod:
    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method

    async def remote(self, *args: Any) -> Any:
        result = self.method(*args)
        return await result if isinstance(result, Awaitable) else result


class LocalHandle:
    """`handle.method.remote(...)`, awaited, as on a Ray actor handle."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    def __getattr__(self, name: str) -> LocalMethod:
        return LocalMethod(getattr(self.instance, name))


class LocalCalls:
    """`ActorCalls` over an in-process actor: never away."""

    def __init__(self, instance: Any) -> None:
        self.actor = LocalHandle(instance)

    async def __call__(self, call: Callable[[Any], Awaitable[T]]) -> T:
        return await call(self.actor)
