"""OpenAI's Conversations API: `/v1/conversations` and their items, the server-side
memory of an agent session. A response made with `conversation` reads its items and adds
its input and output to them (`routes.py`)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from serve_app.api.common.http import bearer, read_json, validated
from serve_app.api.common.routes import ApiFamily, delete, get, post
from serve_app.api.common.stored import guarded, not_found, page
from serve_app.api.responses.protocol import (
    ConversationCreate,
    ConversationUpdate,
    ItemsCreate,
)
from serve_app.api.responses.to_chat import input_items, new_id
from serve_app.errors import APIError
from serve_app.pipeline.pipeline import Pipeline
from serve_app.store.protocol import ItemConflict, StorageFull, Store


def conversation_doc(conversation_id: str, created_at: float, metadata: dict) -> dict[str, Any]:
    return {
        "id": conversation_id,
        "object": "conversation",
        "created_at": int(created_at),
        "metadata": metadata,
    }


class ConversationsAPI:
    def __init__(self, pipeline: Pipeline, store: Store, max_body_bytes: int) -> None:
        self.pipeline = pipeline
        self.store = store
        self.max_body_bytes = max_body_bytes

    async def _owner(self, request: Request) -> str:
        return (await self.pipeline.identify(bearer(request))).key_id

    async def _body(self, request: Request, model: type[Any]) -> Any:
        body, _ = await read_json(request, self.max_body_bytes)
        return validated(body, model)

    async def _doc(self, owner: str, conversation_id: str) -> dict[str, Any]:
        found = await self.store.conversation(owner, conversation_id)
        if found is None:
            raise not_found("conversation", conversation_id)
        return conversation_doc(conversation_id, *found)

    async def create(self, request: Request) -> dict[str, Any]:
        spec = await self._body(request, ConversationCreate)
        owner = await self._owner(request)
        conversation_id, metadata = new_id("conv"), spec.metadata or {}
        items = input_items(spec.items, "items")
        try:
            created = await guarded(
                self.store.create_conversation(owner, conversation_id, metadata, items)
            )
        except StorageFull as exc:
            raise APIError(400, str(exc), code="storage_quota_exceeded") from None
        return conversation_doc(conversation_id, created, metadata)

    async def retrieve(self, request: Request, conversation_id: str) -> dict[str, Any]:
        return await guarded(self._doc(await self._owner(request), conversation_id))

    async def update(self, request: Request, conversation_id: str) -> dict[str, Any]:
        spec = await self._body(request, ConversationUpdate)
        owner = await self._owner(request)
        if not await guarded(self.store.update_conversation(owner, conversation_id, spec.metadata)):
            raise not_found("conversation", conversation_id)
        return await guarded(self._doc(owner, conversation_id))

    async def delete(self, request: Request, conversation_id: str) -> dict[str, Any]:
        owner = await self._owner(request)
        if not await guarded(self.store.delete_conversation(owner, conversation_id)):
            raise not_found("conversation", conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def list_items(self, request: Request, conversation_id: str) -> dict[str, Any]:
        owner = await self._owner(request)
        items = await guarded(self.store.items(owner, conversation_id))
        if items is None:
            raise not_found("conversation", conversation_id)
        return page(items, request)

    async def add_items(self, request: Request, conversation_id: str) -> dict[str, Any]:
        spec = await self._body(request, ItemsCreate)
        owner = await self._owner(request)
        items = input_items(spec.items, "items")
        try:
            added = await guarded(self.store.add_items(owner, conversation_id, items))
        except StorageFull as exc:
            raise APIError(400, str(exc), code="storage_quota_exceeded") from None
        except ItemConflict as exc:
            raise APIError(400, str(exc), param="items", code="duplicate_item_id") from None
        if not added:
            raise not_found("conversation", conversation_id)
        return {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"],
            "last_id": items[-1]["id"],
            "has_more": False,
        }

    async def item(self, request: Request, conversation_id: str, item_id: str) -> dict[str, Any]:
        owner = await self._owner(request)
        items = await guarded(self.store.items(owner, conversation_id))
        if items is None:
            raise not_found("conversation", conversation_id)
        found = next((i for i in items if i.get("id") == item_id), None)
        if found is None:
            raise not_found("item", item_id)
        return found

    async def delete_item(
        self, request: Request, conversation_id: str, item_id: str
    ) -> dict[str, Any]:
        owner = await self._owner(request)
        doc = await guarded(self._doc(owner, conversation_id))
        if not await guarded(self.store.delete_item(owner, conversation_id, item_id)):
            raise not_found("item", item_id)
        return doc


CONVERSATIONS = ApiFamily(
    ConversationsAPI,
    (
        post("/v1/conversations", ConversationsAPI.create, body=ConversationCreate),
        get("/v1/conversations/{conversation_id}", ConversationsAPI.retrieve),
        post(
            "/v1/conversations/{conversation_id}",
            ConversationsAPI.update,
            body=ConversationUpdate,
        ),
        delete("/v1/conversations/{conversation_id}", ConversationsAPI.delete),
        get("/v1/conversations/{conversation_id}/items", ConversationsAPI.list_items),
        post(
            "/v1/conversations/{conversation_id}/items",
            ConversationsAPI.add_items,
            body=ItemsCreate,
        ),
        get("/v1/conversations/{conversation_id}/items/{item_id}", ConversationsAPI.item),
        delete("/v1/conversations/{conversation_id}/items/{item_id}", ConversationsAPI.delete_item),
    ),
)
