"""Replica choice within a tier: engine load first, conversation affinity second.

Ray's default (power of two choices) compares requests in flight at two random replicas.
An LLM replica's cost is in its engine: sequences running, sequences waiting for a batch
slot, and the prefix (KV) cache it holds. This router

- keeps a conversation on one replica (rendezvous hashing of an affinity key the router
  derives from the session header or the conversation's opening messages), so its prefix
  is still cached there on the next turn;
- leaves that replica when it is overloaded (engine pressure above `overload_pressure`),
  for the least loaded one, so affinity never queues a request behind a full engine;
- sends requests without a key to the least loaded replica.

Load is the larger of the engine's own running + waiting count (`record_routing_stats`,
refreshed every `request_routing_stats_period_s`) and Ray's count of requests in flight
at the replica (fresh at every send), over the engine's batch capacity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    running: float = 0.0
    waiting: float = 0.0
    capacity: float = 1.0
    in_flight: float = 0.0
    healthy: bool = True

    @property
    def pressure(self) -> float:
        return max(self.running + self.waiting, self.in_flight) / max(self.capacity, 1.0)


def _hrw(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest())


def rank_replicas(
    replicas: Sequence[ReplicaView], affinity: str | None, overload_pressure: float = 1.0
) -> list[list[str]]:
    """Replica ids in ranks, most preferred first (Ray tries rank by rank)."""
    if not replicas:
        return []
    usable = [r for r in replicas if r.healthy] or list(replicas)
    by_load = sorted(usable, key=lambda r: (r.pressure, r.replica_id))
    if affinity:
        home = max(usable, key=lambda r: _hrw(affinity, r.replica_id))
        if home.pressure <= overload_pressure:
            rest = [r.replica_id for r in by_load if r is not home]
            return [[home.replica_id], rest] if rest else [[home.replica_id]]
    return [[r.replica_id] for r in by_load]


def view_of(replica: RunningReplica, in_flight: int | None) -> ReplicaView:
    stats = replica.routing_stats or {}
    return ReplicaView(
        replica_id=replica.replica_id.unique_id,
        running=float(stats.get("running", 0)),
        waiting=float(stats.get("waiting", 0)),
        capacity=float(stats.get("capacity", 1) or 1),
        in_flight=float(in_flight or 0),
        healthy=bool(stats.get("healthy", True)),
    )


class EngineAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, overload_pressure: float = 1.0, **_: Any) -> None:
        self.overload_pressure = overload_pressure

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        affinity = None
        if pending_request is not None:
            affinity = pending_request.kwargs.get("affinity")
        cache = self.replica_queue_len_cache
        views = [view_of(r, cache.get(r.replica_id)) for r in candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = rank_replicas(views, affinity, getattr(self, "overload_pressure", 1.0))
        return [[by_id[i] for i in rank] for rank in ranks]
