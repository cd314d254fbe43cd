"""Webhook endpoints and their pending deliveries, in the response store's database.

An endpoint belongs to a key (its owner) like everything there. An event becomes one
delivery row per endpoint that subscribed to its type, kept until the endpoint took it
or the attempts ran out: deliveries survive the store actor's restarts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from serve_app.store.webhook_delivery import Delivery, event_body

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    event_types TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_owner ON webhooks (owner);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    done_at REAL,
    last_error TEXT,
    PRIMARY KEY (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (done_at, next_at);
"""

COLUMNS = "id, name, url, event_types, created_at, updated_at, secret"


def endpoint_doc(row: tuple[Any, ...], with_secret: bool = False) -> dict[str, Any]:
    """An endpoint as OpenAI's API shows it: the secret only when made or rotated."""
    ident, name, url, kinds, created, updated, secret = row
    doc = {
        "id": ident,
        "object": "webhook_endpoint",
        "name": name,
        "url": url,
        "event_types": json.loads(kinds),
        "created_at": int(created),
        "updated_at": int(updated),
        "signing_secret_hint": f"{secret[:10]}...{secret[-4:]}",
    }
    if with_secret:
        doc["signing_secret"] = secret
    return doc


class WebhooksDB:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def add(
        self, owner: str, ident: str, name: str, url: str, secret: str, kinds: list[str]
    ) -> dict[str, Any]:
        now = time.time()
        self.db.execute(
            "INSERT INTO webhooks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (ident, owner, name, url, secret, json.dumps(kinds), now, now),
        )
        return self.get(owner, ident, with_secret=True) or {}

    def get(self, owner: str, ident: str, with_secret: bool = False) -> dict[str, Any] | None:
        row = self.db.execute(
            f"SELECT {COLUMNS} FROM webhooks WHERE id = ? AND owner = ?", (ident, owner)
        ).fetchone()
        return endpoint_doc(row, with_secret) if row else None

    def list(self, owner: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f"SELECT {COLUMNS} FROM webhooks WHERE owner = ? ORDER BY created_at", (owner,)
        ).fetchall()
        return [endpoint_doc(r) for r in rows]

    def delete(self, owner: str, ident: str) -> bool:
        cur = self.db.execute("DELETE FROM webhooks WHERE id = ? AND owner = ?", (ident, owner))
        return cur.rowcount > 0

    def rotate(self, owner: str, ident: str, secret: str) -> dict[str, Any] | None:
        self.db.execute(
            "UPDATE webhooks SET secret = ?, updated_at = ? WHERE id = ? AND owner = ?",
            (secret, time.time(), ident, owner),
        )
        return self.get(owner, ident, with_secret=True)

    def emit(self, owner: str, event_id: str, kind: str, response_id: str) -> int:
        """An event for every endpoint of `owner` that takes `kind`; how many."""
        rows = self.db.execute(
            "SELECT id, event_types FROM webhooks WHERE owner = ?", (owner,)
        ).fetchall()
        body = event_body(event_id, kind, response_id)
        targets = [
            (event_id, ident, body, time.time()) for ident, k in rows if kind in json.loads(k)
        ]
        self.db.executemany(
            "INSERT OR IGNORE INTO deliveries (event_id, endpoint, body, next_at)"
            " VALUES (?, ?, ?, ?)",
            targets,
        )
        return len(targets)

    def due(self, now: float, limit: int = 32) -> list[Delivery]:
        rows = self.db.execute(
            "SELECT d.event_id, d.endpoint, w.url, w.secret, d.body, d.attempts"
            " FROM deliveries d JOIN webhooks w ON w.id = d.endpoint"
            " WHERE d.done_at IS NULL AND d.next_at <= ? ORDER BY d.next_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return [Delivery(*r) for r in rows]

    def attempted(self, d: Delivery, error: str | None, retry_at: float | None) -> None:
        """One attempt's outcome: done (taken, or out of attempts), or due again."""
        done = None if error is not None and retry_at is not None else time.time()
        self.db.execute(
            "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, done_at = ?,"
            " next_at = COALESCE(?, next_at) WHERE event_id = ? AND endpoint = ?",
            (error, done, retry_at, d.event_id, d.endpoint),
        )

    def deliveries(self, owner: str, event_id: str) -> list[dict[str, Any]]:
        """What became of an event's deliveries (for operators and tests)."""
        rows = self.db.execute(
            "SELECT d.endpoint, d.attempts, d.done_at, d.last_error FROM deliveries d"
            " JOIN webhooks w ON w.id = d.endpoint WHERE d.event_id = ? AND w.owner = ?",
            (event_id, owner),
        ).fetchall()
        keys = ("endpoint", "attempts", "done_at", "last_error")
        return [dict(zip(keys, r, strict=True)) for r in rows]
