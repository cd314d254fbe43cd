"""Stored responses and conversations in SQLite: the server-side memory of agent sessions.

Every row belongs to an owner (a key id); every read and write names the owner, so
another key's id is simply not found. A response keeps its input items and its answer
(the Response object), and names the response it continued: a chain is rebuilt by
walking back from its last link, so a long session stores each turn once. Rows expire
after a TTL (a sweeper deletes them), and each owner has a byte quota: storing past it
evicts that owner's oldest responses first.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.store.webhooks_db import WebhooksDB

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    previous TEXT,
    session TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    bytes INTEGER NOT NULL,
    doc TEXT NOT NULL,
    inputs TEXT NOT NULL,
    heartbeat REAL  -- a background run's last sign of life; NULL once it ended
);
CREATE INDEX IF NOT EXISTS responses_owner ON responses (owner, created_at);
CREATE INDEX IF NOT EXISTS responses_running ON responses (heartbeat);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_expiry ON conversations (expires_at);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    owner TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    item TEXT NOT NULL,
    UNIQUE (conversation, id)
);
CREATE INDEX IF NOT EXISTS items_owner ON items (owner);
"""

CHAIN_LIMIT = 10_000  # links followed back at most; a loop cannot be made, this is a fuse
RUN_LOST_S = 30.0  # a background run silent this long died with its router replica
RUNNING = ("queued", "in_progress")
LOST = {
    "code": "server_error",
    "message": "the background run was lost (its router replica stopped); create it again",
}


class QuotaExceeded(Exception):
    """One item alone is larger than the owner's whole quota."""


class ItemIdTaken(Exception):
    """An item's id is already one of its conversation's."""


@dataclass(frozen=True)
class StoredResponse:
    id: str
    session: str | None
    doc: dict[str, Any]
    inputs: list[dict[str, Any]]


@dataclass(frozen=True)
class StoreLimits:
    ttl_s: float
    quota_bytes: int


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class ResponsesDB:
    def __init__(self, path: Path, limits: StoreLimits) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.webhooks = WebhooksDB(self.db)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db)

    # ---- responses -------------------------------------------------------------------

    def put_response(
        self,
        owner: str,
        stored: StoredResponse,
        previous: str | None,
        now: float | None = None,
    ) -> None:
        """Store, or replace: a background run is written when it starts and when it
        ends (a run cancelled meanwhile stays cancelled, with what it had written)."""
        now = time.time() if now is None else now
        running = stored.doc.get("status") in RUNNING
        with self._tx() as db:
            row = db.execute(
                "SELECT created_at, bytes, json_extract(doc, '$.status') FROM responses"
                " WHERE id = ? AND owner = ?",
                (stored.id, owner),
            ).fetchone()
            created, replaced, status = row if row else (now, 0, None)
            if status == "cancelled":
                stored.doc["status"] = "cancelled"
            doc, inputs = dumps(stored.doc), dumps(stored.inputs)
            size = len(doc) + len(inputs)
            self._make_room(db, owner, size - replaced, keep=stored.id)
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    owner,
                    previous,
                    stored.session,
                    created,
                    created + self.limits.ttl_s,
                    size,
                    doc,
                    inputs,
                    now if running else None,
                ),
            )

    def touch(self, owner: str, response_id: str) -> str | None:
        """A background run's sign of life; the response's status (`cancelled` tells the
        run to stop), None if it is gone."""
        with self._tx() as db:
            db.execute(
                "UPDATE responses SET heartbeat = ? WHERE id = ? AND owner = ?"
                " AND heartbeat IS NOT NULL",
                (time.time(), response_id, owner),
            )
            row = db.execute(
                "SELECT json_extract(doc, '$.status') FROM responses WHERE id = ? AND owner = ?",
                (response_id, owner),
            ).fetchone()
        return row[0] if row else None

    def cancel_response(self, owner: str, response_id: str) -> StoredResponse | None:
        """Mark a queued or running response cancelled (its run stops at its next sign of
        life); one that ended stays as it is."""
        with self._tx() as db:
            db.execute(
                "UPDATE responses SET doc = json_set(doc, '$.status', 'cancelled')"
                " WHERE id = ? AND owner = ? AND json_extract(doc, '$.status') IN (?, ?)",
                (response_id, owner, *RUNNING),
            )
        return self.get_response(owner, response_id)

    def reap_lost_runs(self, now: float | None = None) -> int:
        """Background runs whose router replica died: failed, with the reason."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute(
                "UPDATE responses SET heartbeat = NULL, doc = json_set(doc, '$.status',"
                " 'failed', '$.error', json(?)) WHERE heartbeat < ?"
                " AND json_extract(doc, '$.status') IN (?, ?)",
                (dumps(LOST), now - RUN_LOST_S, *RUNNING),
            ).rowcount

    def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        self.reap_lost_runs()
        row = self.db.execute(
            "SELECT id, session, doc, inputs FROM responses"
            " WHERE id = ? AND owner = ? AND expires_at > ?",
            (response_id, owner, time.time()),
        ).fetchone()
        return (
            StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3])) if row else None
        )

    def chain(self, owner: str, response_id: str) -> list[StoredResponse] | None:
        """The responses from the first of the chain to `response_id`, oldest first; None
        if `response_id` is not the owner's. A chain whose older links expired or were
        deleted starts at the oldest link still stored."""
        rows = self.db.execute(
            """
            WITH RECURSIVE chain (id, previous, depth) AS (
                SELECT id, previous, 0 FROM responses
                WHERE id = ? AND owner = ? AND expires_at > ?
                UNION ALL
                SELECT r.id, r.previous, c.depth + 1 FROM responses r
                JOIN chain c ON r.id = c.previous
                WHERE r.owner = ? AND r.expires_at > ? AND c.depth < ?
            )
            SELECT r.id, r.session, r.doc, r.inputs FROM chain c
            JOIN responses r ON r.id = c.id ORDER BY c.depth DESC
            """,
            (response_id, owner, time.time(), owner, time.time(), CHAIN_LIMIT),
        ).fetchall()
        if not rows:
            return None
        return [StoredResponse(r[0], r[1], json.loads(r[2]), json.loads(r[3])) for r in rows]

    def delete_response(self, owner: str, response_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
            )
        return cur.rowcount > 0

    # ---- conversations ---------------------------------------------------------------

    def create_conversation(
        self,
        owner: str,
        conversation_id: str,
        metadata: dict[str, str],
        items: list[dict[str, Any]],
        now: float | None = None,
    ) -> float:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                (conversation_id, owner, now, now + self.limits.ttl_s, dumps(metadata)),
            )
            self._add_items(db, owner, conversation_id, items)
        return now

    def conversation(self, owner: str, conversation_id: str) -> tuple[float, dict] | None:
        row = self.db.execute(
            "SELECT created_at, metadata FROM conversations"
            " WHERE id = ? AND owner = ? AND expires_at > ?",
            (conversation_id, owner, time.time()),
        ).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def update_conversation(self, owner: str, conversation_id: str, metadata: dict) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE conversations SET metadata = ?, expires_at = ?"
                " WHERE id = ? AND owner = ? AND expires_at > ?",
                (
                    dumps(metadata),
                    time.time() + self.limits.ttl_s,
                    conversation_id,
                    owner,
                    time.time(),
                ),
            )
        return cur.rowcount > 0

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            )
        return cur.rowcount > 0

    def add_items(self, owner: str, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Append items (each with its `id`); a conversation in use lives another TTL."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE conversations SET expires_at = ?"
                " WHERE id = ? AND owner = ? AND expires_at > ?",
                (time.time() + self.limits.ttl_s, conversation_id, owner, time.time()),
            )
            if cur.rowcount == 0:
                return False
            self._add_items(db, owner, conversation_id, items)
        return True

    def _add_items(
        self, db: sqlite3.Connection, owner: str, conversation_id: str, items: list[dict]
    ) -> None:
        rows = [(conversation_id, i["id"], owner, dumps(i)) for i in items]
        self._make_room(db, owner, sum(len(r[3]) for r in rows))
        try:
            db.executemany(
                "INSERT INTO items (conversation, id, owner, bytes, item) VALUES (?, ?, ?, ?, ?)",
                [(c, i, o, len(item), item) for c, i, o, item in rows],
            )
        except sqlite3.IntegrityError:  # UNIQUE (conversation, id): the transaction rolls back
            raise ItemIdTaken(
                "an item with one of these ids is already in the conversation"
            ) from None

    def items(
        self,
        owner: str,
        conversation_id: str,
        after: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]] | None:
        """A conversation's items in order (None if it is not the owner's)."""
        if self.conversation(owner, conversation_id) is None:
            return None
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT seq, id, item FROM items WHERE conversation = ? ORDER BY seq {order}"
        rows = self.db.execute(sql, (conversation_id,)).fetchall()
        if after is not None:
            at = next((n for n, r in enumerate(rows) if r[1] == after), None)
            rows = rows[at + 1 :] if at is not None else []
        if limit is not None:
            rows = rows[:limit]
        return [json.loads(r[2]) for r in rows]

    def delete_item(self, owner: str, conversation_id: str, item_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM items WHERE conversation = ? AND id = ? AND owner = ?",
                (conversation_id, item_id, owner),
            )
        return cur.rowcount > 0

    # ---- bounds ----------------------------------------------------------------------

    def used_bytes(self, owner: str) -> int:
        (responses,) = self.db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM responses WHERE owner = ?", (owner,)
        ).fetchone()
        (items,) = self.db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM items WHERE owner = ?", (owner,)
        ).fetchone()
        return int(responses) + int(items)

    def _make_room(
        self, db: sqlite3.Connection, owner: str, size: int, keep: str | None = None
    ) -> None:
        """Evict the owner's oldest responses until `size` more bytes fit its quota."""
        quota = self.limits.quota_bytes
        if size > quota:  # (a replaced row's size is already taken off `size`)
            raise QuotaExceeded(f"{size} bytes exceed the storage quota of {quota} bytes")
        over = self.used_bytes(owner) + size - quota
        if over <= 0:
            return
        oldest = db.execute(
            "SELECT id, bytes FROM responses WHERE owner = ? AND id IS NOT ? ORDER BY created_at",
            (owner, keep),
        )
        doomed = []
        for response_id, nbytes in oldest:
            if over <= 0:
                break
            doomed.append((response_id,))
            over -= nbytes
        if over > 0:
            raise QuotaExceeded(f"the storage quota of {quota} bytes is used by conversations")
        db.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def sweep(self, now: float | None = None) -> int:
        """Delete what expired; how many rows went."""
        now = time.time() if now is None else now
        with self._tx() as db:
            gone = db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,)).rowcount
            gone += db.execute("DELETE FROM conversations WHERE expires_at <= ?", (now,)).rowcount
        return gone

    def delete_owner(self, owner: str) -> int:
        """Everything a key stored (when the key is revoked)."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM responses WHERE owner = ?", (owner,)).rowcount
            gone += db.execute("DELETE FROM conversations WHERE owner = ?", (owner,)).rowcount
            gone += db.execute("DELETE FROM webhooks WHERE owner = ?", (owner,)).rowcount
        return gone

    def close(self) -> None:
        self.db.close()
