"""The response store's interface: stored responses, conversations and webhook
endpoints, every row owned by a key. Adapters reach the store through `Store` (the
ingress builds its client, `store/client.py`); refusals are the exceptions below, and
an actor away past the wait is `actors.ActorUnavailable`."""

from __future__ import annotations

from typing import Any, Protocol

from serve_app.store.responses_db import StoredResponse

__all__ = ["ItemConflict", "StorageFull", "Store", "StoreFailed", "StoredResponse"]


class StorageFull(Exception):
    """What a key would store does not fit its quota."""


class StoreFailed(Exception):
    """The store's database could not be read or written (disk full, read-only...)."""


class ItemConflict(Exception):
    """Items whose ids the conversation already holds (the client's error, not the store's)."""


class Store(Protocol):
    # ---- responses ------------------------------------------------------------------
    async def put_response(
        self, owner: str, stored: StoredResponse, previous: str | None
    ) -> None: ...

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None: ...

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        """The responses from the chain's start to `response_id`; None if unknown."""
        ...

    async def touch(self, owner: str, response_id: str) -> str | None:
        """A background run's sign of life; its status now (None: deleted)."""
        ...

    async def cancel_response(self, owner: str, response_id: str) -> StoredResponse | None: ...

    async def delete_response(self, owner: str, response_id: str) -> bool: ...

    # ---- conversations --------------------------------------------------------------
    async def create_conversation(
        self, owner: str, conversation_id: str, metadata: dict, items: list[dict]
    ) -> float: ...

    async def conversation(self, owner: str, conversation_id: str) -> tuple[float, dict] | None: ...

    async def update_conversation(
        self, owner: str, conversation_id: str, metadata: dict
    ) -> bool: ...

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool: ...

    async def add_items(self, owner: str, conversation_id: str, items: list[dict]) -> bool: ...

    async def items(
        self,
        owner: str,
        conversation_id: str,
        after: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict] | None: ...

    async def delete_item(self, owner: str, conversation_id: str, item_id: str) -> bool: ...

    async def delete_owner(self, owner: str) -> int:
        """Everything a key stored (its key was revoked); how many rows."""
        ...

    # ---- webhook endpoints and events -----------------------------------------------
    async def add_webhook(
        self, owner: str, ident: str, name: str, url: str, kinds: list[str]
    ) -> dict[str, Any]:
        """The new endpoint, with the signing secret the store made for it."""
        ...

    async def list_webhooks(self, owner: str) -> list[dict[str, Any]]: ...

    async def get_webhook(self, owner: str, ident: str) -> dict[str, Any] | None: ...

    async def delete_webhook(self, owner: str, ident: str) -> bool: ...

    async def rotate_webhook(self, owner: str, ident: str) -> dict[str, Any] | None:
        """The endpoint with a new signing secret; None if it is not the owner's."""
        ...

    async def emit_event(self, owner: str, event_id: str, kind: str, response_id: str) -> int:
        """An event for each of the owner's endpoints that takes `kind`; how many."""
        ...
