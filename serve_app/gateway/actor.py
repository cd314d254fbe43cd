"""The gateway's shared state: one Ray actor for the whole cluster.

Every ingress replica, on every node, authenticates, admits and settles through this one
actor, so rate limits, concurrency caps and budgets hold across replicas rather than per
process. It owns the key store (SQLite) and the usage meter (write-ahead log + Parquet)
in the state directory. Ray restarts it if it dies; keys, monthly totals and metered
records are on disk, so only the in-memory rate buckets start afresh (full).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import ray
from pydantic import ValidationError
from ray.util import metrics

from deployments.protocol import Endpoint
from serve_app.config import Plan
from serve_app.gateway.console_signins import SignIns
from serve_app.gateway.keys import KeyStore, UsageRow
from serve_app.gateway.leases import LOST, Lease, LeaseBook, Renewal
from serve_app.gateway.limits import (
    Ask,
    KeyState,
    Limits,
    SessionHold,
    session_grant,
)
from serve_app.gateway.protocol import (
    Admission,
    Caller,
    Denial,
    KeyAccount,
    KeyInfo,
    KeyOverrides,
    NewKey,
    StorageFault,
    UsageRecounting,
)
from serve_app.gateway.query_share import QueryShare
from serve_app.gateway.throttle import Throttle
from serve_app.gateway.usage_log import MeterWriter
from serve_app.gateway.usage_query import recent_usage, usage_summary
from serve_app.gateway.usage_records import UsageRecord
from serve_app.gateway.usage_rollups import Recounting
from serve_app.reasoning.memory import ReasoningMemory
from serve_app.state_claim import StateClaim

ACTOR_NAME = "kimi-gateway"
log = logging.getLogger("serve_app.gateway.actor")
BUSY_S = 1.0  # a gateway that admitted a request this recently is busy: queries give way
LEASE_CHECK_S = 1.0  # how often the leases are checked (a pause much longer is the gateway's)
SETTLED_KEPT = 100_000  # tickets remembered as settled, so a retried settlement is no-op


def month_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def plan_limits(plan: Plan, overrides: KeyOverrides) -> Limits:
    def pick(name: str) -> Any:
        value = getattr(overrides, name)
        return value if value is not None else getattr(plan, name)

    return Limits(
        requests_per_minute=pick("requests_per_minute"),
        tokens_per_minute=pick("tokens_per_minute"),
        max_concurrent=pick("max_concurrent"),
        monthly_token_budget=pick("monthly_token_budget"),
        monthly_spend_usd=pick("monthly_spend_usd"),
        max_session_tokens=pick("max_session_tokens"),
        max_session_spend_usd=pick("max_session_spend_usd"),
        max_concurrent_per_session=pick("max_concurrent_per_session"),
    )


@dataclass(frozen=True)
class Admitted:
    """An admission not yet settled: what it charged and what its session holds."""

    key_id: str
    est_tokens: int
    max_output: int | None
    session: tuple[str, str] | None
    hold: SessionHold | None


class GatewayMetrics:
    """The gateway's own metrics (Ray's metrics API: exported with the cluster's)."""

    def __init__(self) -> None:
        self.guessing = metrics.Counter(
            "kimi_credential_failures",
            "failed admin-credential and console sign-in attempts",
            tag_keys=("scope",),
        )
        self.guessing_refused = metrics.Counter(
            "kimi_credential_throttled",
            "credential attempts refused unchecked (429) while their address waits",
            tag_keys=("scope",),
        )
        self.lapsed = metrics.Counter(
            "kimi_leases_lapsed",
            "requests settled by the gateway because the router serving them was lost",
        )
        self.duplicates = metrics.Counter(
            "kimi_usage_duplicates_removed", "usage records found twice and dropped by compaction"
        )
        self.degraded = metrics.Gauge(
            "kimi_storage_degraded", "1 while the state dir cannot be written (503s)"
        )


# Hot control-plane calls: no Ray task event kept for each (as Serve does for its own
# actors); with them GCS grew ~3 KB a call (benchmarks/task_events.py).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, enable_task_events=False)
class GatewayState:
    def __init__(
        self, root: str, plans: dict[str, dict], batch_size: int, flush_interval_s: float
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.claim = StateClaim(self.root, "gateway")  # before the log's recovery writes
        self.keys = KeyStore(self.root / "keys.db")
        self.meter = MeterWriter(self.root / "usage", batch_size=batch_size)
        self.flush_interval_s = flush_interval_s
        self.plans = {name: Plan.model_validate(p) for name, p in plans.items()}
        self.states: dict[str, KeyState] = {}
        self.signins = SignIns(self.root / "signins.db")
        self.reasoning = ReasoningMemory()
        self.tickets: dict[str, Admitted] = {}
        # per (key id, session): what its requests in flight may still cost at most
        self.holds: dict[tuple[str, str], SessionHold] = {}
        self.settled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.leases = LeaseBook()
        self.throttle = Throttle()
        # a crowd of usage queries cannot starve admissions (while there are any)
        self.admitted_at = 0.0
        self.queries = QueryShare(busy=lambda: time.monotonic() - self.admitted_at < BUSY_S)
        self.metrics = GatewayMetrics()
        self._loops: list[asyncio.Task[None]] = []
        # settlements waiting for their records to be written, and the task writing them
        self._waiting: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None
        # budget totals not yet in the key store (it failed), and why
        self.totals: collections.deque[UsageRow] = collections.deque()
        self.totals_fault: str | None = None
        lost_rows = self.keys.salvaged[1] if self.keys.salvaged else 0
        if quarantined := self.meter.quarantined + lost_rows:
            metrics.Counter(
                "kimi_state_quarantined", "damaged records and files set aside at start"
            ).inc(quarantined)

    def configure(self, plans: dict[str, dict]) -> None:
        """A redeploy may change plans; buckets keep their levels where limits stay."""
        self.plans = {name: Plan.model_validate(p) for name, p in plans.items()}

    def _start_flusher(self) -> None:
        if not self._loops:
            loop = asyncio.get_running_loop()
            self._loops = [
                loop.create_task(self._flush_loop()),
                loop.create_task(self._lease_loop()),
            ]

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            await self._settle_lapsed()

    async def _flush_loop(self) -> None:
        while True:
            # a failing disk is retried every second: recovery is automatic and quick
            await asyncio.sleep(1.0 if self.fault else self.flush_interval_s)
            self.claim.check()
            self.meter.heal()
            self._write_totals()
            self.metrics.degraded.set(1 if self.fault else 0)
            self.meter.flush()
            try:
                if dropped := self.meter.compact():
                    self.metrics.duplicates.inc(dropped)
            except Exception:  # the parts stay as they are; compaction is tried again
                log.exception("compacting the usage dataset failed")

    # ---- request path ----------------------------------------------------------------

    async def authenticate(self, key: str) -> Caller | Denial:
        self._start_flusher()
        info = self.keys.verify(key)
        if info is None:
            return Denial(401, "invalid_api_key", "Incorrect API key provided")
        now = time.time()
        if info.revoked_at is not None:
            return Denial(401, "invalid_api_key", "This API key has been revoked")
        if not info.usable(now):
            return Denial(401, "invalid_api_key", "This API key has expired")
        if info.plan not in self.plans:
            return Denial(403, "plan_unavailable", f"Plan '{info.plan}' no longer exists")
        return Caller(info.key_id, info.plan, info.overrides)

    def _state(self, caller: Caller, now: float) -> KeyState:
        limits = plan_limits(self.plans[caller.plan], caller.overrides)
        state = self.states.get(caller.key_id)
        if state is None:
            state = self.states[caller.key_id] = KeyState(limits)
        else:
            state.apply(limits)
        month = month_of(now)
        if state.month != month:
            state.roll_month(month)
            state.month_tokens, state.month_spend = self.keys.month_usage(caller.key_id, month)
        return state

    async def admit(
        self, caller: Caller, ask: Ask, ticket: str, lease: Lease | None = None
    ) -> Admission | Denial:
        """Admit one request under `ticket` (the caller's; asked again, the same
        admission, so a retried call admits once), leased to its router if `lease`."""
        self._start_flusher()
        self.claim.check()
        now = time.time()
        state = self._state(caller, now)
        if (admitted := self.tickets.get(ticket)) is not None:
            return Admission(ticket, state.headers(now), admitted.max_output)
        if self.fault is not None:
            return Denial(
                503,
                "storage_unavailable",
                f"{self.fault}; retry shortly",
                retry_after_s=5,
            )
        granted = self._session_grant(caller, state.limits, ask)
        denial = granted if isinstance(granted, Denial) else state.check(ask.tokens, ask.cost, now)
        if denial is not None:  # a refusal says what is left too, as an answer does
            return dataclasses.replace(denial, headers=state.headers(now))
        assert not isinstance(granted, Denial)
        state.admit(ask.tokens, now)
        max_output, hold = granted
        session = None
        if hold is not None and ask.session is not None:
            session = (caller.key_id, ask.session)
            self.holds.setdefault(session, SessionHold()).add(hold)
        self.tickets[ticket] = Admitted(caller.key_id, ask.tokens, max_output, session, hold)
        self.admitted_at = time.monotonic()
        if lease is not None:
            self.leases.open(ticket, lease)
        return Admission(ticket, state.headers(now), max_output)

    def _session_grant(
        self, caller: Caller, limits: Limits, ask: Ask
    ) -> Denial | tuple[int | None, SessionHold | None]:
        """For a capped session: the output limit it is lowered to and what it holds."""
        if ask.session is None or not limits.caps_sessions:
            return None, None
        used = self.keys.session_usage(caller.key_id, ask.session)
        held = self.holds.get((caller.key_id, ask.session), SessionHold())
        return session_grant(limits, *used, held, ask)

    async def settle(self, ticket: str, record: UsageRecord | None) -> None:
        """Close an admission: real tokens replace the estimate; the record is metered
        (durably, before this returns). `record=None` releases without metering. A
        ticket settled already is not settled again (a retried call meters once)."""
        if ticket in self.settled:
            return
        self.claim.check()
        if record is not None and (record.request_id, record.time) in self.meter.recovered:
            return  # the previous gateway process metered it, then died before answering
        self.settled[ticket] = None
        self.leases.close(ticket)
        if len(self.settled) > SETTLED_KEPT:
            self.settled.popitem(last=False)
        admitted = self.tickets.pop(ticket, None)
        now = time.time()
        # a prompt counted (count_tokens) is no use of the model, and a request whose
        # client got an error is not charged: no budget spent
        used = record is not None and record.endpoint != Endpoint.TOKENIZE and record.billed
        tokens = record.prompt_tokens + record.completion_tokens if used else 0
        cost = record.cost_usd if record else 0.0
        if admitted is not None and admitted.key_id in self.states:
            self.states[admitted.key_id].settle(admitted.est_tokens, tokens, cost, now)
        try:
            if record is not None:
                self.meter.add(record)  # written below; held in memory while the disk fails
                if tokens or cost:
                    month = month_of(record.time)
                    self.totals.append((record.key_id, month, tokens, cost, record.session_id))
                await self._persisted()
        finally:
            # held until what it used is in the session's total, never neither
            if admitted is not None:
                self._release(admitted)

    async def renew(self, renewal: Renewal) -> list[str]:
        """A router's open requests renewed; those to send again (`LeaseBook.renew`)."""
        self._start_flusher()
        return self.leases.renew(renewal, self.settled)

    async def _settle_lapsed(self) -> None:
        self.claim.check()
        for ticket, record in self.leases.lapsed():
            log.warning("settling %s: %s", record.request_id, LOST)
            self.metrics.lapsed.inc()
            try:
                await self.settle(ticket, record)
            except Exception:  # the next record is still settled; this one is logged
                log.exception("settling %s of a lost router failed", record.request_id)

    def _release(self, admitted: Admitted) -> None:
        if admitted.session is None or admitted.hold is None:
            return
        held = self.holds.get(admitted.session)
        if held is not None:
            held.add(admitted.hold, -1)
            if held.empty:
                del self.holds[admitted.session]

    async def _persisted(self) -> None:
        """Return once what is queued now is on disk (or held, the disk failing): one
        writer writes for every settlement waiting at once (group commit: one fsync of
        the usage log and one key-store commit for all of them), so the gateway's
        ceiling of metered requests a second grows with the load instead of being one
        request per two fsyncs."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        await asyncio.shield(done)

    async def _write_waiting(self) -> None:
        while self._waiting:
            await asyncio.sleep(0)  # settlements that came in meanwhile join this write
            batch, self._waiting = self._waiting, []
            try:
                self.meter.heal()  # a disk that fails: held and retried, not raised
                self._write_totals()
            except Exception as exc:  # anything else is the waiting settlements' error
                for done in batch:
                    done.set_exception(exc)
                continue
            for done in batch:
                done.set_result(None)

    def _write_totals(self) -> None:
        """Budget totals into the key store in one transaction, or kept (it failed)."""
        if self.totals:
            try:
                self.keys.add_usages(list(self.totals))
            except sqlite3.Error as exc:
                self.totals_fault = str(exc)
                return
            self.totals.clear()
        self.totals_fault = None

    @property
    def fault(self) -> str | None:
        """Why the state dir cannot be written now, if it cannot."""
        if cause := self.meter.fault or self.totals_fault:
            return f"the usage store cannot be written ({cause})"
        return None

    def health(self) -> str | None:
        return self.fault

    def node(self) -> str:
        """The node this actor runs on (it moves when its node is lost)."""
        return ray.get_runtime_context().get_node_id()

    # ---- admin -----------------------------------------------------------------------

    def _written(self, call: Callable[[], T]) -> T | StorageFault:
        """A change to the key or sign-in store, made only while this process holds the
        state dir's claim."""
        self.claim.check()
        return stored(call)

    def create_key(self, spec: NewKey) -> tuple[str, KeyInfo] | StorageFault | ValueError:
        """The key and its record; a refusal (unknown plan, bad overrides) or a storage
        fault as a value, so a caller tells them from the actor being away."""
        if spec.plan not in self.plans:
            return ValueError(f"unknown plan {spec.plan!r}; plans: {sorted(self.plans)}")
        try:
            overrides = KeyOverrides.model_validate(spec.overrides)
        except ValidationError as exc:
            return ValueError(str(exc))
        return self._written(
            lambda: self.keys.create(
                spec.plan, spec.name, overrides, spec.metadata, spec.expires_at
            )
        )

    def list_keys(self) -> list[KeyInfo] | StorageFault:
        return stored(self.keys.list)

    def revoke_key(self, key_id: str) -> bool | StorageFault:
        ended = self._written(lambda: self.signins.end_subject(key_id))
        if isinstance(ended, StorageFault):
            return ended
        self.reasoning.forget(key_id)
        return self._written(lambda: self.keys.revoke(key_id))

    def update_key(
        self, key_id: str, plan: str | None, overrides: dict | None
    ) -> KeyInfo | StorageFault | ValueError | None:
        """A key's new plan or overrides; None if there is no active key of that id."""
        if plan is not None and plan not in self.plans:
            return ValueError(f"unknown plan {plan!r}; plans: {sorted(self.plans)}")
        try:
            checked = None if overrides is None else KeyOverrides.model_validate(overrides)
        except ValidationError as exc:
            return ValueError(str(exc))
        return self._written(lambda: self.keys.update(key_id, plan, checked))

    def key_account(self, key_id: str) -> KeyAccount | StorageFault | None:
        """A key's record, its limits as its plan and overrides make them, and this month's
        use against its budgets."""
        info = stored(lambda: self.keys.get(key_id))
        if not isinstance(info, KeyInfo):
            return info
        plan = self.plans.get(info.plan)
        month = month_of(time.time())
        used = stored(lambda: self.keys.month_usage(key_id, month))
        if isinstance(used, StorageFault):
            return used
        limits = plan_limits(plan, info.overrides) if plan is not None else None
        return KeyAccount(info=info, limits=limits, month=month, tokens=used[0], spend=used[1])

    async def recent(self, key_id: str | None, limit: int) -> list[dict]:
        return await self.queries.run(
            recent_usage, self.meter.root, key_id, limit, self._unflushed(key_id)
        )

    def _unflushed(self, key_id: str | None) -> list[UsageRecord]:
        return [r for r in self.meter.unflushed if key_id is None or r.key_id == key_id]

    # ---- reasoning memory and console sign-ins (gateway/protocol.py) ----------------

    def remember_reasoning(self, key_id: str, turn: str, reasoning: str) -> None:
        self.reasoning.remember(key_id, turn, reasoning)

    def recall_reasoning(self, key_id: str, turns: list[str]) -> dict[str, str]:
        return self.reasoning.recall(key_id, turns)

    def open_signin(self, subject: str, ttl_s: float) -> str | StorageFault:
        return self._written(lambda: self.signins.open(subject, ttl_s))

    def signin_subject(self, token: str) -> str | StorageFault | None:
        return stored(lambda: self.signins.subject(token))

    def close_signin(self, token: str) -> StorageFault | None:
        return self._written(lambda: self.signins.close(token))

    # ---- credential guessing (gateway/throttle.py) -----------------------------------

    def attempt_wait(self, scope: str, address: str) -> float:
        wait = self.throttle.wait(scope, address)
        if wait:
            self.metrics.guessing_refused.inc(tags={"scope": scope})
        return wait

    def attempt_failed(self, scope: str, address: str) -> float:
        self.metrics.guessing.inc(tags={"scope": scope})
        wait = self.throttle.failed(scope, address)
        if wait:
            log.warning(
                "credential guessing: %s attempts from %s refused for %.0f s", scope, address, wait
            )
        return wait

    def flush(self) -> str | None:
        """Everything settled into Parquet; why not, where the disk fails."""
        self.claim.check()
        self.meter.heal()
        return self.meter.flush() or self.fault

    async def usage(self, key_id: str | None, by: list[str]) -> list[dict] | str | UsageRecounting:
        """Usage grouped by `by` (read off the request path's thread), or why not."""
        # the records not in Parquet yet, by their segment: whichever of them a flush
        # counts while the query waits or reads, the query leaves out
        unflushed = {self.meter.segment: self._unflushed(key_id)}
        try:
            return await self.queries.run(
                usage_summary, self.meter.root, by, key_id, True, unflushed
            )
        except Recounting as exc:
            return UsageRecounting(exc.pending)
        except ValueError as exc:
            return str(exc)

    def close(self) -> None:
        """Flush and close the meter (what stays in the log is recovered on restart)."""
        self.meter.close()
        self.queries.close()


T = TypeVar("T")


def stored(call: Callable[[], T]) -> T | StorageFault:
    """The key store's answer, or its failure as a value the admin API answers 503 to."""
    try:
        return call()
    except sqlite3.Error as exc:
        log.error("the key store failed: %s", exc)
        return StorageFault(f"the key store cannot be written ({exc})")
