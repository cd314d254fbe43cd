"""Background responses (`background: true`): answered at once as `queued`, run in this
router replica apart from any client connection, stored when they end.

A run gives a sign of life to the store every `HEARTBEAT_S` and hears its cancellation
in the answer; its engine stream is closed (the request settled with what it used). A
replica that dies takes its runs with it: the store marks them failed once they have
been silent for `session_store.RUN_LOST_S`, so none stays `in_progress` for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from serve_app.actors import ActorUnavailable
from serve_app.api.responses.turns import FAILURE_CODES, Turn, Turns
from serve_app.api.responses.writer import ResponseWriter
from serve_app.errors import APIError
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Inbound, RequestContext, Streamed
from serve_app.store.protocol import Store, StoredResponse

log = logging.getLogger("serve_app.api.responses.background")
HEARTBEAT_S = 1.0
ENDED = ("completed", "failed", "cancelled", "incomplete")


class Runs:
    def __init__(self, pipeline: Pipeline, store: Store, turns: Turns) -> None:
        self.pipeline = pipeline
        self.store = store
        self.turns = turns
        self.tasks: set[asyncio.Task[None]] = set()  # held, or the loop may drop them

    async def start(self, inbound: Inbound, writer: ResponseWriter, turn: Turn) -> dict:
        """Admit the request (a key over its limits is refused here, as in the
        foreground), store the response as queued and start its run; the queued
        response."""
        admitted = await self.pipeline.admit(inbound)
        writer.doc["status"] = "queued"
        stored = StoredResponse(writer.doc["id"], turn.session, writer.doc, turn.items)
        try:
            await self.store.put_response(turn.owner, stored, turn.req.previous_response_id)
        except BaseException:
            await asyncio.shield(self.pipeline.withdraw(admitted, 503, "not stored"))
            raise
        queued = {**writer.doc, "output": []}  # before the run starts writing into it
        task = asyncio.create_task(self._run(admitted, writer, turn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return queued

    async def _run(self, admitted: RequestContext, writer: ResponseWriter, turn: Turn) -> None:
        consume = asyncio.ensure_future(self._consume(admitted, writer, turn))
        try:
            while not consume.done():
                await asyncio.wait({consume}, timeout=HEARTBEAT_S)
                if consume.done() or not await self._cancelled(turn):
                    continue
                consume.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consume
                writer.cancel()
                await self.turns.save(turn, {})
                break
            else:
                consume.result()
        except Exception:
            log.exception("background response %s failed", writer.doc["id"])
            writer.fail("server_error", "internal error; the response was not completed")
            await self.turns.save(turn, {})
        # cancelled before its run began, the request was never served: its record says so
        await self.pipeline.withdraw(admitted, 499, "cancelled before it ran")
        await self._announce(turn)

    async def _announce(self, turn: Turn) -> None:
        """The response's end, to the key's webhook endpoints that take it."""
        status = turn.doc["status"]
        if status not in ENDED:
            return
        event_id = f"evt_{uuid.uuid4().hex}"  # made once: a retried call adds it once
        try:
            await self.store.emit_event(turn.owner, event_id, f"response.{status}", turn.doc["id"])
        except ActorUnavailable:
            log.error("webhook event %s of %s lost: the store is away", event_id, turn.doc["id"])

    async def _cancelled(self, turn: Turn) -> bool:
        try:
            status = await self.store.touch(turn.owner, turn.doc["id"])
        except ActorUnavailable:
            return False  # the store is restarting: the run goes on
        return status in ("cancelled", None)  # None: deleted meanwhile

    async def _consume(self, admitted: RequestContext, writer: ResponseWriter, turn: Turn) -> None:
        try:
            result = await self.pipeline.serve_admitted(admitted)
        except APIError as exc:
            writer.fail(FAILURE_CODES.get(exc.status, "server_error"), exc.message)
            await self.turns.save(turn, {})
            return
        assert isinstance(result, Streamed)
        writer.served(result.headers)
        result.started()
        try:
            writer.start()
            await self.turns.save(turn, {})  # in_progress
            async for _ in self.turns.written(result, writer, turn):
                pass
        finally:
            await result.close()
