"""The gateway's interface: what the pipeline, the adapters and the console may ask of
the cluster's one gateway actor, and the values that cross it. Everything outside
`serve_app/gateway/` reaches the gateway through these Protocols (the ingress builds
their client, `gateway/client.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from serve_app.actors import ActorUnavailable
from serve_app.gateway.keys import KeyInfo, KeyOverrides, NewKey, hash_key, ours, split_key
from serve_app.gateway.leases import LOST, Lease, Progress, Renewal
from serve_app.gateway.limits import Ask, Denial, Limits
from serve_app.gateway.usage_records import RequestLabels, UsageRecord, billable

__all__ = [
    "ANONYMOUS",
    "LOST",
    "OPERATOR",
    "Admission",
    "Ask",
    "Caller",
    "Denial",
    "Gateway",
    "GatewayAdmin",
    "GatewayUnavailable",
    "Guard",
    "KeyAccount",
    "KeyInfo",
    "KeyOverrides",
    "Lease",
    "NewKey",
    "Progress",
    "ReasoningKeeper",
    "Renewal",
    "RequestLabels",
    "SignIns",
    "StorageFault",
    "UsageRecord",
    "billable",
    "hash_key",
    "ours",
    "split_key",
]

OPERATOR = "operator"  # the subject of an operator's console sign-in
ANONYMOUS = "anonymous"  # the key id of requests served without a key
GatewayUnavailable = ActorUnavailable  # the actor is away past the wait: a retryable 503


class StorageFault(Exception):
    """The key store could not be read or written (disk full, read-only, damaged)."""


@dataclass(frozen=True)
class Caller:
    key_id: str
    plan: str
    overrides: KeyOverrides


@dataclass(frozen=True)
class Admission:
    ticket: str
    headers: dict[str, str]
    max_output: int | None = None  # the output limit lowered to fit a session's caps


@dataclass(frozen=True)
class KeyAccount:
    """A key as its holder sees it: record, effective limits, this month's use."""

    info: KeyInfo
    limits: Limits | None  # None if its plan no longer exists
    month: str
    tokens: int
    spend: float


class Gateway(Protocol):
    """The request path: who asks, may it run, what it used. Admission and settlement
    are idempotent by ticket, so a retried call never admits or meters twice. An
    admission with a `Lease` is settled by the gateway from its draft if its router
    stops renewing it (`gateway/leases.py`)."""

    async def authenticate(self, key: str) -> Caller | Denial: ...

    async def admit(
        self, caller: Caller, ask: Ask, ticket: str, lease: Lease | None = None
    ) -> Admission | Denial: ...

    async def settle(self, ticket: str, record: UsageRecord | None) -> None: ...

    async def renew(self, renewal: Renewal) -> list[str]: ...


@dataclass(frozen=True)
class UsageRecounting:
    """Usage totals wait: the sums are being counted again from the records (after an
    upgrade, or where the rollups were lost); `pending` days are left."""

    pending: int


class GatewayAdmin(Gateway, Protocol):
    """Keys, usage and the state dir's health, for the admin API, the console and the
    key holder's own usage. `ValueError` is a refusal (unknown plan, bad overrides),
    `StorageFault` a key store that cannot take the change."""

    async def create_key(self, spec: NewKey) -> tuple[str, KeyInfo]: ...

    async def list_keys(self) -> list[KeyInfo]: ...

    async def revoke_key(self, key_id: str) -> bool: ...

    async def update_key(
        self, key_id: str, plan: str | None, overrides: dict | None
    ) -> KeyInfo | None: ...

    async def key_account(self, key_id: str) -> KeyAccount | None: ...

    async def health(self) -> str | None: ...

    async def flush(self) -> str | None: ...

    async def usage(
        self, key_id: str | None, by: list[str]
    ) -> list[dict] | str | UsageRecounting: ...

    async def recent(self, key_id: str | None, limit: int) -> list[dict]: ...


class SignIns(Protocol):
    """Console sign-ins (`gateway/console_signins.py`), the same on every replica and
    across gateway restarts; `StorageFault` where the state dir cannot be written."""

    async def open(self, subject: str, ttl_s: float) -> str: ...

    async def subject(self, token: str) -> str | None: ...

    async def close(self, token: str) -> None: ...


class Guard(Protocol):
    """Credential guessing slowed (`gateway/throttle.py`), counted the same on every
    replica: how long an attempt from `address` must wait (0: check it now), and a
    failed one counted (the wait it imposes)."""

    async def wait(self, scope: str, address: str) -> float: ...

    async def failed(self, scope: str, address: str) -> float: ...


class ReasoningKeeper(Protocol):
    """The reasoning of a key's tool-calling turns, for clients that drop it from their
    history (`reasoning/memory.py`)."""

    async def remember(self, key_id: str, turn: str, reasoning: str) -> None: ...

    async def recall(self, key_id: str, turns: list[str]) -> dict[str, str]: ...
