"""Usage metering: one record per request, durable before the client sees the end of its
answer, batched into day-partitioned Parquet files.

Records go first to a write-ahead segment (`_wal/segment-N.jsonl`, flushed and fsynced per
record). A flush turns the whole segment into `day=YYYY-MM-DD/part-N.parquet` files
(written to a temporary name, then renamed) and deletes the segment. File names derive
from the segment number, so replaying a segment left by a crash rewrites the same files:
no record is lost and none is counted twice. A day's parts are merged as a log-structured
store merges: eight of one size into one (`part-LO-HI.parquet`, segments LO to HI),
dropping any record present twice among them, up to `TOP_LEVEL` merges, so a merge never
reads more than a bounded slice of the day, however long the day has run.

The root is one hive-partitioned Parquet dataset for analysts' tools (pyarrow, DuckDB,
Spark): the write-ahead folder and temporary files start with `_` or `.`, which those
readers skip.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_app.gateway.usage_records import UsageRecord
from serve_app.gateway.usage_rollups import Rollups, Units, part_range, parts_units
from serve_app.gateway.usage_schema import SCHEMA

log = logging.getLogger("serve_app.gateway.usage_log")
COMPACT_AT = 8  # parts of one size in a day folder merged into one
TOP_LEVEL = 3  # parts this many merges up (8 ** 3 segments) are merged no further
ROW_GROUP = 8192  # rows of a merged part's row group


class MeterWriter:
    def __init__(self, root: Path, batch_size: int = 200) -> None:
        self.root = root
        self.wal_dir = root / "_wal"
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_legacy_wal()
        self.quarantined = 0  # bad records and files moved aside at start
        for folder in self.root.glob("day=*"):
            finish_compaction(folder)
            self._check_parts(folder)
        self.batch_size = batch_size
        self._pending: list[UsageRecord] = []  # durable in the log, not yet in Parquet
        # records the disk would not take (full, read-only, failing), oldest first: kept
        # here until it does, while `fault` says why (the gateway admits nothing new)
        self.backlog: collections.deque[UsageRecord] = collections.deque()
        self.fault: str | None = None
        # what the previous process had written before it ended: a settlement it took but
        # could not acknowledge comes again, and is recognised here
        self.recovered: set[tuple[str, float]] = set()
        self.rollups = Rollups(root)
        # days whose rollups are counted again from their parts, in a thread of their own
        # (minutes at 50M records: the gateway serves meanwhile, usage totals wait)
        self.recounting = self.rollups.stale(root)
        self.rebuilt = len(self.recounting)
        self._closing = threading.Event()
        self._recounter = threading.Thread(target=self._recount, name="usage-recount", daemon=True)
        self._recounter.start()
        self.recover()
        self.segment = self._next_segment()
        self._wal: TextIO | None = None  # opened by the first write

    def _recount(self) -> None:
        for day in list(self.recounting):
            if self._closing.is_set():
                return  # the day stays pending: the next start counts it
            try:
                self.rollups.recount(day, self.root)
            except Exception:  # pending still: the next start tries again
                log.exception("usage rollups of %s could not be counted again", day)
                return
            self.recounting.remove(day)

    def recounted(self, timeout_s: float | None = None) -> bool:
        """Wait for the days counted again at start; whether they all are."""
        self._recounter.join(timeout_s)
        return not self.recounting

    def _adopt_legacy_wal(self) -> None:
        """Segments of a version that kept them in `wal/` (which broke dataset readers)."""
        legacy = self.root / "wal"
        if legacy.is_dir():
            for seg in legacy.glob("segment-*.jsonl"):
                os.replace(seg, self.wal_dir / seg.name)
            legacy.rmdir()

    def _quarantine(self, name: str, data: bytes) -> None:
        """Keep what could not be read apart (`_quarantine/`, which readers skip)."""
        folder = self.root / "_quarantine"
        folder.mkdir(exist_ok=True)
        with open(folder / name, "ab") as f:
            f.write(data)

    def _check_parts(self, folder: Path) -> None:
        """Parts that do not read as Parquet (a damaged file) are moved aside, so every
        reader of the dataset keeps working; temporary files of a write that never
        finished are dropped (their records are still in the write-ahead log)."""
        for tmp in folder.glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)
        for part in folder.glob("part-*.parquet"):
            try:
                pq.read_metadata(part)
            except Exception as exc:
                log.error("usage part %s is damaged (%s): quarantined", part, exc)
                self._quarantine(f"{folder.name}-{part.name}", part.read_bytes())
                part.unlink()
                self.quarantined += 1

    def _segment_path(self, n: int) -> Path:
        return self.wal_dir / f"segment-{n:012d}.jsonl"

    def _segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.wal_dir.glob("segment-*.jsonl"))

    def _next_segment(self) -> int:
        done = [part_range(p)[1] for p in self.root.glob("day=*/part-*.parquet")]
        return max([*self._segments(), *done, -1]) + 1

    def recover(self) -> int:
        """Turn segments left by a previous process into Parquet. Returns records moved."""
        moved = 0
        for n in self._segments():
            path = self._segment_path(n)
            records = []
            for line in path.read_bytes().splitlines():
                try:
                    records.append(UsageRecord.model_validate_json(line))
                except ValueError:  # a torn line from a crash mid-write (never acked)
                    self._quarantine(f"{path.stem}.rejected", line + b"\n")
                    self.quarantined += 1
            self.recovered.update((r.request_id, r.time) for r in records)
            try:
                self._write_parquet(n, records)
            except OSError as exc:  # stays a segment (readers see it), moved next start
                log.error("segment %d not moved to Parquet: %s", n, exc)
                continue
            path.unlink()
            moved += len(records)
        return moved

    def append(self, record: UsageRecord) -> None:
        """Durable on return, or (the disk failing) held in the backlog, `fault` set."""
        self.add(record)
        self.heal()

    def add(self, record: UsageRecord) -> None:
        """Held for the next `heal`, which writes every record held at once."""
        self.backlog.append(record)

    def heal(self) -> bool:
        """Write what the backlog holds (one write and one fsync for all of it: several
        settlements' records at once); whether it is empty (and the fault cleared)."""
        if self.backlog:
            batch = list(self.backlog)
            try:
                self._write(batch)
            except OSError as exc:
                if self.fault is None:
                    log.error("the usage log cannot be written: %s", exc)
                self.fault = f"{exc.strerror or exc}"
                return False
            self.backlog.clear()
            self._pending.extend(batch)
        if self.fault is not None:
            log.warning("the usage log is writable again")
        self.fault = None
        if len(self._pending) >= self.batch_size:
            self.flush()
        return True

    def _write(self, records: list[UsageRecord]) -> None:
        """A line each in the write-ahead segment, fsynced; a failed write is cut back
        off, so no torn line stays in front of the next."""
        if self._wal is None:
            self._wal = open(self._segment_path(self.segment), "a")  # noqa: SIM115
        start = self._wal.tell()
        try:
            self._wal.write("".join(r.model_dump_json() + "\n" for r in records))
            self._wal.flush()
            os.fsync(self._wal.fileno())
        except OSError:
            self._reopen(start)
            raise

    def _reopen(self, length: int) -> None:
        """The segment cut to `length` bytes, and a fresh handle on it (the old one may
        hold unwritable buffered bytes)."""
        wal, self._wal = self._wal, None
        with contextlib.suppress(OSError, ValueError):
            wal.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            os.truncate(self._segment_path(self.segment), length)

    def flush(self) -> str | None:
        """The segment's records into Parquet; a disk that fails leaves them in the
        segment (durable) for the next flush, and why is returned."""
        if not self._pending:
            return None
        try:
            self._write_parquet(self.segment, self._pending)
        except OSError as exc:
            log.error("usage Parquet not written (kept in the log): %s", exc)
            return f"the usage Parquet files cannot be written ({exc.strerror or exc})"
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        self._segment_path(self.segment).unlink()
        self._pending = []
        self.segment += 1
        return None

    @property
    def unflushed(self) -> list[UsageRecord]:
        """The records durable in the log and not yet in the rollups (a copy)."""
        return list(self._pending)

    def compact(self) -> int:
        """Merge the day folders' parts, eight of a size at a time; how many duplicate
        records went."""
        dropped = 0
        for folder in sorted(self.root.glob("day=*")):
            if folder.name.removeprefix("day=") in self.recounting:
                continue  # its parts stay as they are until its sums are counted
            while group := mergeable(folder):
                dropped += merge_parts(folder, group, self.rollups)
        return dropped

    def close(self) -> None:
        self.heal()
        self.flush()
        if self._wal is not None:
            self._wal.close()
        with_empty = self._segment_path(self.segment)
        if with_empty.exists() and with_empty.stat().st_size == 0:
            with_empty.unlink()
        self._closing.set()
        self._recounter.join()  # ends after the day it counts
        self.rollups.close()

    def _write_parquet(self, segment: int, records: list[UsageRecord]) -> None:
        """The segment's records as one part per day, each counted in the rollups."""
        by_day: dict[str, list[dict]] = {}
        for r in records:
            row = r.model_dump()
            row["time"] = datetime.fromtimestamp(r.time, UTC)
            by_day.setdefault(r.day, []).append(row)
        for day, rows in by_day.items():
            folder = self.root / f"day={day}"
            folder.mkdir(exist_ok=True)
            final = folder / f"part-{segment:012d}.parquet"
            tmp = folder / f".part-{segment:012d}.parquet.tmp"
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            try:
                pq.write_table(table, tmp)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, final)
            self.rollups.add(day, segment, table)


def level(part: Path) -> int:
    """How many merges made a part (by the segments it spans: 1, 8, 64...), at most
    `TOP_LEVEL`."""
    lo, hi = part_range(part)
    merges, span = 0, hi - lo + 1
    while span >= COMPACT_AT and merges < TOP_LEVEL:
        span //= COMPACT_AT
        merges += 1
    return merges


def mergeable(folder: Path) -> list[Path]:
    """The oldest run of `COMPACT_AT` neighbouring parts (in segment order) of one level
    below the top; none if there is no such run. Neighbours only: no other part's range
    then lies inside the merged one, which is how a start after a crash tells the parts
    a merge already holds (`finish_compaction`)."""
    parts = sorted(folder.glob("part-*.parquet"), key=part_range)
    levels = [level(p) for p in parts]
    for i in range(len(parts) - COMPACT_AT + 1):
        run = levels[i : i + COMPACT_AT]
        if run[0] < TOP_LEVEL and run.count(run[0]) == COMPACT_AT:
            return parts[i : i + COMPACT_AT]
    return []


def merge_parts(folder: Path, parts: list[Path], rollups: Rollups) -> int:
    """One file for `parts`; records present twice among them (same request id and
    time: a settlement repeated by a crash) kept once, taken off the day's rollups. The
    merged file is in place before the parts go, so a crash between leaves a duplicate
    range that the next start removes (`finish_compaction`)."""
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in parts])
    # the first row of each (request id, time), in Arrow: no Python object per record
    rows = table.select(["request_id", "time"]).append_column("row", pa.array(range(len(table))))
    first = rows.group_by(["request_id", "time"], use_threads=False).aggregate([("row", "min")])
    keep = first["row_min"].sort()
    kept = table.take(keep)
    lo, hi = part_range(parts[0])[0], max(part_range(p)[1] for p in parts)
    held = parts_units(parts)  # what the merged part holds, named in its metadata
    if len(kept) < len(table):
        twice = pc.invert(pc.is_in(rows["row"], value_set=keep))
        rollups.fix(folder.name.removeprefix("day="), lo, hi, table.filter(twice))
        held = held | Units(fixes={(lo, hi)})
    tmp = folder / f".part-{lo:012d}-{hi:012d}.parquet.tmp"
    # by key, in row groups: a scan for one key's records skips the others' row groups
    kept = kept.sort_by([("key_id", "ascending"), ("time", "ascending")])
    pq.write_table(kept.replace_schema_metadata(held.metadata()), tmp, row_group_size=ROW_GROUP)
    os.replace(tmp, folder / f"part-{lo:012d}-{hi:012d}.parquet")
    finish_compaction(folder)
    dropped = len(table) - len(kept)
    if dropped:
        log.warning("compaction of %s dropped %d duplicate records", folder.name, dropped)
    return dropped


def finish_compaction(folder: Path) -> None:
    """Delete the parts a compacted file of the folder already holds."""
    parts = list(folder.glob("part-*.parquet"))
    ranges = [part_range(p) for p in parts if p.name.count("-") == 2]
    for part in parts:
        lo, hi = part_range(part)
        if any(a <= lo and hi <= b and (lo, hi) != (a, b) for a, b in ranges):
            part.unlink()


def read_usage(root: Path) -> pa.Table:
    """All flushed records (Parquet) plus those still in write-ahead segments."""
    parts = sorted(root.glob("day=*/part-*.parquet"))
    tables = [pq.read_table(p, schema=SCHEMA) for p in parts]
    return pa.concat_tables([*tables, pending_usage(root)])


def pending_usage(root: Path) -> pa.Table:
    """The records still in write-ahead segments (not yet in Parquet)."""
    return records_table([r for rs in pending_segments(root).values() for r in rs])


def records_table(records: list[UsageRecord]) -> pa.Table:
    rows = []
    for rec in records:
        row = rec.model_dump()
        row["time"] = datetime.fromtimestamp(rec.time, UTC)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def pending_segments(root: Path) -> dict[Path, list[UsageRecord]]:
    """Each write-ahead segment's records (read by a process other than the meter's)."""
    out: dict[Path, list[UsageRecord]] = {}
    wal = root / "_wal"
    for seg in sorted(wal.glob("segment-*.jsonl")) if wal.exists() else []:
        out[seg] = records = []
        with contextlib.suppress(FileNotFoundError):  # flushed meanwhile: in Parquet now
            for line in seg.read_bytes().splitlines():
                with contextlib.suppress(ValueError):  # a torn line, never acknowledged
                    records.append(UsageRecord.model_validate_json(line))
    return out
