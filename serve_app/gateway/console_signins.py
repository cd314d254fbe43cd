"""Console sign-ins, held by the gateway actor so every router replica sees the same ones.

A sign-in is a random token (in an HttpOnly cookie; the API key or admin token it was
exchanged for is never stored in the browser or here) naming its subject: a key id, or
`OPERATOR`. Only a hash of each token is kept. Tokens expire, end at sign-out, and a
revoked key's tokens end with it. Kept in memory: a gateway restart signs everyone out.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from serve_app.gateway.protocol import OPERATOR

__all__ = ["OPERATOR", "SignIns"]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SignIns:
    def __init__(self, max_signins: int = 10_000) -> None:
        self._by_digest: dict[str, tuple[str, float]] = {}
        self.max_signins = max_signins

    def open(self, subject: str, ttl_s: float, now: float | None = None) -> str:
        now = time.time() if now is None else now
        self._sweep(now)
        if len(self._by_digest) >= self.max_signins:  # the oldest give way
            oldest = min(self._by_digest, key=lambda d: self._by_digest[d][1])
            del self._by_digest[oldest]
        token = secrets.token_urlsafe(32)
        self._by_digest[_digest(token)] = (subject, now + ttl_s)
        return token

    def subject(self, token: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        found = self._by_digest.get(_digest(token))
        if found is None:
            return None
        if found[1] <= now:
            del self._by_digest[_digest(token)]
            return None
        return found[0]

    def close(self, token: str) -> None:
        self._by_digest.pop(_digest(token), None)

    def end_subject(self, subject: str) -> None:
        for digest in [d for d, (s, _) in self._by_digest.items() if s == subject]:
            del self._by_digest[digest]

    def _sweep(self, now: float) -> None:
        for digest in [d for d, (_, until) in self._by_digest.items() if until <= now]:
            del self._by_digest[digest]
