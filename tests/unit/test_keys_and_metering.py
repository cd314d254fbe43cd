"""Key store (hashes at rest) and the usage meter (write-ahead log + Parquet)."""

import sqlite3
import time

import pyarrow.parquet as pq
import pytest

from serve_app.gateway import usage_log
from serve_app.gateway.keys import KeyStore
from serve_app.gateway.protocol import KeyOverrides, UsageRecord, split_key
from serve_app.gateway.usage_log import MeterWriter, read_usage
from serve_app.gateway.usage_rollups import part_range


def test_keys_are_stored_as_hashes_only(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    key, info = store.create("standard", name="ci", overrides=KeyOverrides(max_concurrent=3))
    assert key.startswith("sk-kimi-") and split_key(key) == info.key_id
    raw = (tmp_path / "keys.db").read_bytes()
    assert key.encode() not in raw
    secret = key.split("-", 3)[3]  # sk-kimi-<id>-<secret>; the secret may hold "-" too
    assert secret.encode() not in raw
    rows = sqlite3.connect(tmp_path / "keys.db").execute("SELECT * FROM keys").fetchall()
    assert all(key not in str(col) for row in rows for col in row)
    assert store.verify(key).overrides.max_concurrent == 3


def test_verify_rejects_wrong_and_malformed_keys(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    key, info = store.create("free")
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify("sk-kimi-nope") is None
    assert store.verify("Bearer whatever") is None
    assert store.verify(key).key_id == info.key_id


def test_revoke_and_expiry_and_restart(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    key, info = store.create("free", expires_at=time.time() - 1)
    assert not store.verify(key).usable(time.time())
    key2, info2 = store.create("free")
    assert store.revoke(info2.key_id) and not store.revoke(info2.key_id)
    reopened = KeyStore(tmp_path / "keys.db")  # survives a restart
    assert reopened.verify(key2).revoked_at is not None
    assert [k.key_id for k in reopened.list()] == [info.key_id, info2.key_id]
    reopened.add_usage(info.key_id, "2026-11", 100, 0.5)
    reopened.add_usage(info.key_id, "2026-11", 50, 0.25)
    assert reopened.month_usage(info.key_id, "2026-11") == (150, 0.75)


def rec(i: int, ts: float = 1795400000.0) -> UsageRecord:
    return UsageRecord(
        time=ts + i,
        request_id=f"r{i}",
        key_id="k",
        plan="free",
        tier="budget",
        model="kimi-k2.5",
        endpoint="chat",
        stream=False,
        status=200,
        prompt_tokens=10 + i,
        completion_tokens=5,
        cost_usd=0.001,
    )


def test_meter_batches_into_day_partitions(tmp_path):
    m = MeterWriter(tmp_path, batch_size=3)
    for i in range(7):
        m.append(rec(i * 3600 * 5))  # spans two days
    assert len(read_usage(tmp_path)) == 7  # 6 in Parquet, 1 still in the log
    m.close()
    parts = sorted(tmp_path.glob("day=*/part-*.parquet"))
    days = {f"day={rec(i * 18000).day}" for i in range(7)}
    assert len(days) == 2 and {p.parent.name for p in parts} == days
    table = read_usage(tmp_path)
    assert sorted(table.column("request_id").to_pylist()) == sorted(
        f"r{i * 18000}" for i in range(7)
    )
    assert pq.read_table(parts[0]).schema.field("prompt_tokens").type == "int64"


def test_meter_recovers_a_crashed_log_without_duplicates(tmp_path):
    m = MeterWriter(tmp_path, batch_size=100)
    for i in range(5):
        m.append(rec(i))
    # crash: the process dies without flushing; a torn half line is at the end of the log
    seg = next((tmp_path / "_wal").glob("segment-*.jsonl"))
    with open(seg, "a") as f:
        f.write('{"time": 1795400')
    m2 = MeterWriter(tmp_path)  # recovers on start
    assert len(read_usage(tmp_path)) == 5
    # what it recovered it knows, so a settlement retried after the crash is recognised
    assert m2.recovered == {(rec(i).request_id, rec(i).time) for i in range(5)}
    # a crash after the Parquet write but before the log was removed replays idempotently
    m2.append(rec(99))
    m2.flush()
    assert len(read_usage(tmp_path)) == 6
    MeterWriter(tmp_path).close()
    assert len(read_usage(tmp_path)) == 6


def test_usage_report_groups_by_key_plan_tier_day(tmp_path):
    from serve_app.cli import usage_report

    m = MeterWriter(tmp_path)
    for i in range(4):
        m.append(rec(i))
    m.append(rec(5).model_copy(update={"tier": "premium", "request_id": "p"}))
    m.append(rec(6).model_copy(update={"session_id": "agent-1"}))
    m.close()
    report = usage_report(tmp_path, ["key_id", "tier"]).splitlines()
    head = (
        "key_id | tier | requests | prompt_tokens | completion_tokens | reasoning_tokens"
        " | cached_tokens | media_tokens | cost_usd"
    )
    assert report[0] == head
    assert report[2] == "k | budget | 5 | 62 | 25 | 0 | 0 | 0 | 0.005000"
    assert report[3] == "k | premium | 1 | 15 | 5 | 0 | 0 | 0 | 0.001000"
    sessions = usage_report(tmp_path, ["session"]).splitlines()
    assert sessions[0].startswith("session | requests")
    assert "agent-1 | 1 | 16 | 5 | 0 | 0 | 0 | 0.001000" in sessions
    with pytest.raises(SystemExit, match="cannot group by"):
        usage_report(tmp_path, ["colour"])


def test_every_field_of_a_usage_record_reaches_parquet_and_back(tmp_path):
    """The Parquet columns derive from the record model: a record with every field set,
    flushed and read back, comes back whole (a field missing from the columns would be
    lost data)."""
    from datetime import UTC, datetime

    values = {
        "request_id": "req-1",
        "key_id": "k1",
        "plan": "standard",
        "tier": "budget",
        "model": "kimi-k2.5",
        "endpoint": "chat",
        "stream": True,
        "degraded": True,
        "api": "anthropic",
        "session_id": "sess-1",
        "service_tier": "flex",
        "time": 1_790_000_000.25,
        "status": 504,
        "prompt_tokens": 11,
        "completion_tokens": 22,
        "reasoning_tokens": 3,
        "cached_tokens": 4,
        "media_tokens": 3,
        "ttft_ms": 12.5,
        "latency_ms": 99.5,
        "cost_usd": 0.000123,
        "error": "timeout",
    }
    assert set(values) == set(UsageRecord.model_fields), "the test sets every field"
    w = MeterWriter(tmp_path, batch_size=1)
    w.append(UsageRecord(**values))
    w.close()
    (row,) = pq.read_table(next(tmp_path.glob("day=*/part-*.parquet"))).to_pylist()
    assert row.pop("time") == datetime.fromtimestamp(values.pop("time"), UTC)
    assert row == values
    assert read_usage(tmp_path).num_rows == 1


def test_the_usage_root_is_one_dataset_and_compaction_keeps_each_record_once(tmp_path):
    import pyarrow.dataset as ds

    from serve_app.gateway.usage_log import COMPACT_AT

    writer = MeterWriter(tmp_path, batch_size=2)
    records = [rec(n) for n in range(2 * COMPACT_AT - 2)]
    for r in records:
        writer.append(r)
    writer.append(records[0])  # a settlement repeated after a crash
    last = rec(1000)
    writer.append(last)  # flushed with it: the eighth part, holding the duplicate
    writer.append(rec(1001))  # still in the write-ahead log
    # analysts' readers take the root as it is, the write-ahead folder skipped
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert len(table) == len(records) + 2
    assert len(list(tmp_path.glob("day=*/part-*.parquet"))) == COMPACT_AT
    assert writer.compact() == 1
    [part] = tmp_path.glob("day=*/part-*.parquet")
    ids = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()["request_id"]
    assert sorted(ids.to_pylist()) == sorted([r.request_id for r in [*records, last]])
    writer.close()
    # a new segment after compaction is numbered past the compacted range
    again = MeterWriter(tmp_path, batch_size=2)
    assert again.segment > int(part.name.removesuffix(".parquet").split("-")[-1])


def test_parts_are_merged_eight_of_a_size_at_a_time_so_no_merge_reads_the_whole_day(
    tmp_path, monkeypatch
):
    """A log-structured merge: eight parts of one size make one part of the next, so a
    merge reads at most eight parts, never the day so far (which made the gateway's
    memory grow with the day's records), and each record stays once."""
    from serve_app.gateway.usage_log import COMPACT_AT, level

    writer = MeterWriter(tmp_path, batch_size=1)
    merged: list[int] = []
    real_merge = usage_log.merge_parts

    def counting(folder, parts, rollups):
        merged.append(len(parts))
        return real_merge(folder, parts, rollups)

    monkeypatch.setattr(usage_log, "merge_parts", counting)
    for n in range(COMPACT_AT**2 + 3):
        writer.append(rec(n))  # one part each
        writer.compact()
    parts = sorted(tmp_path.glob("day=*/part-*.parquet"), key=part_range)
    assert [level(p) for p in parts] == [2, 0, 0, 0]
    assert merged == [COMPACT_AT] * (COMPACT_AT + 1)  # 8 merges of parts, one of merges
    ids = read_usage(tmp_path)["request_id"].to_pylist()
    assert sorted(ids) == sorted(rec(n).request_id for n in range(COMPACT_AT**2 + 3))


def test_session_totals_add_up_per_key_and_survive_a_restart(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    store.add_usage("k1", "2026-11", 10, 0.5, session="s")
    store.add_usage("k1", "2026-11", 5, 0.25, session="s")
    store.add_usage("k2", "2026-11", 1, 0.0, session="s")
    again = KeyStore(tmp_path / "keys.db")
    assert again.session_usage("k1", "s") == (15, 0.75)
    assert again.session_usage("k2", "s") == (1, 0.0)
    assert again.session_usage("k1", "other") == (0, 0.0)
    assert again.month_usage("k1", "2026-11") == (15, 0.75)


def test_the_docs_duckdb_query_reads_the_usage_root(tmp_path):
    """The query docs/keys-and-usage.md shows, on a usage root with flushed and
    compacted parts."""
    import re
    from datetime import UTC, datetime
    from pathlib import Path

    import duckdb

    readme = (Path(__file__).resolve().parents[2] / "docs" / "keys-and-usage.md").read_text()
    query = re.search(r"```sql\n(.*?)```", readme, re.S).group(1)
    now = datetime.now(UTC).timestamp()
    m = MeterWriter(tmp_path, batch_size=1)
    for i in range(3):
        m.append(rec(i, ts=now).model_copy(update={"session_id": "agent-7"}))
    m.append(rec(9, ts=now))  # no session: not in the answer
    m.close()
    query = query.replace("~/.local/share/kimi-serve/usage", str(tmp_path))
    rows = duckdb.sql(query).fetchall()
    assert rows == [("agent-7", 3, 10 + 11 + 12 + 3 * 5, 0.003)]


def test_a_failing_disk_holds_records_back_and_writes_each_once_when_it_recovers(
    tmp_path, monkeypatch
):
    import errno
    import os

    m = MeterWriter(tmp_path, batch_size=100)
    m.append(rec(0))
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    m.append(rec(1))
    m.append(rec(2))
    assert m.fault == "No space left on device" and len(m.backlog) == 2
    m.flush()  # what the log took goes on to Parquet
    for segment in (tmp_path / "_wal").glob("segment-*.jsonl"):  # no torn line left
        for line in segment.read_text().splitlines():
            UsageRecord.model_validate_json(line)
    assert read_usage(tmp_path)["request_id"].to_pylist() == ["r0"]
    assert not m.heal()  # still failing
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert m.heal() and m.fault is None and not m.backlog
    m.close()
    assert sorted(read_usage(tmp_path)["request_id"].to_pylist()) == ["r0", "r1", "r2"]


def test_damaged_usage_files_are_set_aside_and_the_good_records_kept(tmp_path):
    m = MeterWriter(tmp_path, batch_size=2)
    for i in range(4):
        m.append(rec(i))  # two parts
    m.append(rec(4))  # in the log
    _, bad = sorted(tmp_path.glob("day=*/part-*.parquet"))
    bad.write_bytes(bad.read_bytes()[:40])  # a part cut short
    (bad.parent / ".part-000000000009.parquet.tmp").write_bytes(b"half")
    segment = tmp_path / "_wal" / "segment-000000000099.jsonl"
    segment.write_bytes(rec(5).model_dump_json().encode() + b'\n{"request_id": "r6", \xff')
    again = MeterWriter(tmp_path)
    assert again.quarantined == 2  # the damaged part and the torn line
    assert sorted(p.name for p in (tmp_path / "_quarantine").iterdir()) == [
        f"{bad.parent.name}-{bad.name}",
        "segment-000000000099.rejected",
    ]
    ids = sorted(read_usage(tmp_path)["request_id"].to_pylist())
    assert ids == ["r0", "r1", "r4", "r5"]  # all but the damaged part's two
    assert not list(tmp_path.glob("day=*/.part-*"))


def test_a_damaged_key_store_keeps_what_reads_and_starts(tmp_path):
    path = tmp_path / "keys.db"
    store = KeyStore(path)
    made = [store.create("free", name=f"k{i}" * 40) for i in range(200)]
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[5 * page : 6 * page] = b"\xa5" * page  # one page in the middle destroyed
    path.write_bytes(bytes(raw))
    again = KeyStore(path)
    kept, lost = again.salvaged
    assert kept > 100 and kept + lost >= 200
    alive = [key for key, _ in made if again.verify(key) is not None]
    assert len(alive) > 100
    assert (tmp_path / "_quarantine").is_dir()
    # a file that is no database at all: set aside, the store starts empty
    again.db.close()
    path.write_bytes(b"not a database" * 100)
    empty = KeyStore(path)
    assert empty.salvaged == (0, 0) and empty.list() == []


def test_a_usage_root_written_before_a_column_was_added_still_reads(tmp_path):
    """Parts written before `service_tier` existed read beside new ones: the column is
    null there, through the gateway's reader and the docs' DuckDB query alike."""
    import duckdb
    import pyarrow.parquet as pq

    from serve_app.gateway.usage_log import SCHEMA, read_usage

    m = MeterWriter(tmp_path, batch_size=1)
    m.append(rec(1).model_copy(update={"service_tier": "flex", "session_id": "s"}))
    m.close()
    [day] = tmp_path.glob("day=*")
    old = pq.read_table(next(day.glob("part-*.parquet"))).drop_columns(["service_tier"])
    old = old.set_column(old.schema.get_field_index("request_id"), "request_id", [["r0"]])
    pq.write_table(old, day / "part-000000999990.parquet")  # beside the new part
    table = read_usage(tmp_path)
    assert table.schema == SCHEMA
    rows = sorted(table.to_pylist(), key=lambda r: r["request_id"])
    assert [(r["request_id"], r["service_tier"]) for r in rows] == [("r0", None), ("r1", "flex")]
    query = (
        f"SELECT request_id, service_tier FROM read_parquet('{tmp_path}/*/*.parquet',"
        " hive_partitioning = true, union_by_name = true) ORDER BY request_id"
    )
    assert duckdb.sql(query).fetchall() == [("r0", None), ("r1", "flex")]
