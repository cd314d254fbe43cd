"""Replica-count changes per tier as a router replica sees them on the load board: the
autoscaler's recent decisions, for the console (kept since the replica started)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from deployments.scheduling.loadboard import TierLoad


@dataclass(frozen=True)
class ScalingEvent:
    time: float
    tier: str
    replicas_before: int
    replicas_after: int


class ScalingEvents:
    def __init__(self, keep: int = 50) -> None:
        self.events: deque[ScalingEvent] = deque(maxlen=keep)
        self._last: dict[str, int] = {}

    def observe(self, loads: Mapping[str, TierLoad], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for tier, load in loads.items():
            before = self._last.get(tier)
            if before is not None and before != load.replicas:
                self.events.append(ScalingEvent(now, tier, before, load.replicas))
            self._last[tier] = load.replicas
        for tier in [t for t in self._last if t not in loads]:  # scaled to zero: off the board
            if self._last[tier]:
                self.events.append(ScalingEvent(now, tier, self._last[tier], 0))
            self._last[tier] = 0

    def latest(self) -> list[ScalingEvent]:
        return list(reversed(self.events))
