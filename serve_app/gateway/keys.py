"""API keys in SQLite: only a hash of each key is stored, never the key.

A key reads `sk-kimi-<id>-<secret>`. The id (public, 12 hex chars) finds the row; the
SHA-256 of the whole key is compared in constant time. Keys are 160-bit random secrets,
so a fast hash is the right tool (as for GitHub or Stripe tokens): no dictionary to
defend against, and a lookup costs microseconds on the request path.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.config import LimitFields

PREFIX = "sk-kimi-"
# what a settled request adds to its key's budget totals: key id, month, tokens, USD, session
UsageRow = tuple[str, str, int, float, str | None]
log = logging.getLogger("serve_app.gateway.keys")


class NewKey(BaseModel):
    """An operator's request for a key (`POST /admin/keys`)."""

    model_config = ConfigDict(strict=True)  # `"expires_at": false` is no time

    plan: str = Field(min_length=1)
    name: str = Field("", max_length=200)
    overrides: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    expires_at: float | None = Field(None, description="Unix time; in the future")

    @field_validator("expires_at")
    @classmethod
    def _future(cls, v: float | None) -> float | None:
        if v is not None and v <= time.time():
            raise ValueError("expires_at is not in the future")
        return v


class KeyOverrides(LimitFields):
    """Per-key changes to the plan's limits (None = the plan's value)."""


class KeyInfo(BaseModel):
    key_id: str
    plan: str
    name: str = ""
    overrides: KeyOverrides = KeyOverrides()
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ours(key: str) -> bool:
    """Whether a string claims to be one of our keys (is to be verified, never taken for
    a placeholder), well-formed or not."""
    return key.startswith(PREFIX)


def split_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if not key.startswith(PREFIX):
        return None
    key_id, sep, secret = key[len(PREFIX) :].partition("-")
    if not sep or len(key_id) != 12 or len(secret) < 20:
        return None
    return key_id


TABLES = ("keys", "month_usage", "session_usage")


def intact(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError:
        return False


def salvage(damaged: Path, into: KeyStore) -> tuple[int, int]:
    """Copy every row that still reads from a damaged store, one by one (a damaged page
    costs the rows on it, not the rest); the rows kept and lost."""
    kept = lost = 0
    try:
        old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return 0, 0
    with contextlib.closing(old):
        for table in TABLES:
            try:
                (top,) = old.execute(f"SELECT max(rowid) FROM {table}").fetchone()
            except sqlite3.DatabaseError:
                continue  # not even the table's root page reads
            for rowid in range(1, (top or 0) + 1):
                try:
                    row = old.execute(f"SELECT * FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
                except sqlite3.DatabaseError:
                    lost += 1
                    continue
                if row is not None:
                    marks = ", ".join("?" * len(row))
                    into.db.execute(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", row)
                    kept += 1
    return kept, lost


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.salvaged: tuple[int, int] | None = None  # (kept, lost) if it was damaged
        aside = None
        if path.exists() and not intact(path):
            aside = path.parent / "_quarantine" / f"{path.name}.{int(time.time())}"
            aside.parent.mkdir(exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{path}{suffix}").exists():
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS keys (
                key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, plan TEXT NOT NULL,
                name TEXT NOT NULL DEFAULT '', overrides TEXT NOT NULL DEFAULT '{}',
                metadata TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
                expires_at REAL, revoked_at REAL)"""
        )
        # Monthly totals per key, for budgets that survive restarts.
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS month_usage (
                key_id TEXT NOT NULL, month TEXT NOT NULL, tokens INTEGER NOT NULL,
                spend REAL NOT NULL, PRIMARY KEY (key_id, month))"""
        )
        # Totals per agent session, for session caps that survive restarts.
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS session_usage (
                key_id TEXT NOT NULL, session TEXT NOT NULL, tokens INTEGER NOT NULL,
                spend REAL NOT NULL, PRIMARY KEY (key_id, session))"""
        )
        if aside is not None:
            self.salvaged = salvage(aside, self)
            log.critical(
                "the key store was damaged: moved to %s; %d rows kept, %d lost",
                aside,
                *self.salvaged,
            )

    def create(
        self,
        plan: str,
        name: str = "",
        overrides: KeyOverrides | None = None,
        metadata: dict[str, Any] | None = None,
        expires_at: float | None = None,
    ) -> tuple[str, KeyInfo]:
        """Returns the key (shown once, never stored) and its record."""
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}{key_id}-{secrets.token_urlsafe(24)}"
        info = KeyInfo(
            key_id=key_id,
            plan=plan,
            name=name,
            overrides=overrides or KeyOverrides(),
            metadata=metadata or {},
            created_at=time.time(),
            expires_at=expires_at,
        )
        self.db.execute(
            "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                key_id,
                hash_key(key),
                plan,
                name,
                info.overrides.model_dump_json(),
                json.dumps(info.metadata),
                info.created_at,
                expires_at,
            ),
        )
        return key, info

    def verify(self, key: str) -> KeyInfo | None:
        """The key's record if the key is genuine (revoked or expired ones included)."""
        key_id = split_key(key)
        if key_id is None:
            return None
        row = self.db.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[1], hash_key(key)):
            return None
        return _info(row)

    def get(self, key_id: str) -> KeyInfo | None:
        row = self.db.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return _info(row) if row else None

    def list(self) -> list[KeyInfo]:
        rows = self.db.execute("SELECT * FROM keys ORDER BY created_at").fetchall()
        return [_info(r) for r in rows]

    def update(
        self, key_id: str, plan: str | None = None, overrides: KeyOverrides | None = None
    ) -> KeyInfo | None:
        """A key's new plan and/or overrides (its secret stays); None if no active key."""
        if plan is not None:
            self.db.execute(
                "UPDATE keys SET plan = ? WHERE key_id = ? AND revoked_at IS NULL", (plan, key_id)
            )
        if overrides is not None:
            self.db.execute(
                "UPDATE keys SET overrides = ? WHERE key_id = ? AND revoked_at IS NULL",
                (overrides.model_dump_json(), key_id),
            )
        info = self.get(key_id)
        return info if info is not None and info.revoked_at is None else None

    def revoke(self, key_id: str) -> bool:
        cur = self.db.execute(
            "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        )
        return cur.rowcount == 1

    def add_usage(
        self, key_id: str, month: str, tokens: int, spend: float, session: str | None = None
    ) -> None:
        """Add to the key's month (and its session's) totals, both or neither."""
        self.add_usages([(key_id, month, tokens, spend, session)])

    def add_usages(self, rows: Sequence[UsageRow]) -> None:
        """`add_usage` for each row, in one transaction (one commit to disk): all or none."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for key_id, month, tokens, spend, session in rows:
                self.db.execute(
                    """INSERT INTO month_usage VALUES (?, ?, ?, ?) ON CONFLICT (key_id, month)
                    DO UPDATE SET tokens = tokens + excluded.tokens,
                    spend = spend + excluded.spend""",
                    (key_id, month, tokens, spend),
                )
                if session:
                    self.db.execute(
                        """INSERT INTO session_usage VALUES (?, ?, ?, ?)
                        ON CONFLICT (key_id, session) DO UPDATE SET
                        tokens = tokens + excluded.tokens, spend = spend + excluded.spend""",
                        (key_id, session, tokens, spend),
                    )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def session_usage(self, key_id: str, session: str) -> tuple[int, float]:
        row = self.db.execute(
            "SELECT tokens, spend FROM session_usage WHERE key_id = ? AND session = ?",
            (key_id, session),
        ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    def month_usage(self, key_id: str, month: str) -> tuple[int, float]:
        row = self.db.execute(
            "SELECT tokens, spend FROM month_usage WHERE key_id = ? AND month = ?",
            (key_id, month),
        ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)


def _info(row: tuple[Any, ...]) -> KeyInfo:
    key_id, _hash, plan, name, overrides, metadata, created, expires, revoked = row
    return KeyInfo(
        key_id=key_id,
        plan=plan,
        name=name,
        overrides=KeyOverrides.model_validate_json(overrides),
        metadata=json.loads(metadata),
        created_at=created,
        expires_at=expires,
        revoked_at=revoked,
    )
