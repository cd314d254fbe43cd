"""Console sign-ins, held by the gateway actor so every router replica sees the same ones.

A sign-in is a random token (in an HttpOnly cookie; the API key or admin token it was
exchanged for is never stored in the browser or here) naming its subject: a key id, or
`OPERATOR`. Only a hash of each token is kept, in `signins.db` in the state dir, so a
gateway restart signs nobody out. Tokens expire, end at sign-out, and a revoked key's
tokens end with it. A damaged file is set aside (everyone signs in again), never a crash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path

from serve_app.gateway.protocol import OPERATOR

__all__ = ["OPERATOR", "SignIns"]

log = logging.getLogger("serve_app.gateway.console_signins")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _connect(path: Path | None) -> sqlite3.Connection:
    if path is None:
        return sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if db.execute("PRAGMA quick_check").fetchone()[0] == "ok":
            return db
        db.close()
    except sqlite3.DatabaseError:
        pass
    aside = path.parent / "_quarantine" / f"{path.name}.{int(time.time())}"
    aside.parent.mkdir(exist_ok=True)
    os.replace(path, aside)
    log.error("console sign-ins were damaged: moved to %s; everyone signs in again", aside)
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


class SignIns:
    def __init__(self, path: Path | None = None, max_signins: int = 10_000) -> None:
        self.db = _connect(path)
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS signins"
            " (digest TEXT PRIMARY KEY, subject TEXT NOT NULL, until REAL NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS signins_subject ON signins (subject)")
        self.max_signins = max_signins

    def open(self, subject: str, ttl_s: float, now: float | None = None) -> str:
        now = time.time() if now is None else now
        self.db.execute("DELETE FROM signins WHERE until <= ?", (now,))
        (count,) = self.db.execute("SELECT count(*) FROM signins").fetchone()
        if count >= self.max_signins:  # the oldest give way
            self.db.execute(
                "DELETE FROM signins WHERE digest IN"
                " (SELECT digest FROM signins ORDER BY until LIMIT ?)",
                (count - self.max_signins + 1,),
            )
        token = secrets.token_urlsafe(32)
        self.db.execute(
            "INSERT INTO signins VALUES (?, ?, ?)", (_digest(token), subject, now + ttl_s)
        )
        return token

    def subject(self, token: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        found = self.db.execute(
            "SELECT subject, until FROM signins WHERE digest = ?", (_digest(token),)
        ).fetchone()
        if found is None:
            return None
        if found[1] <= now:
            self.close(token)
            return None
        return found[0]

    def close(self, token: str) -> None:
        self.db.execute("DELETE FROM signins WHERE digest = ?", (_digest(token),))

    def end_subject(self, subject: str) -> None:
        self.db.execute("DELETE FROM signins WHERE subject = ?", (subject,))
