"""Credential guessing, slowed: failed attempts at the admin credential and at console
sign-ins, counted per client address and in total, by the gateway actor so every router
replica counts the same.

Per address and scope, the first `FREE` failures cost nothing (typos); each one past them
closes that address's door for twice as long as the last (1 s, 2 s, 4 s... up to
`MAX_BLOCK_S`); a quiet `FORGET_S` clears its count. In total, failures drain a bucket of
`GLOBAL_BURST` refilled at `GLOBAL_PER_S`: while it is empty every attempt waits for the
next refill (at most `1 / GLOBAL_PER_S` seconds), which bounds the guessing rate of an
attacker with many addresses, and is all that other addresses' failures can cost a
right credential. While a door is closed the attempt is refused unchecked (a 429 with
`Retry-After`): whether it was right is not told.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

FREE = 10  # failures per address and scope before any wait
MAX_BLOCK_S = 900.0
FORGET_S = 900.0  # an address quiet this long starts afresh
GLOBAL_BURST = 100.0
GLOBAL_PER_S = 1.0
MAX_ADDRESSES = 100_000  # kept at most; the longest quiet go first


@dataclass
class Strikes:
    failures: int = 0
    last: float = 0.0
    until: float = 0.0  # closed until then


class Throttle:
    def __init__(self) -> None:
        self.strikes: collections.OrderedDict[tuple[str, str], Strikes] = collections.OrderedDict()
        self.tokens = GLOBAL_BURST
        self.filled_at = time.monotonic()

    def wait(self, scope: str, address: str, now: float | None = None) -> float:
        """Seconds until an attempt from `address` may be checked (0: now)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        global_wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / GLOBAL_PER_S
        mine = self.strikes.get((scope, address))
        own_wait = 0.0 if mine is None else max(mine.until - now, 0.0)
        return max(global_wait, own_wait)

    def failed(self, scope: str, address: str, now: float | None = None) -> float:
        """Count a failed attempt; the wait it imposes on its address."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        self.tokens = max(self.tokens - 1, 0.0)
        key = (scope, address)
        mine = self.strikes.pop(key, None)
        if mine is None or now - mine.last > FORGET_S:
            mine = Strikes()
        mine.failures += 1
        mine.last = now
        if mine.failures > FREE:
            mine.until = now + min(2.0 ** (mine.failures - FREE - 1), MAX_BLOCK_S)
        self.strikes[key] = mine  # the most recent last
        while len(self.strikes) > MAX_ADDRESSES:
            self.strikes.popitem(last=False)
        return max(mine.until - now, 0.0)

    def _refill(self, now: float) -> None:
        if now > self.filled_at:
            self.tokens = min(GLOBAL_BURST, self.tokens + (now - self.filled_at) * GLOBAL_PER_S)
            self.filled_at = now
