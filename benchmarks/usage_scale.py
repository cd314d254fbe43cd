"""Usage queries at scale, with the rollups against reading the records (the same code,
`rollups=False`) in the same run.

Synthetic usage datasets of 1M, 5M and 50M records are built locally in the real layout
(30 day partitions of merged parts, 2,000 keys, agent sessions of about 50 requests, each
on one API and mostly one tier); a first start of the meter on one builds its rollups from
the records (timed: what an upgrade or a lost rollup costs). Then, per size:

- one key's usage by day and by session, 40 random keys each, in a fresh process per mode
  (its latency p50/p95, and its peak memory above the process's start: resident set and
  Arrow's pool); reading the records is run only where it fits (it needs ~14 GiB at 50M);
- the gateway's admissions and settlements a second (its actor class in-process, on the
  dataset's state dir, 64 callers) alone and while 8 callers send usage queries, five
  rounds interleaved: the ratio says whether queries starve admissions.

    .venv/bin/python -m benchmarks.usage_scale [--sizes 1M,5M,50M] [--data DIR] [--out FILE]

And through the real API, on a deployment started on one of those datasets:

    KIMI_SERVE_STATE=/tmp/usage_scale/records-50000000 make deploy
    .venv/bin/python -m benchmarks.usage_scale --url http://127.0.0.1:8000 \
        --state /tmp/usage_scale/records-50000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.gateway_settle import CALLER, in_process, record
from serve_app.gateway.protocol import Ask
from serve_app.gateway.usage_log import MeterWriter
from serve_app.gateway.usage_query import usage_summary
from serve_app.gateway.usage_schema import SCHEMA

DAYS = 30
KEYS = 2000
PART_ROWS = 512 * 200  # a top-level part: 512 segments of 200 records
SESSION_REQUESTS = 50
T0 = 1793577600.0  # 2026-11-01 UTC
KEY_IDS = [CALLER.key_id, *(f"{n:012x}" for n in range(1, KEYS))]
TIERS = ["premium", "standard", "budget"]
APIS = ["openai", "anthropic", "responses"]


def part(rng: np.random.Generator, day: int, rows: int, per_day: int, first_id: int) -> pa.Table:
    """`rows` of the `per_day` records of one day: keys uniform, each key's day in
    sessions of ~50 requests; a session keeps its API and (nine times in ten) its tier."""
    keys = rng.integers(0, KEYS, rows)
    sessions = rng.integers(0, max(1, per_day // KEYS // SESSION_REQUESTS), rows)
    times = np.sort(rng.uniform(0, 86400, rows)) + T0 + day * 86400
    tier = np.where(rng.random(rows) < 0.9, (keys + sessions) % 3, rng.integers(0, 3, rows))
    status = rng.choice([200, 499, 503], rows, p=[0.95, 0.03, 0.02]).astype(np.int32)
    prompt = rng.integers(50, 4000, rows)
    completion = rng.integers(1, 800, rows)
    price = np.choose(tier, [2.5e-6, 0.6e-6, 0.2e-6])
    cost = np.where(status == 503, 0.0, (prompt + 4 * completion) * price)
    key_ids = pa.array(KEY_IDS).take(pa.array(keys))
    session_ids = pc.binary_join_element_wise(
        key_ids, pa.array([f"d{day}"] * rows), pc.cast(pa.array(sessions), pa.string()), "-"
    )
    columns: dict[str, Any] = {
        "time": pa.array((times * 1000).astype("int64")).cast(SCHEMA.field("time").type),
        "request_id": pc.binary_join_element_wise(
            pa.array(["req"] * rows),
            pc.cast(pa.array(np.arange(first_id, first_id + rows)), pa.string()),
            "-",
        ),
        "key_id": key_ids,
        "plan": pa.array(["pro", "standard", "budget", "enterprise"]).take(pa.array(keys % 4)),
        "tier": pa.array(TIERS).take(pa.array(tier)),
        "model": pa.array(["kimi-k2.5"] * rows),
        "endpoint": pa.array(["chat"] * rows),
        "stream": pa.array(rng.random(rows) < 0.7),
        "degraded": pa.array(np.zeros(rows, bool)),
        "api": pa.array(APIS).take(pa.array((keys + sessions) % 3)),
        "session_id": session_ids,
        "service_tier": pa.array(["default"] * rows),
        "status": pa.array(status),
        "prompt_tokens": pa.array(prompt),
        "completion_tokens": pa.array(completion),
        "reasoning_tokens": pa.array(completion // 2),
        "cached_tokens": pa.array(prompt // 4),
        "media_tokens": pa.array(np.zeros(rows, np.int64)),
        "ttft_ms": pa.array(rng.uniform(20, 400, rows)),
        "latency_ms": pa.array(rng.uniform(200, 9000, rows)),
        "cost_usd": pa.array(cost),
        "error": pa.nulls(rows, pa.string()),
    }
    return pa.table({f.name: columns[f.name] for f in SCHEMA}, schema=SCHEMA)


def build(root: Path, records: int) -> float:
    """The dataset in `root/usage` (kept for the next run); seconds it took."""
    usage = root / "usage"
    done = root / "built"
    if done.exists():
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(records)
    segment, first_id = 0, 0
    for day in range(DAYS):
        folder = usage / f"day={time.strftime('%Y-%m-%d', time.gmtime(T0 + day * 86400))}"
        folder.mkdir(parents=True, exist_ok=True)
        left = records // DAYS
        while left:
            rows = min(PART_ROWS, left)
            name = f"part-{segment:012d}-{segment + 511:012d}.parquet"
            pq.write_table(part(rng, day, rows, records // DAYS, first_id), folder / name)
            segment, first_id, left = segment + 512, first_id + rows, left - rows
    done.write_text(str(records))
    return time.perf_counter() - start


def first_start(root: Path) -> dict[str, float]:
    """The meter's start on the dataset: the first builds the rollups (in its thread,
    the meter open meanwhile; timed to the end of the count), the next checks. And how
    long the first kept the meter from its work (its constructor)."""
    out = {}
    for name in ("first_start_s", "next_start_s"):
        start = time.perf_counter()
        meter = MeterWriter(root / "usage")
        opened = time.perf_counter() - start
        meter.recounted()
        meter.close()
        out[name] = time.perf_counter() - start
        out.setdefault("first_open_s", opened)
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def query_process(root: Path, rollups: bool, queries: int) -> dict[str, Any]:
    """In this (fresh) process: one random key's usage by day and by session, timed."""
    usage = root / "usage"
    rng = random.Random(1)
    usage_summary(usage, ["day"], KEY_IDS[0], rollups)  # imports and first open
    base_rss, pool = rss_mib(), pa.default_memory_pool()
    out: dict[str, Any] = {}
    for by in (["day"], ["session"]):
        times = []
        for _ in range(queries):
            start = time.perf_counter()
            rows = usage_summary(usage, by, rng.choice(KEY_IDS), rollups)
            times.append((time.perf_counter() - start) * 1000)
            assert rows, "a key with no usage: the dataset is not what it should be"
        times.sort()
        out[",".join(by)] = {
            "p50_ms": statistics.median(times),
            "p95_ms": times[int(len(times) * 0.95) - 1],
        }
    out["rss_above_start_mib"] = rss_mib() - base_rss
    out["arrow_peak_mib"] = pool.max_memory() / 2**20
    return out


def queries_in_fresh_process(root: Path, rollups: bool, queries: int) -> dict[str, Any]:
    args = [
        sys.executable,
        "-m",
        "benchmarks.usage_scale",
        "--query",
        str(root),
        "--queries",
        str(queries),
    ]
    if not rollups:
        args.append("--records")
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


async def admissions(root: Path, seconds: float, hammer: bool) -> dict[str, float]:
    """Admissions and settlements a second, 64 callers, with 8 usage callers or none."""
    gateway = in_process(str(root), 200)
    stop, sent, asked = time.monotonic() + seconds, 0, 0

    async def caller() -> None:
        nonlocal sent
        while time.monotonic() < stop:
            ticket, sent = uuid.uuid4().hex, sent + 1
            await gateway.admit(CALLER, Ask(164, 0.0001), ticket)
            await gateway.settle(ticket, record(sent).model_copy(update={"request_id": ticket}))

    waits: list[float] = []

    async def asker(n: int) -> None:
        nonlocal asked
        rng = random.Random(n)
        while time.monotonic() < stop:
            start = time.perf_counter()
            await gateway.usage(rng.choice(KEY_IDS), [rng.choice(["day", "session"])])
            waits.append((time.perf_counter() - start) * 1000)
            asked += 1

    if hammer:  # the query processes started, as a running gateway has them
        await asyncio.gather(*(gateway.usage(KEY_IDS[0], ["day"]) for _ in range(2)))
        gateway.queries.cpu_s = 0.0
        stop = time.monotonic() + seconds
    start = time.perf_counter()
    tasks = [caller() for _ in range(64)] + ([asker(n) for n in range(8)] if hammer else [])
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    gateway.close()
    out = {"admissions_per_s": sent / wall, "usage_queries_per_s": asked / wall}
    if waits:
        waits.sort()
        out["usage_p50_ms"] = statistics.median(waits)
        out["usage_p95_ms"] = waits[int(len(waits) * 0.95) - 1]
        out["usage_cpu_share"] = gateway.queries.cpu_s / wall
    return out


def through_the_api(url: str, state: Path, queries: int) -> dict[str, Any]:
    """One key's usage by day and by session through `GET /v1/usage` of a deployment
    running on `state` (a dataset of this benchmark: `KIMI_SERVE_STATE=DIR make deploy`).
    The dataset's first key is given a key holder's credential here (a row in the key
    store, as `kimi-serve keys create` writes one, with the dataset's key id)."""
    import secrets
    import sqlite3

    import httpx

    from serve_app.gateway.keys import PREFIX, hash_key

    key = f"{PREFIX}{KEY_IDS[0]}-{secrets.token_urlsafe(24)}"
    with sqlite3.connect(state / "keys.db") as db:
        db.execute("DELETE FROM keys WHERE key_id = ?", (KEY_IDS[0],))
        row = (KEY_IDS[0], hash_key(key), "enterprise", "usage_scale", "{}", "{}", time.time())
        db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)", row)
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}) as client:
        for by in ("day", "session"):
            times = []
            for _ in range(queries + 3):
                start = time.perf_counter()
                r = client.get("/v1/usage", params={"group_by": by})
                times.append((time.perf_counter() - start) * 1000)
                r.raise_for_status()
                assert r.json()["data"], "the key has no usage: not this benchmark's dataset"
            times = sorted(times[3:])  # the first ones warm the path up
            out[by] = {
                "p50_ms": statistics.median(times),
                "p95_ms": times[int(len(times) * 0.95) - 1],
                "rows": len(r.json()["data"]),
            }
    return out


def run(sizes: list[int], data: Path, queries: int, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in sizes:
        root = data / f"records-{n}"
        row: dict[str, Any] = {"build_s": build(root, n)}
        row.update(first_start(root))
        row["rollups"] = queries_in_fresh_process(root, True, queries)
        if n <= 5_000_000:
            row["records"] = queries_in_fresh_process(root, False, max(queries // 4, 5))
        rounds = []
        for _ in range(5):
            alone = asyncio.run(admissions(root, seconds, False))
            hammered = asyncio.run(admissions(root, seconds, True))
            rounds.append((alone, hammered))
        row["admissions"] = rounds
        row["admissions_ratio_median"] = statistics.median(
            h["admissions_per_s"] / a["admissions_per_s"] for a, h in rounds
        )
        results[str(n)] = row
        print(json.dumps({n: row}), flush=True)
    return results


def size(text: str) -> int:
    scale = {"K": 1_000, "M": 1_000_000}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,5M,50M")
    parser.add_argument("--data", default="/tmp/usage_scale")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="benchmarks/results/usage_scale.json")
    parser.add_argument("--url", help="a deployment on one of the datasets: ask it instead")
    parser.add_argument("--state", help="that deployment's state dir (with --url)")
    parser.add_argument("--query", help=argparse.SUPPRESS)  # the query process's dataset
    parser.add_argument("--records", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.query:
        print(json.dumps(query_process(Path(args.query), not args.records, args.queries)))
        return
    if args.url:
        print(json.dumps(through_the_api(args.url, Path(args.state), args.queries)))
        return
    sizes = [size(s) for s in args.sizes.split(",")]
    results = run(sizes, Path(args.data), args.queries, args.seconds)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    os.sync()


if __name__ == "__main__":
    main()
