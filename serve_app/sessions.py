"""The session store's actor: one for the cluster, beside the gateway, owning
`sessions.db` in the state directory (`session_store.py`). Ray restarts it if it dies;
everything it holds is on disk. A sweeper deletes what expired."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ray
from ray.util import metrics

from serve_app.actor_calls import ActorCalls
from serve_app.config import SessionSettings
from serve_app.gateway import NAMESPACE
from serve_app.session_store import (
    ItemIdTaken,
    QuotaExceeded,
    SessionStore,
    StoredResponse,
    StoreLimits,
)
from serve_app.webhooks import Delivery, backoff_s, deliver

ACTOR_NAME = "kimi-sessions"
DELIVERY_POLL_S = 0.5
log = logging.getLogger("serve_app.sessions")


class StorageFull(Exception):
    """What a key would store does not fit its quota."""


class StoreFailed(Exception):
    """The store's database could not be read or written (disk full, read-only...)."""


class ItemConflict(Exception):
    """Items whose ids the conversation already holds (the client's error, not the store's)."""


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class SessionState:
    def __init__(self, root: str, settings: SessionSettings) -> None:
        self.store = SessionStore(Path(root) / "sessions.db", limits_of(settings))
        self.settings = settings
        self._loops: list[asyncio.Task[None]] = []

    def configure(self, settings: SessionSettings) -> None:
        self.store.limits = limits_of(settings)
        self.settings = settings

    async def call(self, method: str, *args: Any) -> Any:
        """One store method (`webhooks.add`: one of its webhook store); a quota refusal
        comes back as a value, not Ray's error."""
        if not self._loops:
            loop = asyncio.get_running_loop()
            self._loops = [
                loop.create_task(self._sweep_loop()),
                loop.create_task(self._deliver_loop()),
            ]
        try:
            return functools.reduce(getattr, method.split("."), self.store)(*args)
        except QuotaExceeded as exc:
            return StorageFull(str(exc))
        except ItemIdTaken as exc:
            return ItemConflict(str(exc))
        except sqlite3.Error as exc:
            log.error("the session store failed on %s: %s", method, exc)
            return StoreFailed(f"the response store cannot be written ({exc})")

    async def _deliver_loop(self) -> None:
        """Webhook deliveries that are due, a batch at a time, until none is."""
        async with httpx.AsyncClient(follow_redirects=False) as client:
            while True:
                try:
                    due = self.store.webhooks.due(time.time())
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
        self.store.webhooks.attempted(d, error, retry_at)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                if gone := self.store.sweep():
                    log.info("swept %d expired responses and conversations", gone)
                if lost := self.store.reap_lost_runs():
                    log.warning("%d background runs lost with their replicas: failed", lost)
            except Exception:
                log.exception("sweeping the session store failed")
            await asyncio.sleep(self.settings.sweep_interval_s)


class SessionClient:
    """The store's calls, awaited through the actor's restarts."""

    def __init__(self, connect: Callable[[], Any], wait_s: float) -> None:
        retried = metrics.Counter(
            "kimi_sessions_retries", "session store calls retried while its actor was away"
        )
        self._call = ActorCalls(connect, "session store", wait_s, retried)

    def configure(self, settings: SessionSettings) -> None:
        """This deployment's limits and webhook settings; not awaited."""
        self._call.actor.configure.remote(settings)

    async def _store(self, method: str, *args: Any) -> Any:
        result = await self._call("call", method, *args)
        if isinstance(result, StorageFull | StoreFailed | ItemConflict):
            raise result
        return result

    async def put_response(self, owner: str, stored: StoredResponse, previous: str | None) -> None:
        await self._store("put_response", owner, stored, previous)

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        return await self._store("get_response", owner, response_id)

    async def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        return await self._store("chain", owner, response_id)

    async def touch(self, owner: str, response_id: str) -> str | None:
        return await self._store("touch", owner, response_id)

    async def cancel_response(self, owner: str, response_id: str) -> StoredResponse | None:
        return await self._store("cancel_response", owner, response_id)

    async def delete_response(self, owner: str, response_id: str) -> bool:
        return await self._store("delete_response", owner, response_id)

    async def create_conversation(
        self, owner: str, conversation_id: str, metadata: dict, items: list[dict]
    ) -> float:
        return await self._store("create_conversation", owner, conversation_id, metadata, items)

    async def conversation(self, owner: str, conversation_id: str) -> tuple[float, dict] | None:
        return await self._store("conversation", owner, conversation_id)

    async def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> bool:
        return await self._store("update_conversation", owner, conversation_id, metadata)

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        return await self._store("delete_conversation", owner, conversation_id)

    async def add_items(self, owner: str, conversation_id: str, items: list[dict]) -> bool:
        return await self._store("add_items", owner, conversation_id, items)

    async def items(
        self,
        owner: str,
        conversation_id: str,
        after: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict] | None:
        return await self._store("items", owner, conversation_id, after, limit, newest_first)

    async def delete_item(self, owner: str, conversation_id: str, item_id: str) -> bool:
        return await self._store("delete_item", owner, conversation_id, item_id)

    async def delete_owner(self, owner: str) -> int:
        return await self._store("delete_owner", owner)

    async def webhooks(self, method: str, *args: Any) -> Any:
        """A webhook store method (`serve_app/webhook_store.py`)."""
        return await self._store(f"webhooks.{method}", *args)


def limits_of(settings: SessionSettings) -> StoreLimits:
    return StoreLimits(settings.ttl_days * 86400, settings.quota_bytes)


def connect_sessions(root: Path, settings: SessionSettings, wait_s: float) -> SessionClient:
    """The cluster's session store actor, created by the first ingress replica that asks
    (and again by any that finds it gone for good)."""

    def connect() -> Any:
        return SessionState.options(  # type: ignore[attr-defined]
            name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(str(root), settings)

    client = SessionClient(connect, wait_s)
    client.configure(settings)
    return client
