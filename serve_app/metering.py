"""Usage metering: one record per request, durable before the client sees the end of its
answer, batched into day-partitioned Parquet files.

Records go first to a write-ahead segment (`wal/segment-N.jsonl`, flushed and fsynced per
record). A flush turns the whole segment into `day=YYYY-MM-DD/part-N.parquet` files
(written to a temporary name, then renamed) and deletes the segment. File names derive
from the segment number, so replaying a segment left by a crash rewrites the same files:
no record is lost and none is counted twice.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel


class RequestLabels(BaseModel):
    """Who asked for what, and which tier served it."""

    request_id: str
    key_id: str
    plan: str
    tier: str
    model: str
    endpoint: str
    stream: bool
    degraded: bool = False
    api: str = "openai"  # the wire format it came in (openai, anthropic)
    session_id: str | None = None  # the client's conversation, where it names one


class UsageRecord(RequestLabels):
    time: float
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    error: str | None = None

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.time, UTC).strftime("%Y-%m-%d")


# The Parquet columns are the record's fields (one definition: a field added to the model
# is a column); these two keep a type of their own: `time` is Unix seconds in the record
# and a UTC timestamp for analysts, `status` an HTTP status.
ARROW_TYPES: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    str: pa.string(),
}
COLUMN_TYPES = {"time": pa.timestamp("ms", tz="UTC"), "status": pa.int32()}


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """`time` first, then the fields in the model's order."""
    columns = []
    for name, info in model.model_fields.items():
        base = next(a for a in (*get_args(info.annotation), info.annotation) if a in ARROW_TYPES)
        columns.append(pa.field(name, COLUMN_TYPES.get(name, ARROW_TYPES[base])))
    columns.sort(key=lambda f: f.name != "time")
    return pa.schema(columns)


SCHEMA = arrow_schema(UsageRecord)


class MeterWriter:
    def __init__(self, root: Path, batch_size: int = 200) -> None:
        self.root = root
        self.wal_dir = root / "wal"
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self._pending: list[UsageRecord] = []
        # what the previous process had written before it ended: a settlement it took but
        # could not acknowledge comes again, and is recognised here
        self.recovered: set[tuple[str, float]] = set()
        self.recover()
        self.segment = self._next_segment()
        self._wal = open(self._segment_path(self.segment), "a")  # noqa: SIM115

    def _segment_path(self, n: int) -> Path:
        return self.wal_dir / f"segment-{n:012d}.jsonl"

    def _segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.wal_dir.glob("segment-*.jsonl"))

    def _next_segment(self) -> int:
        done = [int(p.stem.split("-")[1]) for p in self.root.glob("day=*/part-*.parquet")]
        return max([*self._segments(), *done, -1]) + 1

    def recover(self) -> int:
        """Turn segments left by a previous process into Parquet. Returns records moved."""
        moved = 0
        for n in self._segments():
            path = self._segment_path(n)
            records = []
            for line in path.read_text().splitlines():
                try:
                    records.append(UsageRecord.model_validate_json(line))
                except ValueError:
                    continue  # a torn last line from a crash mid-write: it was never acked
            self._write_parquet(n, records)
            path.unlink()
            moved += len(records)
            self.recovered.update((r.request_id, r.time) for r in records)
        return moved

    def append(self, record: UsageRecord) -> None:
        """Durable on return."""
        self._wal.write(record.model_dump_json() + "\n")
        self._wal.flush()
        os.fsync(self._wal.fileno())
        self._pending.append(record)
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self._wal.close()
        self._write_parquet(self.segment, self._pending)
        self._segment_path(self.segment).unlink()
        self._pending = []
        self.segment += 1
        self._wal = open(self._segment_path(self.segment), "a")  # noqa: SIM115

    def close(self) -> None:
        self.flush()
        self._wal.close()
        with_empty = self._segment_path(self.segment)
        if with_empty.exists() and with_empty.stat().st_size == 0:
            with_empty.unlink()

    def _write_parquet(self, segment: int, records: list[UsageRecord]) -> None:
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
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
            os.replace(tmp, final)


def read_usage(root: Path) -> pa.Table:
    """All flushed records (Parquet) plus those still in write-ahead segments."""
    parts = sorted(root.glob("day=*/part-*.parquet"))
    tables = [pq.read_table(p, schema=SCHEMA) for p in parts]
    pending = []
    for seg in sorted((root / "wal").glob("segment-*.jsonl")) if (root / "wal").exists() else []:
        for line in seg.read_text().splitlines():
            try:
                rec = UsageRecord.model_validate_json(line)
            except ValueError:
                continue
            row = rec.model_dump()
            row["time"] = datetime.fromtimestamp(rec.time, UTC)
            pending.append(row)
    if pending:
        tables.append(pa.Table.from_pylist(pending, schema=SCHEMA))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
