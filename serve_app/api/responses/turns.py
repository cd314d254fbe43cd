"""One Responses turn from its answer to its storing: the chat stream written as the
response's events, and the response kept where later turns find it. Shared by the
foreground requests (`routes.py`) and the background runs (`background.py`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from serve_app.actors import ActorUnavailable
from serve_app.api.common.sse import DONE, sse_payloads, stream_error_status
from serve_app.api.responses.protocol import ResponsesRequest
from serve_app.api.responses.writer import ResponseWriter
from serve_app.gateway.protocol import Caller
from serve_app.pipeline.request import Streamed
from serve_app.store.protocol import ItemConflict, StorageFull, Store, StoredResponse, StoreFailed

log = logging.getLogger("serve_app.api.responses.turns")
# The codes a Response's `error` may carry, by the HTTP status of what failed.
FAILURE_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}


@dataclass
class Turn:
    """One response request's state in this adapter, from its history to its storing."""

    req: ResponsesRequest
    caller: Caller
    items: list[dict[str, Any]]  # this request's input items, with ids
    session: str | None
    doc: dict[str, Any]  # the Response object being written

    @property
    def owner(self) -> str:
        return self.caller.key_id


class Turns:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def written(
        self, stream: Streamed, writer: ResponseWriter, turn: Turn
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The stream's chunks written as the response's events; the response is stored
        before its last event goes out, so a client that heard the end finds it."""
        async for text in stream.events:
            out: list[dict[str, Any]] = []
            for chunk in sse_payloads(text):
                if chunk == DONE or not isinstance(chunk, dict) or writer.ended:
                    continue
                error = chunk.get("error")
                if isinstance(error, dict):
                    code = FAILURE_CODES.get(stream_error_status(error), "server_error")
                    out += writer.fail(code, str(error.get("message", "")))
                    await self.save(turn, {})
                else:
                    out += writer.chunk(chunk)
            if out:
                yield out
        if not writer.ended:
            final = writer.finish()
            await self.save(turn, {})
            yield final

    async def save(self, turn: Turn, headers: dict[str, str]) -> None:
        """Keep the turn where later ones find it: the response (when `store`), and its
        items in its conversation. A store that cannot take it leaves the answer as it
        is, said in the answer (`store: false`) and a header."""
        req, doc = turn.req, turn.doc
        try:
            if req.conversation_id:
                added = await self.store.add_items(
                    turn.owner, req.conversation_id, [*turn.items, *doc["output"]]
                )
                if not added:
                    raise StorageFull("the conversation was deleted meanwhile")
            if req.store:
                stored = StoredResponse(doc["id"], turn.session, doc, turn.items)
                await self.store.put_response(turn.owner, stored, req.previous_response_id)
        except (StorageFull, StoreFailed, ItemConflict, ActorUnavailable) as exc:
            log.warning("response %s not stored: %s", doc["id"], exc)
            doc["store"] = False
            headers["x-kimi-not-stored"] = str(exc)[:200]
