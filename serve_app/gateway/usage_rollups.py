"""Usage rollups: requests, tokens and cost summed per day and per key, plan, tier,
model, endpoint, API, session, service tier and status, kept beside the raw records so
that a usage query reads sums (one key's by an index), never the history.

The sums live in SQLite (`usage/_rollups.db`, which analysts' readers of the usage root
skip), updated in one transaction with the note of what they account for (`Units`): each
Parquet part the meter writes adds its records' sums and its segment, once; a merge of
parts that drops records present twice first takes their sums off and notes the merge
(`fixes`). A merged part names in its metadata the segments and fixes it holds, so a
start can tell, day by day, whether the sums account for exactly the parts there are, and
counts a day again from its parts where they do not (a crash between a fix and its merge,
the rollups lost or damaged, or a dataset older than them). Counting again happens beside
the meter's writes, not before them (at 50M records it takes minutes): the days it has
left are noted (`pending`), and a reader of the sums is told (`Recounting`) instead of
being given short totals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serve_app.gateway.keys import intact
from serve_app.gateway.usage_schema import SCHEMA

log = logging.getLogger("serve_app.gateway.usage_rollups")

FILE = "_rollups.db"
DIMENSIONS = [
    "key_id", "plan", "tier", "model", "endpoint", "api", "session_id", "service_tier", "status",
]  # fmt: skip
SUMS = [
    "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "media_tokens",
    "cost_usd",
]  # fmt: skip
UNITS_KEY = b"kimi.units"  # in a merged part's metadata: what it holds
NO_SESSION = ""  # SQLite keys hold no NULL as one value: a request without a session


class Recounting(Exception):
    """The sums are being counted again from the records: `pending` days are not yet."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} days of usage are being counted again from the records")
        self.pending = pending

    def __reduce__(self) -> tuple[type[Recounting], tuple[int]]:  # across processes
        return Recounting, (self.pending,)


def rollup(records: pa.Table) -> pa.Table:
    """Records (or sums of them: a table with `requests`) summed per dimension:
    `requests` and each of `SUMS`."""
    count = ("requests", "sum") if "requests" in records.column_names else ("request_id", "count")
    grouped = records.select([*DIMENSIONS, count[0], *SUMS])
    aggs = [count, *((c, "sum") for c in SUMS)]
    grouped = grouped.group_by(DIMENSIONS, use_threads=False).aggregate(aggs)
    return pa.table(
        {
            **{d: grouped[d] for d in DIMENSIONS},
            "requests": grouped["_".join(count)],
            **{c: grouped[f"{c}_sum"] for c in SUMS},
        }
    )


def to_ranges(numbers: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def from_ranges(ranges: list[list[int]]) -> set[int]:
    return {n for lo, hi in ranges for n in range(lo, hi + 1)}


@dataclass
class Units:
    """What a rollup accounts for, or a part holds: segments (each segment's records of
    its day) and fixes (the duplicates a merge of parts `LO-HI` dropped)."""

    segments: set[int] = field(default_factory=set)
    fixes: set[tuple[int, int]] = field(default_factory=set)

    def metadata(self) -> dict[bytes, bytes]:
        units = {"segments": to_ranges(self.segments), "fixes": sorted(self.fixes)}
        return {UNITS_KEY: json.dumps(units).encode()}

    @classmethod
    def parse(cls, raw: bytes) -> Units:
        units = json.loads(raw)
        return cls(from_ranges(units["segments"]), {(a, b) for a, b in units["fixes"]})

    @classmethod
    def of(cls, path: Path) -> Units:
        return cls.parse((pq.read_schema(path).metadata or {})[UNITS_KEY])

    @property
    def name(self) -> str:
        return f"r-{min(self.segments):012d}-{max(self.segments):012d}"

    def within(self, other: Units) -> bool:
        return self.segments <= other.segments and self.fixes <= other.fixes

    def __or__(self, other: Units) -> Units:
        return Units(self.segments | other.segments, self.fixes | other.fixes)


def part_range(part: Path) -> tuple[int, int]:
    """The segments a part spans: `part-N` one, `part-LO-HI` a merged range."""
    numbers = [int(n) for n in part.name.removesuffix(".parquet").split("-")[1:]]
    return numbers[0], numbers[-1]


def part_units(part: Path) -> Units:
    """What a part holds: its own segment, or (a merged part) the segments and the fixes
    its metadata lists; every segment of its range for a part merged before that."""
    lo, hi = part_range(part)
    if lo == hi:
        return Units({lo})
    meta = pq.read_schema(part).metadata or {}
    if UNITS_KEY in meta:
        return Units.parse(meta[UNITS_KEY])
    return Units(set(range(lo, hi + 1)))


def parts_units(parts: list[Path]) -> Units:
    units = Units()
    for p in parts:
        units = units | part_units(p)
    return units


class Rollups:
    """The rollups of one usage root, as its meter keeps them."""

    def __init__(self, root: Path) -> None:
        self.path = root / FILE
        if self.path.exists() and not intact(self.path):  # derived data: counted again
            log.error("usage rollups %s damaged: set aside, counted again", self.path)
            aside = root / "_quarantine" / f"{FILE}.{int(time.time())}"
            aside.parent.mkdir(exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # a commit is not fsynced: the parts are the record, a power cut costs a recount
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB: a day counted again in one go
        dims = ", ".join(
            f"{d} {'INTEGER' if d == 'status' else 'TEXT'} NOT NULL" for d in DIMENSIONS
        )
        sums = ", ".join(f"{c} {'REAL' if c == 'cost_usd' else 'INTEGER'} NOT NULL" for c in SUMS)
        self.db.executescript(
            f"""CREATE TABLE IF NOT EXISTS sums (
                {dims}, day TEXT NOT NULL, requests INTEGER NOT NULL, {sums},
                PRIMARY KEY (key_id, day, {", ".join(DIMENSIONS[1:])})) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS sums_by_day ON sums (day);
            CREATE TABLE IF NOT EXISTS segments (
                day TEXT NOT NULL, segment INTEGER NOT NULL, PRIMARY KEY (day, segment)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS fixes (
                day TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
                PRIMARY KEY (day, lo, hi)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS pending (day TEXT PRIMARY KEY) WITHOUT ROWID;"""
        )
        # the meter's thread and the one counting days again share the connection
        self.lock = threading.RLock()
        names = [*DIMENSIONS, "day", "requests", *SUMS]
        added = ", ".join(f"{c} = {c} + excluded.{c}" for c in ("requests", *SUMS))
        self._upsert = (
            f"INSERT INTO sums ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            f" ON CONFLICT DO UPDATE SET {added}"
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; SQLite's failures (a full disk) as the OSError of any write
        of the meter, so the records stay in the log for the next try."""
        try:
            with self.lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OSError(f"the usage rollups cannot be written: {exc}") from exc

    def _add_sums(self, day: str, records: pa.Table, sign: int = 1) -> None:
        # in the table's key order: the B-tree is written where it was last read
        sums = rollup(records).sort_by([(c, "ascending") for c in DIMENSIONS])
        n = len(DIMENSIONS)
        rows = zip(*(sums[c].to_pylist() for c in sums.column_names), strict=True)
        self.db.executemany(
            self._upsert,
            (
                (*(NO_SESSION if v is None else v for v in r[:n]), day, *(sign * v for v in r[n:]))
                for r in rows
            ),
        )

    def add(self, day: str, segment: int, records: pa.Table) -> None:
        """The records of the part `segment` wrote for `day`, once (a segment written
        again after a crash is counted already)."""
        with self._transaction() as db:
            seen = "SELECT 1 FROM segments WHERE day = ? AND segment = ?"
            if db.execute(seen, (day, segment)).fetchone() is None:
                self._add_sums(day, records)
                db.execute("INSERT INTO segments VALUES (?, ?)", (day, segment))

    def fix(self, day: str, lo: int, hi: int, dropped: pa.Table) -> None:
        """What a merge of parts `lo..hi` drops, taken off, before the merged part is in
        place (a merge cut short between leaves the day to be counted again at start)."""
        with self._transaction() as db:
            seen = "SELECT 1 FROM fixes WHERE day = ? AND lo = ? AND hi = ?"
            if db.execute(seen, (day, lo, hi)).fetchone() is None:
                self._add_sums(day, dropped, sign=-1)
                db.execute("INSERT INTO fixes VALUES (?, ?, ?)", (day, lo, hi))

    def units(self, day: str) -> Units:
        """What the day's sums account for."""
        with self.lock:
            segments = self.db.execute("SELECT segment FROM segments WHERE day = ?", (day,))
            fixes = self.db.execute("SELECT lo, hi FROM fixes WHERE day = ?", (day,))
            return Units({s for (s,) in segments}, {(lo, hi) for lo, hi in fixes})

    def stale(self, usage_root: Path) -> list[str]:
        """The days whose sums do not account for exactly their parts (and those a
        recount left unfinished), noted as pending, newest first."""
        days = {p.name.removeprefix("day=") for p in usage_root.glob("day=*")}
        with self.lock:
            days |= {d for (d,) in self.db.execute("SELECT DISTINCT day FROM segments")}
            left = {d for (d,) in self.db.execute("SELECT day FROM pending")}
        stale = sorted(
            (
                d
                for d in days
                if d in left or self.units(d) != parts_units(day_parts(usage_root, d))
            ),
            reverse=True,
        )
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO pending VALUES (?)", ((d,) for d in stale))
        return stale

    def reconcile(self, usage_root: Path) -> int:
        """Each day's sums made to account for exactly its parts, now; how many days
        were counted again from their parts."""
        stale = self.stale(usage_root)
        for day in stale:
            self.recount(day, usage_root)
        return len(stale)

    def recount(self, day: str, usage_root: Path) -> None:
        """The day's sums counted again from its parts, one part at a time, beside the
        meter's writes: counted outside the lock, then put in place in one transaction
        with the sums of any part written meanwhile. (Parts are only added while a day is
        pending: the meter does not merge them until it is counted.)"""
        parts = day_parts(usage_root, day)
        log.warning("usage rollups of %s counted again from its %d parts", day, len(parts))
        sums = [rollup(read_part(p)) for p in parts]  # a part at a time, in Arrow
        with self._transaction() as db:
            now = day_parts(usage_root, day)
            sums += [rollup(read_part(p)) for p in now if p not in set(parts)]
            units = parts_units(now)  # the parts' fixes are in their records already
            for table in ("sums", "segments", "fixes", "pending"):
                db.execute(f"DELETE FROM {table} WHERE day = ?", (day,))
            if sums:
                self._add_sums(day, pa.concat_tables(sums))
            db.executemany("INSERT INTO segments VALUES (?, ?)", ((day, s) for s in units.segments))
            db.executemany("INSERT INTO fixes VALUES (?, ?, ?)", ((day, *f) for f in units.fixes))

    def pending(self) -> set[str]:
        with self.lock:
            return {d for (d,) in self.db.execute("SELECT day FROM pending")}

    def close(self) -> None:
        with self.lock:
            self.db.close()


def day_parts(usage_root: Path, day: str) -> list[Path]:
    return sorted((usage_root / f"day={day}").glob("part-*.parquet"))


def read_part(part: Path) -> pa.Table:
    """The columns of a part that a rollup sums."""
    return pq.read_table(part, schema=SCHEMA, columns=[*DIMENSIONS, "request_id", *SUMS])


_readers = threading.local()


def reader(path: Path) -> sqlite3.Connection:
    """This thread's connection to the rollups (a new one costs more than a query: the
    schema is read again), made again for another file or where the file was replaced."""
    held = (path, path.stat().st_ino)
    if getattr(_readers, "held", None) != held:
        if (old := getattr(_readers, "db", None)) is not None:
            old.close()
        _readers.db = sqlite3.connect(path, check_same_thread=False)
        _readers.held = held
    return _readers.db


def counted_of(db: sqlite3.Connection, segments: Iterable[int]) -> set[tuple[str, int]]:
    """Which of `segments` the sums count, as (day, segment)."""
    wanted = sorted(set(segments))
    if not wanted:
        return set()
    marks = ", ".join("?" * len(wanted))
    query = f"SELECT day, segment FROM segments WHERE segment IN ({marks})"
    return {(day, segment) for day, segment in db.execute(query, wanted)}


def summed(
    usage_root: Path, by: list[str], key_id: str | None, segments: Iterable[int] = ()
) -> tuple[list[dict], set[tuple[str, int]]]:
    """The sums grouped by `by` (dimensions and `day`), for one key (found by the index)
    or all, on a connection of its own (a reader beside the meter's writes); and which
    of `segments` (write-ahead segments whose records the caller holds) the sums already
    count, as (day, segment): read as of one moment, so the caller adds exactly the
    records they do not."""
    if unknown := set(by) - {*DIMENSIONS, "day"}:
        raise ValueError(f"the rollups hold no {sorted(unknown)}")
    path = usage_root / FILE
    if not path.exists():
        return [], set()
    cols = ", ".join(by)
    totals = ", ".join(f"SUM({c}) AS {c}" for c in ("requests", *SUMS))
    where, args = ("WHERE key_id = ?", (key_id,)) if key_id is not None else ("", ())
    grouped = f"SELECT {cols}, {totals} FROM sums {where} GROUP BY {cols}"
    # one row of JSON, not a row per group: each row fetched is a GIL handoff, which
    # waits for the gateway's loop to let go (up to 5 ms) while admissions keep it busy
    names = [*by, "requests", *SUMS]
    query = f"SELECT json_group_array(json_array({', '.join(names)})) FROM ({grouped})"
    db = reader(path)
    db.execute("BEGIN")  # the pending days and the sums read as of one moment
    try:
        with contextlib.suppress(sqlite3.OperationalError):  # no such table: written before
            [(pending,)] = db.execute("SELECT COUNT(*) FROM pending").fetchall()
            if pending:
                raise Recounting(pending)
        [(found,)] = db.execute(query, args).fetchall()
        counted = counted_of(db, segments)
    finally:
        db.execute("COMMIT")
    rows = [dict(zip(names, r, strict=True)) for r in json.loads(found)]
    for r in rows:
        if r.get("session_id") == NO_SESSION:
            r["session_id"] = None
    return rows, counted
