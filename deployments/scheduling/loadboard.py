"""The cluster's view of every tier's load: replicas push their engine figures here, routers
read one aggregated snapshot, and tell it in the same call what their fair queues hold
for each tier: how many requests wait there, which the tier replicas hear back when they
report (so a tier's autoscaling counts the demand held at the routers too), and which keys
asked lately, which every router hears back (so each keeps room for a key that is active
at another router, see `routing/fair_queue.py`).

Why not ask a tier through its Serve handle: such a poll is itself a request to the tier,
so it is counted by Ray's autoscaler and would wake a tier that has scaled to zero (and
it reaches only one replica). The board is one small actor that replicas report to every
half second; entries of replicas that stop reporting age out.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

import ray
from pydantic import BaseModel, Field

from deployments.protocol import EngineLoad

BOARD_NAME = "kimi-loadboard"
BOARD_NAMESPACE = "serve"
STALE_AFTER_S = 3.0  # a replica silent this long is gone (or hung); its figures are dropped
MAX_ACTIVE_KEYS = 1000  # per tier and router: past this many, the router's own view serves


class ReplicaLoad(EngineLoad):
    replica: str
    node_id: str = ""
    age_s: float = 0.0


class TierLoad(EngineLoad):
    """The sum of a tier's live replicas; `replicas` 0 means scaled to zero (or down)."""

    replicas: int = 0
    members: list[ReplicaLoad] = Field(default_factory=list)
    queued: int = 0  # requests waiting at the routers for this tier (their fair queues)
    # Jain's index of recent service among the keys waiting, the lowest router's
    fairness: float | None = None
    # keys that asked any router for this tier lately: for the routers, not for display
    active_keys: list[str] = Field(default_factory=list, exclude=True)
    # and the sessions of keys with several active (a key's places are split over them)
    active_sessions: dict[str, list[str]] = Field(default_factory=dict, exclude=True)


class RouterReport(BaseModel):
    """What one router's fair queues hold, per tier."""

    queued: dict[str, int] = Field(default_factory=dict)
    active_keys: dict[str, list[str]] = Field(default_factory=dict)
    active_sessions: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    fairness: dict[str, float] = Field(default_factory=dict)  # where several keys wait


def aggregate(members: Sequence[ReplicaLoad]) -> TierLoad:
    healthy = [m for m in members if m.healthy]
    counted = healthy or list(members)
    return TierLoad(
        running=sum(m.running for m in counted),
        waiting=sum(m.waiting for m in counted),
        capacity=max(1, sum(m.capacity for m in counted)),
        kv_cache_usage=max((m.kv_cache_usage for m in counted), default=0.0),
        healthy=bool(healthy),
        aborted_total=sum(m.aborted_total for m in members),
        generated_tokens_total=sum(m.generated_tokens_total for m in members),
        restarts=sum(m.restarts for m in members),
        replicas=len(healthy),
        members=list(members),
    )


HEAD_NODE = "node:__internal_head__"  # a resource only the head node has


# Hot control-plane calls: no Ray task event kept for each (as Serve does for its own
# actors); with them GCS grew ~3 KB a call (benchmarks/task_events.py).
@ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)
class LoadBoard:
    def __init__(self) -> None:
        self._reports: dict[str, dict[str, tuple[float, ReplicaLoad]]] = {}
        self._routers: dict[str, tuple[float, RouterReport]] = {}

    def report(self, tier: str, load: ReplicaLoad) -> float:
        """Keep a replica's figures; its share of the requests waiting at the routers
        for its tier (for its autoscaling stats)."""
        now = time.monotonic()
        replicas = self._reports.setdefault(tier, {})
        replicas[load.replica] = (now, load)
        return self.queued(tier, now) / len(replicas)

    def _fresh(self, now: float) -> list[RouterReport]:
        return [r for at, r in self._routers.values() if now - at <= STALE_AFTER_S]

    def queued(self, tier: str, now: float) -> int:
        return sum(r.queued.get(tier, 0) for r in self._fresh(now))

    def fairness(self, tier: str, now: float) -> float | None:
        return min(
            (f for r in self._fresh(now) if (f := r.fairness.get(tier)) is not None), default=None
        )

    def active_keys(self, tier: str, now: float) -> list[str]:
        keys: set[str] = set()
        for r in self._fresh(now):
            keys.update(r.active_keys.get(tier, ())[:MAX_ACTIVE_KEYS])
        return sorted(keys)

    def active_sessions(self, tier: str, now: float) -> dict[str, list[str]]:
        sessions: dict[str, set[str]] = collections.defaultdict(set)
        for r in self._fresh(now):
            for key, named in list(r.active_sessions.get(tier, {}).items())[:MAX_ACTIVE_KEYS]:
                sessions[key].update(named[:MAX_ACTIVE_KEYS])
        return {key: sorted(named) for key, named in sessions.items()}

    def forget(self, tier: str, replica: str) -> None:
        self._reports.get(tier, {}).pop(replica, None)

    def snapshot(
        self, router: str | None = None, report: RouterReport | None = None
    ) -> dict[str, TierLoad]:
        """Every tier's figures; a router passes what its fair queues hold."""
        now = time.monotonic()
        if router is not None:
            self._routers[router] = (now, report or RouterReport())
        out: dict[str, TierLoad] = {}
        for tier, reports in self._reports.items():
            for replica, (at, _) in list(reports.items()):
                if now - at > STALE_AFTER_S:
                    del reports[replica]
            members = [ld.model_copy(update={"age_s": now - at}) for at, ld in reports.values()]
            # A tier nobody reports for is absent, not unhealthy: scaled to zero, it is
            # still a candidate, and a request wakes it.
            if members:
                routers = {
                    "queued": self.queued(tier, now),
                    "active_keys": self.active_keys(tier, now),
                    "active_sessions": self.active_sessions(tier, now),
                    "fairness": self.fairness(tier, now),
                }
                out[tier] = aggregate(members).model_copy(update=routers)
        return out


def board() -> ray.actor.ActorHandle:
    """The one board of the cluster, created by whoever asks first. Detached: it must
    outlive the replica that happened to create it. On the head node (beside GCS and
    Serve's controller, as Ray's own state actors are): a worker node that falls silent
    must not take every router's view of the tiers with it."""
    return LoadBoard.options(
        name=BOARD_NAME,
        namespace=BOARD_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        resources={HEAD_NODE: 0.001},
    ).remote()
