"""The gateway actor's calls, awaited: the clients the ingress builds and hands on as the
Protocols of `gateway/protocol.py`. While the actor restarts, calls wait
(`actors.ActorCalls`)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from ray.util import metrics

from serve_app.actors import ActorCalls, detached_actor
from serve_app.gateway.actor import ACTOR_NAME, GatewayState
from serve_app.gateway.protocol import (
    Admission,
    Ask,
    Caller,
    Denial,
    KeyAccount,
    KeyInfo,
    Lease,
    NewKey,
    Renewal,
    StorageFault,
    UsageRecord,
    UsageRecounting,
)

T = TypeVar("T")


def unless_fault(value: T | StorageFault) -> T:
    if isinstance(value, StorageFault):
        raise value
    return value


def refused(value: T | ValueError) -> T:
    """The gateway's refusal of an admin change (a value, so it is told apart from the
    actor being away), raised here."""
    if isinstance(value, ValueError):
        raise value
    return value


class GatewayClient:
    """`Gateway` and `GatewayAdmin`. (A `create_key` retried after the actor died
    answering makes a second key; the first was never shown to anyone.)"""

    def __init__(self, calls: ActorCalls) -> None:
        self._call = calls

    def configure(self, plans: dict[str, dict]) -> None:
        """The plans of this deployment (a redeploy may change them); not awaited."""
        self._call.actor.configure.remote(plans)

    async def authenticate(self, key: str) -> Caller | Denial:
        return await self._call(lambda a: a.authenticate.remote(key))

    async def admit(
        self, caller: Caller, ask: Ask, ticket: str, lease: Lease | None = None
    ) -> Admission | Denial:
        return await self._call(lambda a: a.admit.remote(caller, ask, ticket, lease))

    async def settle(self, ticket: str, record: UsageRecord | None) -> None:
        await self._call(lambda a: a.settle.remote(ticket, record))

    async def renew(self, renewal: Renewal) -> list[str]:
        return await self._call(lambda a: a.renew.remote(renewal))

    async def create_key(self, spec: NewKey) -> tuple[str, KeyInfo]:
        return unless_fault(refused(await self._call(lambda a: a.create_key.remote(spec))))

    async def list_keys(self) -> list[KeyInfo]:
        return unless_fault(await self._call(lambda a: a.list_keys.remote()))

    async def revoke_key(self, key_id: str) -> bool:
        return unless_fault(await self._call(lambda a: a.revoke_key.remote(key_id)))

    async def update_key(
        self, key_id: str, plan: str | None, overrides: dict | None
    ) -> KeyInfo | None:
        made = await self._call(lambda a: a.update_key.remote(key_id, plan, overrides))
        return unless_fault(refused(made))

    async def key_account(self, key_id: str) -> KeyAccount | None:
        return unless_fault(await self._call(lambda a: a.key_account.remote(key_id)))

    async def health(self) -> str | None:
        """Why the state dir cannot be written, if it cannot."""
        return await self._call(lambda a: a.health.remote())

    async def flush(self) -> str | None:
        return await self._call(lambda a: a.flush.remote())

    async def usage(self, key_id: str | None, by: list[str]) -> list[dict] | str | UsageRecounting:
        return await self._call(lambda a: a.usage.remote(key_id, by))

    async def recent(self, key_id: str | None, limit: int) -> list[dict]:
        return await self._call(lambda a: a.recent.remote(key_id, limit))


class SignInsClient:
    """`SignIns`, kept by the gateway actor."""

    def __init__(self, calls: ActorCalls) -> None:
        self._call = calls

    async def open(self, subject: str, ttl_s: float) -> str:
        return unless_fault(await self._call(lambda a: a.open_signin.remote(subject, ttl_s)))

    async def subject(self, token: str) -> str | None:
        return unless_fault(await self._call(lambda a: a.signin_subject.remote(token)))

    async def close(self, token: str) -> None:
        unless_fault(await self._call(lambda a: a.close_signin.remote(token)))


class GuardClient:
    """`Guard`, kept by the gateway actor."""

    def __init__(self, calls: ActorCalls) -> None:
        self._call = calls

    async def wait(self, scope: str, address: str) -> float:
        return await self._call(lambda a: a.attempt_wait.remote(scope, address))

    async def failed(self, scope: str, address: str) -> float:
        return await self._call(lambda a: a.attempt_failed.remote(scope, address))


class ReasoningClient:
    """`ReasoningKeeper`, kept by the gateway actor."""

    def __init__(self, calls: ActorCalls) -> None:
        self._call = calls

    async def remember(self, key_id: str, turn: str, reasoning: str) -> None:
        await self._call(lambda a: a.remember_reasoning.remote(key_id, turn, reasoning))

    async def recall(self, key_id: str, turns: list[str]) -> dict[str, str]:
        return await self._call(lambda a: a.recall_reasoning.remote(key_id, turns))


def connect_gateway(
    root: Path,
    plans: dict[str, dict],
    batch_size: int,
    flush_interval_s: float,
    wait_s: float,
) -> ActorCalls:
    """Calls to the cluster's gateway actor, created by the first ingress replica that
    asks (and again by any that finds it gone for good), told this deployment's plans."""
    connect = detached_actor(
        GatewayState, ACTOR_NAME, str(root), plans, batch_size, flush_interval_s
    )
    retried = metrics.Counter(
        "kimi_gateway_retries", "gateway calls retried while the gateway actor was away"
    )
    calls = ActorCalls(connect, "gateway", wait_s, retried)
    calls.actor.configure.remote(plans)
    return calls
