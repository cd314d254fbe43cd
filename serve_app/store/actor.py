"""The response store's actor: one for the cluster, beside the gateway, owning
`sessions.db` in the state directory (`responses_db.py`, `webhooks_db.py`). Ray restarts
it if it dies; everything it holds is on disk. It implements `store/protocol.py`'s
`Store` (a refusal comes back as a value, not Ray's error: the client raises it), sweeps
what expired and delivers webhook events (`webhook_delivery.py`)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ray

from serve_app.config import SessionSettings
from serve_app.state_claim import StateClaim
from serve_app.store.protocol import ItemConflict, StorageFull, StoredResponse, StoreFailed
from serve_app.store.responses_db import ItemIdTaken, QuotaExceeded, ResponsesDB, StoreLimits
from serve_app.store.webhook_delivery import Delivery, backoff_s, deliver, new_secret

ACTOR_NAME = "kimi-sessions"  # as the Ray dashboard has always shown it
DELIVERY_POLL_S = 0.5
log = logging.getLogger("serve_app.store.actor")
T = TypeVar("T")
Refusal = StorageFull | StoreFailed | ItemConflict


def limits_of(settings: SessionSettings) -> StoreLimits:
    return StoreLimits(settings.ttl_days * 86400, settings.quota_bytes)


# Hot control-plane calls: no Ray task event kept for each (as Serve does for its own
# actors); with them GCS grew ~3 KB a call (benchmarks/task_events.py).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, enable_task_events=False)
class StoreActor:
    def __init__(self, root: str, settings: SessionSettings, background: bool = True) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        self.claim = StateClaim(Path(root), "store")  # a replaced store writes nothing
        self.db = ResponsesDB(Path(root) / "sessions.db", limits_of(settings))
        self.settings = settings
        self.background = background  # sweep and deliver (off for an in-process store)
        self._loops: list[asyncio.Task[None]] = []

    def configure(self, settings: SessionSettings) -> None:
        self.db.limits = limits_of(settings)
        self.settings = settings

    def _do(self, call: Callable[[], T]) -> T | Refusal:
        """One database call; a refusal or a failing disk as a value."""
        if self.background and not self._loops:  # started in the actor's loop
            loop = asyncio.get_running_loop()
            self._loops = [
                loop.create_task(self._sweep_loop()),
                loop.create_task(self._deliver_loop()),
            ]
        self.claim.check()
        try:
            return call()
        except QuotaExceeded as exc:
            return StorageFull(str(exc))
        except ItemIdTaken as exc:
            return ItemConflict(str(exc))
        except sqlite3.Error as exc:
            log.error("the response store failed: %s", exc)
            return StoreFailed(f"the response store cannot be written ({exc})")

    # ---- Store (store/protocol.py), each method async so `_do` runs in the loop ------

    async def put_response(
        self, owner: str, stored: StoredResponse, previous: str | None
    ) -> Refusal | None:
        return self._do(lambda: self.db.put_response(owner, stored, previous))

    async def get_response(self, owner: str, response_id: str) -> Any:
        return self._do(lambda: self.db.get_response(owner, response_id))

    async def chain(self, owner: str, response_id: str) -> Any:
        return self._do(lambda: self.db.chain(owner, response_id))

    async def touch(self, owner: str, response_id: str) -> Any:
        return self._do(lambda: self.db.touch(owner, response_id))

    async def cancel_response(self, owner: str, response_id: str) -> Any:
        return self._do(lambda: self.db.cancel_response(owner, response_id))

    async def delete_response(self, owner: str, response_id: str) -> Any:
        return self._do(lambda: self.db.delete_response(owner, response_id))

    async def create_conversation(
        self, owner: str, conversation_id: str, metadata: dict, items: list[dict]
    ) -> Any:
        return self._do(
            lambda: self.db.create_conversation(owner, conversation_id, metadata, items)
        )

    async def conversation(self, owner: str, conversation_id: str) -> Any:
        return self._do(lambda: self.db.conversation(owner, conversation_id))

    async def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> Any:
        return self._do(lambda: self.db.update_conversation(owner, conversation_id, metadata))

    async def delete_conversation(self, owner: str, conversation_id: str) -> Any:
        return self._do(lambda: self.db.delete_conversation(owner, conversation_id))

    async def add_items(self, owner: str, conversation_id: str, items: list[dict]) -> Any:
        return self._do(lambda: self.db.add_items(owner, conversation_id, items))

    async def items(
        self,
        owner: str,
        conversation_id: str,
        after: str | None,
        limit: int | None,
        newest_first: bool,
    ) -> Any:
        return self._do(lambda: self.db.items(owner, conversation_id, after, limit, newest_first))

    async def delete_item(self, owner: str, conversation_id: str, item_id: str) -> Any:
        return self._do(lambda: self.db.delete_item(owner, conversation_id, item_id))

    async def delete_owner(self, owner: str) -> Any:
        return self._do(lambda: self.db.delete_owner(owner))

    async def add_webhook(
        self, owner: str, ident: str, name: str, url: str, kinds: list[str]
    ) -> Any:
        secret = new_secret()
        return self._do(lambda: self.db.webhooks.add(owner, ident, name, url, secret, kinds))

    async def list_webhooks(self, owner: str) -> Any:
        return self._do(lambda: self.db.webhooks.list(owner))

    async def get_webhook(self, owner: str, ident: str) -> Any:
        return self._do(lambda: self.db.webhooks.get(owner, ident))

    async def delete_webhook(self, owner: str, ident: str) -> Any:
        return self._do(lambda: self.db.webhooks.delete(owner, ident))

    async def rotate_webhook(self, owner: str, ident: str) -> Any:
        secret = new_secret()
        return self._do(lambda: self.db.webhooks.rotate(owner, ident, secret))

    async def emit_event(self, owner: str, event_id: str, kind: str, response_id: str) -> Any:
        return self._do(lambda: self.db.webhooks.emit(owner, event_id, kind, response_id))

    # ---- background work ---------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        """Webhook deliveries that are due, a batch at a time, until none is."""
        async with httpx.AsyncClient(follow_redirects=False) as client:
            while True:
                self.claim.check()
                try:
                    due = self.db.webhooks.due(time.time())
                    await asyncio.gather(*(self._attempt(client, d) for d in due))
                except Exception:
                    log.exception("delivering webhooks failed")
                    due = []
                await asyncio.sleep(0.05 if due else DELIVERY_POLL_S)

    async def _attempt(self, client: httpx.AsyncClient, d: Delivery) -> None:
        hooks = self.settings.webhooks
        error = await deliver(client, d, hooks)
        retry_at = None
        if error is not None:
            if d.attempts + 1 < hooks.max_attempts:
                retry_at = time.time() + backoff_s(d.attempts + 1, hooks.retry_base_s)
            log.warning("webhook %s to %s failed (%s)", d.event_id, d.endpoint, error)
        self.db.webhooks.attempted(d, error, retry_at)

    async def _sweep_loop(self) -> None:
        while True:
            self.claim.check()
            try:
                if gone := self.db.sweep():
                    log.info("swept %d expired responses and conversations", gone)
                if lost := self.db.reap_lost_runs():
                    log.warning("%d background runs lost with their replicas: failed", lost)
            except Exception:
                log.exception("sweeping the response store failed")
            await asyncio.sleep(self.settings.sweep_interval_s)
