"""Faults and hard limits through the real stack: per-plan time limits, a thousand
abandoned streams, a tier replica killed, secrets kept out of logs, CORS off."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pyarrow.compute as pc
import pytest
import ray
from ray import serve

from tests.integration.conftest import (
    flushed_usage,
    new_key,
    own_filesystem,
    tier_status,
    wait_for,
)

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "go"}]


def usage_of(admin: httpx.Client, state_dir, key_id: str) -> list[dict]:
    table = flushed_usage(admin, state_dir)
    return table.filter(pc.equal(table["key_id"], key_id)).to_pylist()


def test_plan_time_limit_ends_requests_and_frees_the_engine(serve_url, admin, state_dir):
    key, key_id = new_key(admin, "enterprise", request_timeout_s=1.5)
    before = tier_status(serve_url, "premium")["aborted_total"]
    body = {"model": "kimi-k2.5:premium", "messages": MSG, "max_tokens": 6000, "ignore_eos": True}
    headers = {"authorization": f"Bearer {key}"}
    started = time.monotonic()
    r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 60  # ended by the limit, not by the generation
    with httpx.stream(
        "POST",
        f"{serve_url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=headers,
        timeout=120,
    ) as s:
        assert s.status_code == 200
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "request_timeout" and len(events) > 1  # tokens came first
    # both engine requests were aborted, not left generating 6,000 tokens
    wait_for(
        "both requests aborted",
        lambda: tier_status(serve_url, "premium")["aborted_total"] >= before + 2,
        30,
    )
    records = usage_of(admin, state_dir, key_id)
    assert sorted(r["status"] for r in records) == [504, 504]
    assert all(r["completion_tokens"] < 6000 for r in records)


async def _abandon(client: httpx.AsyncClient, url: str, key: str, model: str) -> str:
    rid = f"abandon-{uuid.uuid4().hex}"
    async with client.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": MSG, "max_tokens": 500, "stream": True},
        headers={"authorization": f"Bearer {key}", "x-request-id": rid},
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # hang up after the first chunk
    return rid


async def test_a_thousand_abandoned_streams_leak_no_slot_and_lose_no_record(
    serve_url, admin, state_dir
):
    key, key_id = new_key(admin, "enterprise")
    models = ["kimi-k2.5:premium", "kimi-k2.5:standard"]
    sem = asyncio.Semaphore(16)

    async def one(i: int, client: httpx.AsyncClient) -> str:
        async with sem:
            return await _abandon(client, serve_url, key, models[i % 2])

    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        rids = await asyncio.gather(*(one(i, client) for i in range(1000)))
    assert len(set(rids)) == 1000

    def drained() -> bool:
        tiers = [tier_status(serve_url, t) for t in ("premium", "standard")]
        return all(t and t["running"] == 0 and t["waiting"] == 0 for t in tiers)

    wait_for("every engine slot free again", drained, 120)
    records = {r["request_id"]: r for r in usage_of(admin, state_dir, key_id)}
    assert set(rids) <= set(records)  # every abandoned stream was metered
    assert {records[r]["status"] for r in rids} <= {499, 200}
    # the engines still serve
    ok = httpx.post(
        f"{serve_url}/v1/chat/completions",
        json={"model": "kimi-k2.5:standard", "messages": MSG, "max_tokens": 3},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def _tier_replica_actors(tier: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"#tier-{tier}#" in a["name"]
    ]


def test_killed_tier_replica_is_replaced_and_requests_recover(serve_url, admin, state_dir):
    key, key_id = new_key(admin, "enterprise")
    body = {"model": "kimi-k2.5:standard", "messages": MSG, "max_tokens": 1500, "stream": True}
    headers = {"authorization": f"Bearer {key}", "x-request-id": f"kill-{uuid.uuid4().hex}"}
    events: list[str] = []
    with httpx.stream(
        "POST", f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as s:
        # the replica serving this stream (the tier may run more than one)
        [name] = [
            n for n in _tier_replica_actors("standard") if n.endswith(s.headers["x-kimi-replica"])
        ]
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    # the stream ends with a clean, retryable error event instead of hanging
    err = json.loads(events[-1])["error"]
    assert err["type"] == "server_error" and "retry" in err["message"]
    # a request sent now waits for (or is retried onto) the replacement replica
    r = httpx.post(
        f"{serve_url}/v1/chat/completions",
        json={**body, "stream": False, "max_tokens": 3},
        headers={"authorization": f"Bearer {key}"},
        timeout=180,
    )
    assert r.status_code == 200, r.text
    wait_for(
        "the killed replica replaced",
        lambda: name not in (names := _tier_replica_actors("standard")) and names,
        120,
    )
    records = usage_of(admin, state_dir, key_id)
    interrupted = next(x for x in records if x["request_id"] == headers["x-request-id"])
    assert interrupted["status"] == 503 and interrupted["completion_tokens"] >= 1
    assert interrupted["cost_usd"] == 0  # the client got an error: recorded, not charged


def test_keys_and_admin_token_never_reach_the_logs(serve_url, admin, cluster):
    key, _ = new_key(admin, "enterprise")
    for auth in (key, "sk-kimi-000000000000-bogussecretbogussecretxx"):
        httpx.post(
            f"{serve_url}/v1/chat/completions",
            json={"model": "kimi-k2.5:budget", "messages": MSG, "max_tokens": 1},
            headers={"authorization": f"Bearer {auth}"},
            timeout=120,
        )
    time.sleep(2)  # log lines are flushed by the processes' handlers
    logs = cluster.head_node.get_logs_dir_path()
    secret = key.split("-", 3)[3]  # sk-kimi-<id>-<secret>
    assert len(secret) >= 16
    for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            text = f.read()
        assert secret.encode() not in text, f"a key's secret appears in {path}"
        assert b"bogussecretbogussecret" not in text, f"a refused key appears in {path}"
        assert b"test-admin-token" not in text, f"the admin token appears in {path}"


def test_cors_is_off_by_default(serve_url):
    r = httpx.options(
        f"{serve_url}/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{serve_url}/v1/models", headers={"origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def settled_standard_llama_servers(serve_url: str) -> list[int]:
    """The standard tier's llama-server, once the tier has one settled replica: earlier
    tests scale it up or replace a replica, and a replica starting now would bring one
    the caller did not touch. Serve's own view counts the replicas still starting or
    stopping, which report nothing to the load board yet (or any more)."""

    def settled() -> bool:
        states = serve.status().applications["kimi"].deployments["tier-standard"]
        counts = {getattr(k, "value", k): n for k, n in states.replica_states.items() if n}
        t = tier_status(serve_url, "standard")
        return counts == {"RUNNING": 1} and bool(t) and t["replicas"] == 1

    wait_for("one settled standard replica", settled, 120)
    time.sleep(2.0)  # a replica being removed has stopped its llama-server by now
    pids = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "llama-server.*tiny-kimi-Q4_K_M"], capture_output=True, text=True
        ).stdout.split()
    ]
    assert pids
    return pids


def test_a_stalled_tier_is_routed_around_until_it_recovers(serve_url, admin):
    """llama-server frozen (SIGSTOP): its replica reports it unhealthy within seconds, new
    requests of plans with another tier go there (marked), and it serves again after."""
    key, _ = new_key(admin, "standard")
    pids = settled_standard_llama_servers(serve_url)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wait_for(
            "standard reported unhealthy",
            lambda: not tier_status(serve_url, "standard")["healthy"],
            30,
        )
        time.sleep(1.0)  # the routers read the load board every 0.5 s
        r = httpx.post(
            f"{serve_url}/v1/chat/completions",
            json={"model": "kimi-k2.5", "messages": MSG, "max_tokens": 3},
            headers={"authorization": f"Bearer {key}"},
            timeout=120,
        )
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert r.status_code == 200, r.text
    assert r.headers["x-kimi-tier"] == "budget"
    assert r.headers["x-kimi-degraded"] == "standard->budget"
    wait_for("standard healthy again", lambda: tier_status(serve_url, "standard")["healthy"], 30)


def test_a_request_its_engine_failed_before_any_token_moves_to_the_next_tier(
    serve_url, admin, state_dir
):
    """The standard tier's llama-server killed just before a request reaches it. The
    `plan_only` strategy sends it there regardless of health, as a router whose figures
    are a moment old would. Nothing was produced, so the client never sees the failure:
    budget serves it, marked, and it is metered once, at budget."""
    key, key_id = new_key(admin, "standard")
    [pid] = settled_standard_llama_servers(serve_url)
    before = tier_status(serve_url, "standard")["restarts"]
    rid = f"moved-{uuid.uuid4().hex}"
    os.kill(pid, signal.SIGKILL)
    r = httpx.post(
        f"{serve_url}/v1/chat/completions",
        json={"model": "kimi-k2.5", "messages": MSG, "max_tokens": 3},
        headers={
            "authorization": f"Bearer {key}",
            "x-request-id": rid,
            "x-kimi-routing-strategy": "plan_only",
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-kimi-tier"] == "budget" and r.headers["x-kimi-retried"] == "1"
    assert r.headers["x-kimi-degraded"] == "standard->budget"
    [record] = [x for x in usage_of(admin, state_dir, key_id) if x["request_id"] == rid]
    assert (record["tier"], record["status"], record["degraded"]) == ("budget", 200, True)
    assert record["completion_tokens"] == 3
    wait_for(
        "standard's llama-server restarted",
        lambda: (
            (t := tier_status(serve_url, "standard")) and t["healthy"] and t["restarts"] > before
        ),
        60,
    )


def premium_replicas() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:kimi:tier-premium" in " ".join(p.info["cmdline"] or [])
    ]


def vllm_engine_cores() -> list[int]:
    """The premium replica's vLLM engine process: its child titled "VLLM::EngineCore" (the
    kernel keeps the first 15 characters as its name), or else its child that runs a
    child of its own (the engine's worker), which no other child of the replica does."""
    cores = []
    for replica in premium_replicas():
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in replica.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    title = child.name() + " " + " ".join(child.cmdline()[:1])
                    if "EngineCor" in title or child.children():
                        cores.append(child.pid)
    return cores


def the_vllm_engine_core() -> int:
    found: list[int] = []

    def one() -> bool:
        found[:] = vllm_engine_cores()
        return len(found) == 1

    try:
        wait_for("exactly one vLLM engine core", one, 30)
    except AssertionError:
        print("vLLM processes:", vllm_processes())
        raise
    return found[0]


def vllm_processes() -> list[tuple]:
    """What a failure to find the engine core shows: the premium replicas' children."""
    out = []
    for replica in premium_replicas():
        for child in replica.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out.append((child.pid, child.ppid(), child.name(), child.cmdline()[:3]))
    return out


def test_a_gateway_restart_is_absorbed_and_meters_each_request_once(serve_url, admin, state_dir):
    """The gateway actor (keys, limits, metering) killed while requests of one key arrive:
    Ray restarts it from the state dir; requests wait for it (or, past the wait, get a 503
    to retry), never a 500; every request served is metered exactly once, and the key
    still works."""
    key, key_id = new_key(admin, "enterprise")
    gateway = ray.get_actor("kimi-gateway", namespace="kimi-serve")

    def one(i: int) -> tuple[str, int, str]:
        rid = f"gw-restart-{i}-{uuid.uuid4().hex}"
        r = httpx.post(
            f"{serve_url}/v1/chat/completions",
            json={"model": "kimi-k2.5", "messages": MSG, "max_tokens": 3, "stream": i % 2 == 1},
            headers={"authorization": f"Bearer {key}", "x-request-id": rid},
            timeout=120,
        )
        return rid, r.status_code, r.headers.get("retry-after", "")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        time.sleep(0.2)
        ray.kill(gateway, no_restart=False)
        futures += [pool.submit(one, i) for i in range(4, 12)]
        answers = [f.result() for f in futures]
    statuses = [status for _, status, _ in answers]
    assert set(statuses) <= {200, 503}, answers
    assert all(int(after) >= 1 for _, status, after in answers if status == 503)
    served = {rid for rid, status, _ in answers if status == 200}
    assert served, answers
    r = httpx.post(
        f"{serve_url}/v1/chat/completions",
        json={"model": "kimi-k2.5", "messages": MSG, "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text  # the key survived the restart

    def metered() -> list[str] | None:
        ids = [x["request_id"] for x in usage_of(admin, state_dir, key_id)]
        return ids if served <= set(ids) else None

    ids = wait_for("every served request metered", metered, 30)
    mine = [i for i in ids if i in served]
    assert sorted(mine) == sorted(served)  # each once


@contextlib.contextmanager
def full_disk(path) -> Iterator[None]:
    """The filesystem under `path` (its own tmpfs) filled to the last byte, then freed."""
    filler = path / "filler.bin"
    for block in (1 << 20, 4096, 1):  # megabytes, then what is left of the last one
        with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * block)
    try:
        yield
    finally:
        filler.unlink()


def test_a_full_state_disk_is_a_degraded_mode_that_recovers_by_itself(serve_url, admin, state_dir):
    """The state dir's filesystem filled while a key's requests arrive: each is served
    (its record held until the disk takes it) or refused with a 503 that names the
    cause, never a 500; the admin API and /ready say why; once space is back everything
    recovers without help and every served request is metered exactly once, none twice."""
    if not own_filesystem(state_dir):
        pytest.skip("the state dir is not on a filesystem of its own (mount not allowed)")
    key, key_id = new_key(admin, "enterprise")
    headers = {"authorization": f"Bearer {key}"}

    def one(i: int) -> tuple[str, int, dict]:
        rid = f"disk-full-{i}-{uuid.uuid4().hex}"
        r = httpx.post(
            f"{serve_url}/v1/chat/completions",
            json={"model": "kimi-k2.5", "messages": MSG, "max_tokens": 3, "stream": i % 2 == 1},
            headers={**headers, "x-request-id": rid},
            timeout=120,
        )
        body = r.json() if "json" in r.headers.get("content-type", "") else {}
        return rid, r.status_code, {**body, "retry-after": r.headers.get("retry-after")}

    with full_disk(state_dir):
        answers = [one(i) for i in range(8)]
        statuses = [status for _, status, _ in answers]
        assert set(statuses) <= {200, 503}, answers
        assert 503 in statuses, answers  # the fault was noticed and new requests refused
        for _, status, body in answers:
            if status == 503:
                assert body["error"]["code"] == "storage_unavailable", body
                assert "cannot be written" in body["error"]["message"]
                assert int(body["retry-after"]) >= 1
        made = admin.post("/admin/keys", json={"plan": "free"})
        assert made.status_code in (201, 503), made.text  # SQLite may still have room
        if made.status_code == 503:
            assert made.json()["error"]["code"] == "storage_unavailable"
        flushed = admin.post("/admin/usage/flush")
        assert flushed.status_code == 503 and "cannot be written" in flushed.text
        ready = httpx.get(f"{serve_url}/ready", timeout=30)
        assert ready.status_code == 503 and "cannot be written" in ready.json()["storage"]
    wait_for(
        "the state dir writable again",
        lambda: httpx.get(f"{serve_url}/ready", timeout=30).json()["storage"] == "ok",
        60,
    )
    after = one(99)
    assert after[1] == 200, after
    served = {rid for rid, status, _ in [*answers, after] if status == 200}
    ids = [r["request_id"] for r in usage_of(admin, state_dir, key_id)]
    assert sorted(ids) == sorted(served)  # each served request once; none refused billed


def test_damaged_state_on_start_is_set_aside_and_the_gateway_starts(serve_url, admin, state_dir):
    """A damaged usage part and a torn write-ahead segment in the state dir when the
    gateway (re)starts: it sets them aside (`usage/_quarantine/`, counted), keeps every
    good record and key, and serves; never a crash loop."""
    key, key_id = new_key(admin, "enterprise")
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "kimi-k2.5", "messages": MSG, "max_tokens": 2}
    first = httpx.post(f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert first.status_code == 200
    flushed_usage(admin, state_dir)  # its record in a day's Parquet
    usage = state_dir / "usage"
    day = max(usage.glob("day=*"))
    (day / "part-000000999998.parquet").write_bytes(b"PAR1 this is no Parquet file")
    (usage / "_wal" / "segment-000000999999.jsonl").write_bytes(b'{"request_id": "torn')
    ray.kill(ray.get_actor("kimi-gateway", namespace="kimi-serve"), no_restart=False)

    def served() -> httpx.Response | None:
        r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        return r if r.status_code == 200 else None

    second = wait_for("the gateway back", served, 60, every_s=1)
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    aside = sorted(p.name for p in (usage / "_quarantine").iterdir())
    assert f"{day.name}-part-000000999998.parquet" in aside
    assert "segment-000000999999.rejected" in aside
    ids = [r["request_id"] for r in usage_of(admin, state_dir, key_id)]
    assert sorted(ids) == sorted([first.headers["x-request-id"], second.headers["x-request-id"]])
