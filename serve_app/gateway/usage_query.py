"""Usage read back: grouped totals and the latest records, for one key or all.

Totals by the rollups' dimensions come from the rollups (`usage_rollups.py`), plus the
records still in the write-ahead log: a query reads sums, not the history. Other
groupings (the CLI may group by any column) read the records. The latest records are
read day by day, newest first, one key's rows picked in the scan, until there are enough.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from serve_app.gateway.usage_log import (
    pending_segments,
    pending_usage,
    read_usage,
    records_table,
)
from serve_app.gateway.usage_records import UsageRecord
from serve_app.gateway.usage_rollups import DIMENSIONS, FILE, SUMS, summed
from serve_app.gateway.usage_schema import SCHEMA

# What usage can be grouped by: the record's columns, `day`, and `session` for session_id.
GROUPS = {"day", "session", *(f for f in UsageRecord.model_fields if f not in ("time",))}
ROLLED = {"day", "session", *DIMENSIONS}  # the groupings the rollups answer


def with_day(table: pa.Table) -> pa.Table:
    return table.append_column("day", pc.strftime(table["time"], format="%Y-%m-%d"))


def of_key(table: pa.Table, key_id: str | None) -> pa.Table:
    return table if key_id is None else table.filter(pc.equal(table["key_id"], key_id))


def usage_summary(
    root: Path,
    by: list[str],
    key_id: str | None = None,
    rollups: bool = True,
    unflushed: dict[int, list[UsageRecord]] | None = None,
) -> list[dict]:
    """Requests, tokens and cost grouped by `by`, for one key or all; `ValueError` for a
    grouping that is no column. `unflushed`: the records not yet in Parquet, by their
    write-ahead segment, as the meter holds them (else read from its log).
    `rollups=False` reads the records whatever the grouping (the baseline of
    benchmarks/usage_scale.py), as does a root no meter has counted yet."""
    unknown = [b for b in by if b not in GROUPS]
    if unknown or not by:
        raise ValueError(f"cannot group by {unknown or by}; choose from {sorted(GROUPS)}")
    columns = ["session_id" if b == "session" else b for b in by]
    if rollups and set(by) <= ROLLED and (root / FILE).exists():
        rows = rolled_usage(root, columns, key_id, unflushed)
    else:
        rows = from_records(with_day(of_key(read_usage(root), key_id)), columns)
    out = []
    for r in sorted(rows, key=lambda r: tuple((r[c] is not None, r[c]) for c in columns)):
        row = {b: r[c] for b, c in zip(by, columns, strict=True)}
        row.update({c: r[c] for c in ("requests", *SUMS)})
        out.append(row)
    return out


def from_records(table: pa.Table, columns: list[str]) -> list[dict]:
    """Records summed by `columns`."""
    if table.num_rows == 0:
        return []
    sums = [("request_id", "count"), *((c, "sum") for c in SUMS)]
    grouped = table.group_by(columns).aggregate(sums).to_pylist()
    names = {"request_id_count": "requests", **{f"{c}_sum": c for c in SUMS}}
    return [{names.get(k, k): v for k, v in r.items()} for r in grouped]


def rolled_usage(
    root: Path,
    columns: list[str],
    key_id: str | None,
    unflushed: dict[int, list[UsageRecord]] | None,
) -> list[dict]:
    """The rollups' sums with those of the records not yet in them: a segment's records
    of a day the rollups already count (it was flushed after they were taken) are left
    out, so a flush at any moment neither drops nor doubles a record."""
    if unflushed is None:
        unflushed = {
            int(seg.stem.split("-")[1]): records for seg, records in pending_segments(root).items()
        }
    rows, counted = summed(root, columns, key_id, unflushed)
    totals = {tuple(r[c] for c in columns): r for r in rows}
    for segment, records in unflushed.items():
        for rec in records:
            if (key_id is None or rec.key_id == key_id) and (rec.day, segment) not in counted:
                add_record(totals, columns, rec)
    return list(totals.values())


def add_record(totals: dict[tuple, dict], columns: list[str], rec: UsageRecord) -> None:
    """One record into the row of its group."""
    values = {c: rec.day if c == "day" else getattr(rec, c) for c in columns}
    row = totals.setdefault(
        tuple(values.values()), {**values, "requests": 0, **dict.fromkeys(SUMS, 0)}
    )
    row["requests"] += 1
    for c in SUMS:
        row[c] += getattr(rec, c)


RECENT_COLUMNS = [
    "time", "request_id", "key_id", "plan", "tier", "model", "api", "session_id", "status",
    "prompt_tokens", "completion_tokens", "cost_usd", "ttft_ms", "latency_ms",
]  # fmt: skip


def recent_usage(
    root: Path, key_id: str | None, limit: int, unflushed: list[UsageRecord] | None = None
) -> list[dict]:
    """The latest `limit` records (one key's, or all), newest first; figures only, no
    prompt or output is ever in a record. Days are read newest first, and only as many
    as it takes: an older day holds only older records."""
    import pyarrow.dataset as ds

    where = None if key_id is None else ds.field("key_id") == key_id
    pending = pending_usage(root) if unflushed is None else records_table(unflushed)
    found = [of_key(pending, key_id).select(RECENT_COLUMNS)]
    rows = found[0].num_rows
    for folder in sorted(root.glob("day=*"), reverse=True):
        if rows >= limit:
            break
        parts = sorted(str(p) for p in folder.glob("part-*.parquet"))
        day = ds.dataset(parts, schema=SCHEMA, format="parquet").to_table(
            columns=RECENT_COLUMNS, filter=where
        )
        found.append(day)
        rows += day.num_rows
    latest = pa.concat_tables(found).sort_by([("time", "descending")]).slice(0, limit)
    return latest.to_pylist()
