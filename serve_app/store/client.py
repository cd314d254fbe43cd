"""The response store's calls, awaited through its actor's restarts: `Store`
(`store/protocol.py`) as the ingress hands it to the adapters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ray.util import metrics

from serve_app.actors import ActorCalls, detached_actor
from serve_app.config import SessionSettings
from serve_app.store.actor import ACTOR_NAME, StoreActor
from serve_app.store.protocol import ItemConflict, StorageFull, StoredResponse, StoreFailed


class StoreClient:
    def __init__(self, calls: ActorCalls) -> None:
        self._calls = calls

    def configure(self, settings: SessionSettings) -> None:
        """This deployment's limits and webhook settings; not awaited."""
        self._calls.actor.configure.remote(settings)

    async def _call(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        result = await self._calls(call)
        if isinstance(result, StorageFull | StoreFailed | ItemConflict):
            raise result
        return result

    async def put_response(self, owner: str, stored: StoredResponse, previous: str | None) -> None:
        await self._call(lambda a: a.put_response.remote(owner, stored, previous))

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        return await self._call(lambda a: a.get_response.remote(owner, response_id))

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        return await self._call(lambda a: a.chain.remote(owner, response_id))

    async def touch(self, owner: str, response_id: str) -> str | None:
        return await self._call(lambda a: a.touch.remote(owner, response_id))

    async def cancel_response(self, owner: str, response_id: str) -> StoredResponse | None:
        return await self._call(lambda a: a.cancel_response.remote(owner, response_id))

    async def delete_response(self, owner: str, response_id: str) -> bool:
        return await self._call(lambda a: a.delete_response.remote(owner, response_id))

    async def create_conversation(
        self, owner: str, conversation_id: str, metadata: dict, items: list[dict]
    ) -> float:
        return await self._call(
            lambda a: a.create_conversation.remote(owner, conversation_id, metadata, items)
        )

    async def conversation(self, owner: str, conversation_id: str) -> tuple[float, dict] | None:
        return await self._call(lambda a: a.conversation.remote(owner, conversation_id))

    async def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> bool:
        return await self._call(
            lambda a: a.update_conversation.remote(owner, conversation_id, metadata)
        )

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        return await self._call(lambda a: a.delete_conversation.remote(owner, conversation_id))

    async def add_items(self, owner: str, conversation_id: str, items: list[dict]) -> bool:
        return await self._call(lambda a: a.add_items.remote(owner, conversation_id, items))

    async def items(
        self,
        owner: str,
        conversation_id: str,
        after: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict] | None:
        return await self._call(
            lambda a: a.items.remote(owner, conversation_id, after, limit, newest_first)
        )

    async def delete_item(self, owner: str, conversation_id: str, item_id: str) -> bool:
        return await self._call(lambda a: a.delete_item.remote(owner, conversation_id, item_id))

    async def delete_owner(self, owner: str) -> int:
        return await self._call(lambda a: a.delete_owner.remote(owner))

    async def add_webhook(
        self, owner: str, ident: str, name: str, url: str, kinds: list[str]
    ) -> dict[str, Any]:
        return await self._call(lambda a: a.add_webhook.remote(owner, ident, name, url, kinds))

    async def list_webhooks(self, owner: str) -> list[dict[str, Any]]:
        return await self._call(lambda a: a.list_webhooks.remote(owner))

    async def get_webhook(self, owner: str, ident: str) -> dict[str, Any] | None:
        return await self._call(lambda a: a.get_webhook.remote(owner, ident))

    async def delete_webhook(self, owner: str, ident: str) -> bool:
        return await self._call(lambda a: a.delete_webhook.remote(owner, ident))

    async def rotate_webhook(self, owner: str, ident: str) -> dict[str, Any] | None:
        return await self._call(lambda a: a.rotate_webhook.remote(owner, ident))

    async def emit_event(self, owner: str, event_id: str, kind: str, response_id: str) -> int:
        return await self._call(lambda a: a.emit_event.remote(owner, event_id, kind, response_id))


def connect_store(root: Path, settings: SessionSettings, wait_s: float) -> StoreClient:
    """The cluster's response store actor, created by the first ingress replica that asks
    (and again by any that finds it gone for good)."""
    retried = metrics.Counter(
        "kimi_sessions_retries", "response store calls retried while its actor was away"
    )
    calls = ActorCalls(
        detached_actor(StoreActor, ACTOR_NAME, str(root), settings),
        "response store",
        wait_s,
        retried,
    )
    client = StoreClient(calls)
    client.configure(settings)
    return client
