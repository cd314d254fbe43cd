"""Usage read back: grouped totals and the latest records, for one key or all."""

from __future__ import annotations

from pathlib import Path

from serve_app.gateway.usage_log import read_usage
from serve_app.gateway.usage_records import UsageRecord

# What usage can be grouped by: the record's columns, `day`, and `session` for session_id.
GROUPS = {"day", "session", *(f for f in UsageRecord.model_fields if f not in ("time",))}


def usage_summary(root: Path, by: list[str], key_id: str | None = None) -> list[dict]:
    """Requests, tokens and cost grouped by `by`, for one key or all; `ValueError` for a
    grouping that is no column."""
    import pyarrow.compute as pc

    unknown = [b for b in by if b not in GROUPS]
    if unknown or not by:
        raise ValueError(f"cannot group by {unknown or by}; choose from {sorted(GROUPS)}")
    columns = ["session_id" if b == "session" else b for b in by]
    table = read_usage(root)
    if key_id is not None:
        table = table.filter(pc.equal(table["key_id"], key_id))
    if table.num_rows == 0:
        return []
    table = table.append_column("day", pc.strftime(table["time"], format="%Y-%m-%d"))
    sums = ["prompt_tokens", "completion_tokens", "cached_tokens", "media_tokens", "cost_usd"]
    grouped = table.group_by(columns).aggregate(
        [("request_id", "count"), *((c, "sum") for c in sums)]
    )
    rows = []
    for r in grouped.sort_by([(c, "ascending") for c in columns]).to_pylist():
        row = {b: r[c] for b, c in zip(by, columns, strict=True)}
        row["requests"] = r["request_id_count"]
        row.update({c: r[f"{c}_sum"] for c in sums})
        rows.append(row)
    return rows


RECENT_COLUMNS = [
    "time", "request_id", "key_id", "plan", "tier", "model", "api", "session_id", "status",
    "prompt_tokens", "completion_tokens", "cost_usd", "ttft_ms", "latency_ms",
]  # fmt: skip


def recent_usage(root: Path, key_id: str | None, limit: int) -> list[dict]:
    """The latest `limit` records (one key's, or all), newest first; figures only, no
    prompt or output is ever in a record."""
    import pyarrow.compute as pc

    table = read_usage(root)
    if key_id is not None:
        table = table.filter(pc.equal(table["key_id"], key_id))
    if table.num_rows == 0:
        return []
    latest = table.sort_by([("time", "descending")]).slice(0, limit)
    return latest.select(RECENT_COLUMNS).to_pylist()
