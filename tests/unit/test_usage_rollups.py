"""Usage rollups, property-based: whatever the order of records, settlements repeated,
flushes, compactions, restarts (clean, or cut short anywhere, mid-flush included) and
rollup files lost or damaged, the usage a query answers from the rollups equals the sums
of the raw records."""

from __future__ import annotations

import asyncio
import collections
import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.gateway import usage_log, usage_rollups
from serve_app.gateway.usage_log import MeterWriter, read_usage
from serve_app.gateway.usage_query import recent_usage, usage_summary
from serve_app.gateway.usage_records import UsageRecord
from serve_app.gateway.usage_rollups import FILE, Recounting

DAY_S = 86400.0
T0 = 1795400000.0


def record(n: int, rng: random.Random) -> UsageRecord:
    return UsageRecord(
        time=T0 + rng.choice([0, 1, 2]) * DAY_S + n,
        request_id=f"r{n}",
        key_id=rng.choice(["k1", "k2", "k3"]),
        plan="pro",
        tier=rng.choice(["premium", "standard", "budget"]),
        model="kimi-k2.5",
        endpoint="chat",
        stream=False,
        session_id=rng.choice([None, "s1", "s2"]),
        status=rng.choice([200, 200, 499, 503]),
        prompt_tokens=rng.randint(1, 100),
        completion_tokens=rng.randint(0, 50),
        reasoning_tokens=rng.randint(0, 5),
        cost_usd=rng.randint(0, 1000) / 1e6,
    )


def from_records(root: Path, by: list[str], key_id: str | None) -> dict:
    """The expected answer: sums over every record read back, grouped in Python."""
    sums: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0.0])
    for r in read_usage(root).to_pylist():
        if key_id is not None and r["key_id"] != key_id:
            continue
        r["day"], r["session"] = r["time"].strftime("%Y-%m-%d"), r["session_id"]
        s = sums[tuple(r[b] for b in by)]
        s[0] += 1
        s[1] += r["prompt_tokens"]
        s[2] += r["completion_tokens"]
        s[3] += r["reasoning_tokens"]
        s[4] += r["cost_usd"]
    return {k: v for k, v in sums.items() if v[0]}


def answered(root: Path, by: list[str], key_id: str | None) -> dict:
    rows = usage_summary(root, by, key_id)
    return {
        tuple(r[b] for b in by): [
            r["requests"],
            r["prompt_tokens"],
            r["completion_tokens"],
            r["reasoning_tokens"],
            r["cost_usd"],
        ]
        for r in rows
        if r["requests"]
    }


def assert_rollups_hold(root: Path) -> None:
    for by, key in (
        (["day"], "k1"),
        (["day", "session"], "k2"),
        (["key_id", "tier", "status"], None),
    ):
        want, got = from_records(root, by, key), answered(root, by, key)
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k][:4] == v[:4], k
            assert got[k][4] == pytest.approx(v[4], abs=1e-9), k


def write(root: Path, seed: int, batch_size: int, records: int) -> None:
    """`records` random records metered into `root` and the meter closed."""
    rng = random.Random(seed)
    writer = MeterWriter(root, batch_size=batch_size)
    for n in range(records):
        writer.append(record(n, rng))
    writer.close()


OPS = st.lists(
    st.sampled_from(
        ["add"] * 8 + ["again", "compact", "restart", "crash", "torn", "lose", "damage"]
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**32 - 1))
def test_the_rollups_equal_the_records_sums_through_restarts_compaction_and_losses(ops, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(usage_log, "COMPACT_AT", 2)  # few records make many merges
        root = Path(tmp)
        writer = MeterWriter(root, batch_size=3)
        written: list[UsageRecord] = []
        for op in ops:
            if op == "add" or (op == "again" and not written):
                written.append(record(len(written), rng))
                writer.append(written[-1])
            elif op == "again":  # a settlement repeated (by a crash, say)
                writer.append(rng.choice(written))
            elif op == "compact":
                writer.compact()
            else:  # the process ends (its files closed), cleanly or not; a new one starts
                if op == "restart":
                    writer.close()
                elif op == "torn":  # mid-flush: parts and rollups written, the log kept
                    kept = {p: p.read_bytes() for p in (root / "_wal").glob("segment-*")}
                    writer.flush()
                    for p, data in kept.items():
                        p.write_bytes(data)
                writer.rollups.close()
                if op == "lose":  # every day counted again
                    (root / FILE).unlink()
                elif op == "damage":
                    (root / FILE).write_bytes(b"not a database")
                writer = MeterWriter(root, batch_size=3)
            assert writer.recounted(30)
            assert_rollups_hold(root)
        writer.close()
        assert MeterWriter(root, batch_size=3).recounted(30)
        assert_rollups_hold(root)


def test_lost_rollups_are_counted_again_from_the_parts_at_start(tmp_path):
    write(tmp_path, seed=7, batch_size=2, records=40)
    assert MeterWriter(tmp_path).rebuilt == 0  # whole as it was left
    (tmp_path / FILE).unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"{FILE}{suffix}").unlink(missing_ok=True)
    again = MeterWriter(tmp_path)
    assert again.rebuilt == 3  # each of the three days
    assert again.recounted(30)
    assert_rollups_hold(tmp_path)


def lost_rollups(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (root / f"{FILE}{suffix}").unlink(missing_ok=True)


def test_a_start_counts_days_again_beside_the_meters_writes(tmp_path, monkeypatch):
    """Counting days again takes minutes at scale: the meter writes meanwhile, and a
    query of the sums is told they are being counted (not given short totals)."""
    write(tmp_path, seed=11, batch_size=2, records=40)
    lost_rollups(tmp_path)
    gate = threading.Event()
    recount = usage_rollups.Rollups.recount

    def held(self, day, root):
        gate.wait(30)
        recount(self, day, root)

    monkeypatch.setattr(usage_rollups.Rollups, "recount", held)
    writer = MeterWriter(tmp_path, batch_size=2)
    assert writer.rebuilt == 3 and not writer.recounted(0.05)
    with pytest.raises(Recounting) as told:
        usage_summary(tmp_path, ["day"], "k1")
    assert told.value.pending == 3
    rng = random.Random(12)
    for n in range(100, 120):  # settlements go on: flushed, counted, compacted
        writer.append(record(n, rng))
    writer.compact()
    gate.set()
    assert writer.recounted(30)
    assert_rollups_hold(tmp_path)
    writer.close()


def test_a_part_written_while_its_day_is_counted_again_is_counted_once(tmp_path, monkeypatch):
    """The day is counted from the parts there were when it began; a part written
    before its sums are put in place is added then, and its own add is a no-op."""
    write(tmp_path, seed=13, batch_size=2, records=30)
    lost_rollups(tmp_path)
    rng = random.Random(14)
    writers: list[MeterWriter] = []
    read_part = usage_rollups.read_part
    wrote = threading.Event()

    def reading(part):
        if writers and not wrote.is_set():  # the meter writes a part of every day now
            wrote.set()
            for n, day in enumerate((0, 1, 2)):
                late = record(200 + n, rng).model_copy(update={"time": T0 + day * DAY_S + 99})
                writers[0].append(late)
            writers[0].flush()
        return read_part(part)

    monkeypatch.setattr(usage_rollups, "read_part", reading)
    gate = threading.Event()
    recount = usage_rollups.Rollups.recount
    monkeypatch.setattr(usage_rollups.Rollups, "recount", lambda *a: (gate.wait(30), recount(*a)))
    writers.append(MeterWriter(tmp_path, batch_size=100))
    gate.set()
    assert writers[0].recounted(30) and wrote.is_set()
    assert_rollups_hold(tmp_path)
    writers[0].close()


def test_a_merge_cut_short_after_its_fix_is_counted_again(tmp_path, monkeypatch):
    """The fix of a merge that drops a duplicate is written before the merged part; a
    crash between leaves the sums short of the duplicate the parts still hold."""
    monkeypatch.setattr(usage_log, "COMPACT_AT", 2)
    rng = random.Random(9)
    writer = MeterWriter(tmp_path, batch_size=1)
    first = record(0, rng)
    writer.append(first)
    writer.append(first)  # a settlement repeated: two parts, the same record

    def crash(*args, **kwargs):
        raise OSError("the process died here")

    monkeypatch.setattr(usage_log.pq, "write_table", crash)
    with pytest.raises(OSError, match="died"):
        writer.compact()
    monkeypatch.undo()
    monkeypatch.setattr(usage_log, "COMPACT_AT", 2)
    again = MeterWriter(tmp_path, batch_size=1)
    assert again.rebuilt == 1
    assert again.recounted(30)
    assert_rollups_hold(tmp_path)
    again.compact()  # now the merge happens, its fix with it
    assert_rollups_hold(tmp_path)
    [row] = usage_summary(tmp_path, ["day"], first.key_id)
    assert row["requests"] == 1


def test_a_query_reads_the_rollups_not_the_records(tmp_path, monkeypatch):
    write(tmp_path, seed=3, batch_size=5, records=30)
    want = from_records(tmp_path, ["day"], "k1")

    def no_raw_read(*args, **kwargs):
        raise AssertionError("a grouping the rollups answer read the records")

    monkeypatch.setattr("serve_app.gateway.usage_query.read_usage", no_raw_read)
    got = answered(tmp_path, ["day"], "k1")
    assert {k: v[:4] for k, v in got.items()} == {k: v[:4] for k, v in want.items()}
    with pytest.raises(AssertionError, match="read the records"):
        usage_summary(tmp_path, ["error"], "k1")  # not a rollup dimension: the records


def test_the_latest_records_read_only_the_newest_days_needed(tmp_path, monkeypatch):
    import pyarrow.dataset as ds

    write(tmp_path, seed=5, batch_size=4, records=60)
    opened: list[int] = []
    real = ds.dataset

    def counting(source, *args, **kwargs):
        opened.append(1)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ds, "dataset", counting)
    latest = recent_usage(tmp_path, "k2", 2)
    everything = read_usage(tmp_path).to_pylist()
    mine = sorted((r for r in everything if r["key_id"] == "k2"), key=lambda r: r["time"])
    assert [r["request_id"] for r in latest] == [r["request_id"] for r in mine[::-1][:2]]
    assert len(opened) == 1  # the newest day held two of k2's: no older day was read


def test_the_gateway_admits_and_meters_while_its_usage_is_counted_again(tmp_path, monkeypatch):
    """The gateway's start does not wait for the count (minutes at 50M records): it
    admits and settles meanwhile, and its usage answer says the totals are being
    counted (from a query process: the refusal crosses it) until they are."""
    from serve_app.gateway.protocol import Ask, UsageRecounting
    from tests.unit.gateway_in_process import CALLER, Gateway, plans
    from tests.unit.gateway_in_process import record as settled

    usage_root = tmp_path / "usage"
    write(usage_root, seed=15, batch_size=2, records=30)
    lost_rollups(usage_root)
    gate = threading.Event()
    recount = usage_rollups.Rollups.recount
    monkeypatch.setattr(usage_rollups.Rollups, "recount", lambda *a: (gate.wait(30), recount(*a)))

    async def run() -> None:
        gateway = Gateway(str(tmp_path), plans(), 1, 3600)
        try:
            assert await gateway.usage(CALLER.key_id, ["day"]) == UsageRecounting(3)
            assert (await gateway.admit(CALLER, Ask(100, 0.01), "t1")).ticket == "t1"
            await gateway.settle("t1", settled(1))
            gate.set()
            assert gateway.meter.recounted(30)
            [row] = await gateway.usage(CALLER.key_id, ["day"])
            assert row["requests"] == 1 and row["completion_tokens"] == 2
        finally:
            gateway.close()

    asyncio.run(run())
    assert_rollups_hold(usage_root)


def test_records_flushed_while_a_query_waits_are_counted_once(tmp_path):
    """The gateway hands a query the records its meter holds, by segment; a flush before
    the query reads the rollups puts them there too: the query leaves its copies out
    (it used to read again, up to three times, each a wait for a query slot)."""
    write(tmp_path, seed=17, batch_size=4, records=20)
    writer = MeterWriter(tmp_path, batch_size=1000)
    rng = random.Random(18)
    for n in range(100, 110):
        writer.append(record(n, rng))
    held = {writer.segment: writer.unflushed}
    before = usage_summary(tmp_path, ["day"], None, True, held)
    writer.flush()  # as if it happened while the query waited for its slot
    after = usage_summary(tmp_path, ["day"], None, True, held)

    def rounded(rows: list[dict]) -> list[dict]:  # sums of floats in another order
        return [{**r, "cost_usd": round(r["cost_usd"], 9)} for r in rows]

    assert rounded(before) == rounded(after) == rounded(usage_summary(tmp_path, ["day"], None))
    assert sum(r["requests"] for r in after) == 30
    writer.close()
