"""The gateway's Protocols (`gateway/protocol.py`) in-process: the request path over the
real per-key limits, and the reasoning memory and sign-ins over their real classes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from serve_app.cli import app_args
from serve_app.config import load_config
from serve_app.gateway.actor import plan_limits
from serve_app.gateway.console_signins import SignIns
from serve_app.gateway.leases import LeaseBook
from serve_app.gateway.limits import KeyState
from serve_app.gateway.protocol import (
    Admission,
    Ask,
    Caller,
    Denial,
    GatewayUnavailable,
    KeyOverrides,
    Lease,
    Renewal,
    UsageRecord,
)
from serve_app.gateway.throttle import Throttle
from serve_app.reasoning.memory import ReasoningMemory

CFG = load_config(app_args(Path(__file__).resolve().parents[2] / "serve_config.yaml"))
KEY = "sk-kimi-abcdefghijkl-" + "s" * 24


class FakeGateway:
    """The gateway's request path over the real per-key limits."""

    def __init__(self, plan: str = "enterprise", **overrides: Any) -> None:
        self.caller = Caller("abcdefghijkl", plan, KeyOverrides(**overrides))
        self.state = KeyState(plan_limits(CFG.plans[plan], self.caller.overrides))
        self.tickets: dict[str, int] = {}
        self.records: list[UsageRecord] = []
        self.down: set[str] = set()  # calls that find the gateway away (restarting)
        self.sessions: list[str | None] = []  # the session each admission named
        self.asks: list[Ask] = []
        self.max_output: int | None = None  # what admissions lower the output limit to
        self.leases = LeaseBook()  # the real book: `lapsed()` settles a lost router's

    def _away(self, call: str) -> None:
        if call in self.down:
            raise GatewayUnavailable("the gateway did not answer")

    async def authenticate(self, key: str) -> Caller | Denial:
        self._away("authenticate")
        return self.caller if key == KEY else Denial(401, "invalid_api_key", "no such key")

    async def admit(
        self, caller: Caller, ask: Ask, ticket: str, lease: Lease | None = None
    ) -> Admission | Denial:
        self._away("admit")
        self.sessions.append(ask.session)
        self.asks.append(ask)
        denial = self.state.check(ask.tokens, ask.cost, time.time())
        if denial is not None:
            return denial
        self.state.admit(ask.tokens, time.time())
        self.tickets[ticket] = ask.tokens
        if lease is not None:
            self.leases.open(ticket, lease)
        return Admission(ticket, {}, self.max_output)

    async def settle(self, ticket: str, record: UsageRecord | None) -> None:
        self._away("settle")
        self.leases.close(ticket)
        est = self.tickets.pop(ticket)
        tokens = record.prompt_tokens + record.completion_tokens if record else 0
        self.state.settle(est, tokens, record.cost_usd if record else 0.0, time.time())
        if record is not None:
            self.records.append(record)

    async def renew(self, renewal: Renewal) -> list[str]:
        self._away("renew")
        return self.leases.renew(renewal, ())


class InMemoryReasoning:
    """`ReasoningKeeper` over the gateway's own `ReasoningMemory`."""

    def __init__(self) -> None:
        self.memory = ReasoningMemory()

    async def remember(self, key_id: str, turn: str, reasoning: str) -> None:
        self.memory.remember(key_id, turn, reasoning)

    async def recall(self, key_id: str, turns: list[str]) -> dict[str, str]:
        return self.memory.recall(key_id, turns)


class InMemoryGuard:
    """`Guard` over the gateway's own `Throttle`."""

    def __init__(self) -> None:
        self.throttle = Throttle()

    async def wait(self, scope: str, address: str) -> float:
        return self.throttle.wait(scope, address)

    async def failed(self, scope: str, address: str) -> float:
        return self.throttle.failed(scope, address)


class InMemorySignIns:
    """`SignIns` over the gateway's own `SignIns`."""

    def __init__(self) -> None:
        self.signins = SignIns()

    async def open(self, subject: str, ttl_s: float) -> str:
        return self.signins.open(subject, ttl_s)

    async def subject(self, token: str) -> str | None:
        return self.signins.subject(token)

    async def close(self, token: str) -> None:
        self.signins.close(token)
