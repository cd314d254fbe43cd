"""Weighted fair share in front of one tier: requests wait in the ingress replica, not in
the engine's first-come queue, whenever the tier already has `bound` of them in flight;
the next to go is the one whose owner has been served least.

Order is the Virtual Token Counter's (Sheng et al., OSDI 2024), made hierarchical: every
key has a counter of the tokens it was served divided by its plan's weight (prompt tokens
when a request goes, twice its output tokens when it ends); within a key every session
(a swarm's sub-agents share one) has its own. The next request is the oldest of the
least-served session of the least-served key that is waiting. A key or session that
comes back after being idle is lifted to the least counter among those active, so idle
time is not banked as credit. A lone key is never held while the tier has room
(work-conserving). The bound is the tier's whole capacity while only one key is active;
while several are, a request goes only while fewer than `shared_bound` are in flight,
unless its key has fewer in flight than its share of that (`shared_bound` split over
the active keys by weight): so a newcomer goes at once, and a swarm's batch shrinks to
the shared bound as its requests end, which is what another key's time to first token
follows. Past its share, a
key also leaves one place free for every other active key with nothing in flight here
(up to half the shared bound), so an interactive key's next request finds
room at once instead of waiting for a swarm's request to end. Within a key the same rules
hold one level down: while several of its sessions are active, a session past its part of
the key's shared places keeps the key's batch to them, less one place for every other
active session of the key with nothing in flight, so a chat beside the same key's swarm
is neither queued behind it nor slowed by its whole batch. Keys and sessions active at the other
routers (the load board says which) count as active here too.

Pure asyncio, one instance per tier per ingress replica (docs/routing.md argues the
bound this gives across replicas).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
from dataclasses import dataclass, field

ACTIVE_S = 10.0  # a key that asked this recently is active (see `FairQueue.active`)
SERVICE_TAU_S = 10.0  # the recent service a fairness index compares decays this fast


class QueueTimeout(Exception):
    """A request waited as long as it may (its plan's time limit, or the queue's)."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"waited {waited_s:.1f} s for the tier")
        self.waited_s = waited_s


class QueueFull(Exception):
    """The tier's queue here is full, and the request's key already holds its part of
    it: the key is over its share, so it is the one told to back off."""

    def __init__(self, waiting: int, part: int) -> None:
        super().__init__(f"{waiting} of this key's requests wait; its part of the queue is {part}")
        self.waiting = waiting
        self.part = part


@dataclass
class Waiter:
    key: str
    session: str
    tokens: int  # the prompt's estimate, charged when it goes
    weight: float
    order: int  # arrival order: first come first, among equals
    done: asyncio.Future[None]
    band: str = "default"  # its service tier, for the figures


@dataclass
class Slot:
    """A request in flight through the gate; `close(output_tokens)` once it ends."""

    gate: FairQueue
    key: str
    session: str
    weight: float
    waited_s: float
    closed: bool = False

    def close(self, output_tokens: int = 0) -> None:
        if not self.closed:
            self.closed = True
            self.gate.release(self, output_tokens)


@dataclass
class Counters:
    """Service per owner, and who is active (waiting or in flight)."""

    served: dict[str, float] = field(default_factory=dict)
    active: collections.Counter[str] = field(default_factory=collections.Counter)

    def arrive(self, owner: str) -> None:
        """An owner's request arrives; an owner idle until now is lifted to the least
        counter among the active ones (or kept where it was, if that is more)."""
        if self.active[owner] == 0:
            floor = min((self.served[o] for o in self.active if self.active[o]), default=0.0)
            self.served[owner] = max(self.served.get(owner, 0.0), floor)
        self.active[owner] += 1

    def leave(self, owner: str) -> None:
        self.active[owner] -= 1
        if self.active[owner] <= 0:
            del self.active[owner]
            # an owner at or below the active floor would be lifted to it on return: its
            # counter says nothing more, and the table stays as small as the active set
            floor = min((self.served[o] for o in self.active), default=None)
            if floor is None or self.served.get(owner, 0.0) <= floor:
                self.served.pop(owner, None)

    def charge(self, owner: str, tokens: float) -> None:
        self.served[owner] = self.served.get(owner, 0.0) + tokens


class RecentService:
    """Each key's service (tokens over its weight, as the counters charge it), decayed
    with time constant `tau_s`: what it was given lately, never lifted as the order's
    counters are, so keys can be compared (`jain`). Decayed lazily, a key at a time:
    a charge costs the same however many keys there are."""

    def __init__(self, tau_s: float = SERVICE_TAU_S) -> None:
        self.tau_s = tau_s
        self.served: dict[str, tuple[float, float]] = {}  # key -> (service, as of when)
        self._pruned_at = time.monotonic()

    def value(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        service, at = self.served.get(key, (0.0, now))
        return service * math.exp(-(now - at) / self.tau_s)

    def charge(self, key: str, service: float) -> None:
        now = time.monotonic()
        self.served[key] = (self.value(key, now) + service, now)
        if now - self._pruned_at > self.tau_s:  # keys long idle leave the table
            self._pruned_at = now
            for idle in [k for k in self.served if self.value(k, now) < 1e-3]:
                del self.served[idle]

    def jain(self, keys: set[str]) -> float | None:
        """Jain's index of the recent service of `keys` (1: equal, 1/n: one key had it
        all); None for fewer than two."""
        if len(keys) < 2:
            return None
        now = time.monotonic()
        xs = [self.value(k, now) for k in keys]
        total, squares = sum(xs), sum(x * x for x in xs)
        return 1.0 if squares == 0 else total * total / (len(xs) * squares)


class FairQueue:
    def __init__(
        self, bound: int, shared_bound: int, fair: bool = True, active_s: float = ACTIVE_S
    ) -> None:
        self.bound = bound  # in flight while one key is active
        self.shared_bound = min(shared_bound, bound)  # while several are
        self.max_queued = UNBOUNDED  # waiting here at most, before over-share keys are refused
        self.active_s = active_s
        self.seen: dict[str, float] = {}  # when each key last asked (active keys stay)
        self.weights: dict[str, float] = {}  # each seen key's weight, as it last asked
        self.elsewhere: frozenset[str] = frozenset()  # keys active at the other routers
        # each key's sessions: when each last asked here, and those active at the others
        self.session_seen: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.sessions_elsewhere: dict[str, frozenset[str]] = {}
        self._pruned_at = 0.0
        self.fair = fair  # False: first come, first served (the baseline it is measured by)
        self.in_flight = 0
        self.running: collections.Counter[str] = collections.Counter()  # in flight, per key
        self.running_in: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )  # in flight, per key and session
        self.keys = Counters()
        self.sessions: dict[str, Counters] = collections.defaultdict(Counters)
        self.recent = RecentService()
        self.bands: set[str] = set()  # the service tiers that ever waited here
        # waiting requests, per key and session, oldest first
        self.waiting: dict[str, dict[str, collections.deque[Waiter]]] = {}
        self._order = itertools.count()

    # ---- what the pipeline calls ------------------------------------------------------

    async def enter(
        self,
        key: str,
        session: str | None,
        tokens: int,
        weight: float,
        timeout_s: float | None,
        band: str = "default",
    ) -> Slot:
        """Wait for the tier (at once where it has room and nobody waits); the slot to
        close when the request ends. `QueueTimeout` past `timeout_s`."""
        session = session or ""
        self.seen[key] = self.session_seen[key][session] = time.monotonic()
        self.weights[key] = weight
        if self.queued >= self.max_queued:
            self._refuse_if_over_share(key)
        self.keys.arrive(key)
        self.sessions[key].arrive(session)
        started = time.monotonic()
        if not self.waiting and self._may_go(key, session, self.active_keys()):
            self._go(key, session, tokens, weight)
            return Slot(self, key, session, weight, 0.0)
        waiter = self._line_up(key, session, tokens, weight, band)
        if waiter.done.done():
            return Slot(self, key, session, weight, 0.0)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.done), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not waiter.done.done():  # still waiting: it leaves the queue
                self._forget(waiter)
                self.keys.leave(key)
                self.sessions[key].leave(session)
                self._dispatch()
                if isinstance(exc, TimeoutError):
                    raise QueueTimeout(time.monotonic() - started) from None
                raise
            # it was let through just as it gave up: the slot is its own to close
            if isinstance(exc, asyncio.CancelledError):
                Slot(self, key, session, weight, 0.0).close()
                raise
        return Slot(self, key, session, weight, time.monotonic() - started)

    def _line_up(self, key: str, session: str, tokens: int, weight: float, band: str) -> Waiter:
        """A waiter at the end of its session's line (let through at once where its key
        is under its share)."""
        done = asyncio.get_running_loop().create_future()
        waiter = Waiter(key, session, tokens, weight, next(self._order), done, band)
        self.bands.add(band)
        self.waiting.setdefault(key, {}).setdefault(session, collections.deque()).append(waiter)
        self._dispatch()  # a key under its share goes past the others' backlog
        return waiter

    def _refuse_if_over_share(self, key: str) -> None:
        """With the queue full, a key holding its part of it (the queue split over the
        active keys) is refused; a key with fewer waiting still joins (the bound is soft
        by those few), so a swarm cannot crowd others out of the queue itself."""
        mine = sum(len(q) for q in self.waiting.get(key, {}).values())
        part = max(1, self.max_queued // max(len(self.active_keys()), 1))
        if mine >= part:
            raise QueueFull(mine, part)

    def release(self, slot: Slot, output_tokens: int) -> None:
        self.in_flight -= 1
        self.running[slot.key] -= 1
        if self.running[slot.key] <= 0:
            del self.running[slot.key]
        running = self.running_in[slot.key]
        running[slot.session] -= 1
        if running[slot.session] <= 0:
            del running[slot.session]
            if not running:
                del self.running_in[slot.key]
        self.keys.charge(slot.key, 2 * output_tokens / slot.weight)
        self.recent.charge(slot.key, 2 * output_tokens / slot.weight)
        self.sessions[slot.key].charge(slot.session, 2 * output_tokens)
        self.keys.leave(slot.key)
        self.sessions[slot.key].leave(slot.session)
        if not self.sessions[slot.key].active:
            del self.sessions[slot.key]
        self._dispatch()

    # ---- figures ----------------------------------------------------------------------

    def active_keys(self) -> set[str]:
        """Keys active here and those the other routers name: an interactive key between
        its requests still counts, so a swarm's batch stays small meanwhile."""
        return self.local_keys() | self.elsewhere

    def local_keys(self) -> set[str]:
        """Keys with a request here now or in the last `active_s`. (Keys seen long ago
        are let go at most once a second.)"""
        now = time.monotonic()
        if now - self._pruned_at >= min(1.0, self.active_s):
            self._pruned_at = now
            horizon = now - self.active_s
            for key in [k for k, at in self.seen.items() if at < horizon]:
                if key not in self.keys.active:
                    del self.seen[key]
                    self.weights.pop(key, None)
            for key, seen in list(self.session_seen.items()):
                busy = self.sessions[key].active if key in self.sessions else {}
                for session in [s for s, at in seen.items() if at < horizon]:
                    if session not in busy:
                        del seen[session]
                if not seen:
                    del self.session_seen[key]
        return set(self.seen)

    def active_sessions(self, key: str) -> set[str]:
        """The sessions of `key` active here (as keys are: lately or now) or elsewhere."""
        return set(self.session_seen.get(key, ())) | self.sessions_elsewhere.get(key, frozenset())

    def local_sessions(self) -> dict[str, list[str]]:
        """Each key's sessions active here, for keys with more than one (only those
        are split)."""
        self.local_keys()  # prunes
        return {k: sorted(s) for k, s in self.session_seen.items() if len(s) > 1}

    def limit(self, active: int) -> int:
        """The bound now: the tier's capacity while one key is active, the shared bound
        while several are."""
        return self.bound if active <= 1 else self.shared_bound

    def share(self, key: str, active: set[str]) -> int:
        """What `key` may have in flight past the shared bound: its part of it, by
        weight (a key known only from another router counts at weight 1)."""
        total = sum(self.weights.get(k, 1.0) for k in active) or 1.0
        return max(1, int(self.shared_bound * self.weights.get(key, 1.0) / total))

    def held(self, key: str, active: set[str]) -> int:
        """Places kept free from `key` past its share: one for each other active key
        with nothing in flight here, at most half the shared bound."""
        idle = sum(1 for k in active if k != key and not self.running[k])
        return min(idle, self.shared_bound // 2)

    def _may_go(self, key: str, session: str, active: set[str]) -> bool:
        free = self._free(key, active)
        return free > 0 and self._session_room(key, session, free, active) > 0

    def _free(self, key: str, active: set[str]) -> int:
        """The places `key` may take now (0: none)."""
        free = self.bound - self.in_flight
        n = len(active)
        if free <= 0 or n <= 1:
            return free
        past_share = self.limit(n) - self.in_flight - self.held(key, active)
        return min(free, max(self.share(key, active) - self.running[key], past_share))

    def _session_room(self, key: str, session: str, free: int, active: set[str]) -> int:
        """Of a key's `free` places, those `session` may take. With one session active
        the key's; with several, a session within its part of the key's shared places
        (the shared bound, or the key's share of it) takes any, and one past it keeps
        the key's batch to those shared places, less one for each other active session
        with nothing in flight here: as keys do for each other, one level down."""
        sessions = self.active_sessions(key)
        if len(sessions) <= 1:
            return free
        running = self.running_in.get(key) or collections.Counter()
        shared = self.shared_bound if len(active) <= 1 else self.share(key, active)
        if running[session] < max(1, shared // len(sessions)):
            return free
        idle = sum(1 for s in sessions if s != session and not running[s])
        return min(free, shared - self.running[key]) - min(idle, shared // 2)

    def wake(self) -> None:
        """Let waiters through after the bound grew."""
        self._dispatch()

    def fairness(self) -> float | None:
        """Jain's index of the weighted recent service of the keys with requests waiting
        here now (those the order has to choose between); None for fewer than two."""
        return self.recent.jain(set(self.waiting))

    def queued_by_band(self) -> dict[str, int]:
        """Waiting here per service tier (0 for one that waited before)."""
        counts = collections.Counter(
            w.band for sessions in self.waiting.values() for q in sessions.values() for w in q
        )
        return {band: counts[band] for band in self.bands}

    @property
    def queued(self) -> int:
        return sum(len(q) for sessions in self.waiting.values() for q in sessions.values())

    # ---- order --------------------------------------------------------------------------

    def _go(self, key: str, session: str, tokens: int, weight: float) -> None:
        self.in_flight += 1
        self.running[key] += 1
        self.running_in[key][session] += 1
        self.keys.charge(key, tokens / weight)
        self.recent.charge(key, tokens / weight)
        self.sessions[key].charge(session, tokens)

    def _dispatch(self) -> None:
        while self.waiting and (waiter := self._next()) is not None:
            self._forget(waiter)
            self._go(waiter.key, waiter.session, waiter.tokens, waiter.weight)
            waiter.done.set_result(None)

    def _next(self) -> Waiter | None:
        """The next to go, or None while none may."""
        active = self.active_keys()
        ready: dict[str, list[str]] = {}  # the sessions that may go, per key
        for key, sessions in self.waiting.items():
            free = self._free(key, active)
            may = [s for s in sessions if free > 0 and self._session_room(key, s, free, active) > 0]
            if may:
                ready[key] = may
        if not ready:
            return None
        if not self.fair:
            waiting = (w for k, ss in ready.items() for s in ss for w in self.waiting[k][s])
            return min(waiting, key=lambda w: w.order)
        served = self.keys.served
        # a newcomer lifted to the least counter ties with it: fewer in flight goes first
        key = min(ready, key=lambda k: (served[k], self.running[k], self._oldest(k)))
        by_session = self.sessions[key].served
        sessions = self.waiting[key]
        session = min(ready[key], key=lambda s: (by_session[s], sessions[s][0].order))
        return sessions[session][0]

    def _oldest(self, key: str) -> int:
        return min(q[0].order for q in self.waiting[key].values())

    def _forget(self, waiter: Waiter) -> None:
        sessions = self.waiting[waiter.key]
        queue = sessions[waiter.session]
        queue.remove(waiter)
        if not queue:
            del sessions[waiter.session]
        if not sessions:
            del self.waiting[waiter.key]


class TierGates:
    """One `FairQueue` per tier in this ingress replica, sized from the tiers' live
    figures: the engines' capacity (and `shared_in_flight` per replica of the tier)
    split evenly over the ingress replicas, which Serve balances evenly."""

    def __init__(self, order: str, routers: int) -> None:
        self.fair = order == "fair"
        self.routers = routers
        self.gates: dict[str, FairQueue] = {}

    def gate(self, tier: str) -> FairQueue:
        if tier not in self.gates:  # no figures yet: no bound until they come
            self.gates[tier] = FairQueue(UNBOUNDED, UNBOUNDED, self.fair)
        return self.gates[tier]

    def resize(
        self, tier: str, capacity: int, replicas: int, shared_per_replica: int, max_queued: int
    ) -> None:
        gate = self.gate(tier)
        gate.bound = self.share(max(capacity, 1))
        gate.shared_bound = min(gate.bound, self.share(shared_per_replica * max(replicas, 1)))
        gate.max_queued = self.share(max_queued)
        gate.wake()

    def share(self, n: int) -> int:
        """This router's even part of `n` (rounded up, at least 1)."""
        return max(1, -(-n // self.routers))

    def queued(self) -> dict[str, int]:
        return {tier: gate.queued for tier, gate in self.gates.items() if gate.queued}

    def fairness(self) -> dict[str, float]:
        """Per tier where several keys wait here, Jain's index of their recent service."""
        return {tier: f for tier, gate in self.gates.items() if (f := gate.fairness()) is not None}

    def active_keys(self) -> dict[str, list[str]]:
        """The keys that asked this router lately, per tier (for the other routers)."""
        return {
            tier: sorted(keys) for tier, gate in self.gates.items() if (keys := gate.local_keys())
        }

    def active_sessions(self) -> dict[str, dict[str, list[str]]]:
        """Per tier, the sessions of each key with several active here lately."""
        return {tier: s for tier, gate in self.gates.items() if (s := gate.local_sessions())}


UNBOUNDED = 1 << 30
