"""A silent node, in the three-node test cluster: every process of the node that holds the
GGUF tiers' replicas (its raylet, its workers, their llama-servers) is stopped with
SIGSTOP, not removed. Streams on it end with a clean, retryable error event once their
replica has been missing from the load board for `router.stream_stall_s` (they do not wait
for Ray to declare the node dead), each metered once; new requests go to the plan's next
tier; when the processes are continued the tiers serve again (on the same node, or on one
that joins in its place where Ray had given the node up), without duplicate records."""

from __future__ import annotations

import contextlib
import time
import uuid

import httpx
import psutil
import pyarrow.compute as pc
import pytest
import ray
from ray._private import ray_constants

from tests.integration.conftest import NODES, flushed_usage, new_key, wait_for
from tests.integration.test_node_loss import MSG, Stream, move_gateway_to, ram_node

pytestmark = pytest.mark.integration


def node_processes(node) -> list[psutil.Process]:
    """The node's raylet and every process under it (workers, replicas, engines)."""
    [raylet] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    root = psutil.Process(raylet.process.pid)
    return [root, *root.children(recursive=True)]


def alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def test_a_silent_node_ends_its_streams_cleanly_and_its_tiers_come_back(
    cluster, serve_url, admin, state_dir
):
    node = ram_node(cluster)
    # the gateway silent too: the one that wakes after its replacement writes nothing
    move_gateway_to(node.node_id, state_dir)
    key, key_id = new_key(admin, "spill")
    headers = {"authorization": f"Bearer {key}"}
    answers: dict[str, int] = {}
    seen: list[str] = []  # what each request got meanwhile, for a failure's message

    def ask() -> httpx.Response | None:
        rid = f"silent-{uuid.uuid4().hex}"
        try:
            r = httpx.post(
                f"{serve_url}/v1/chat/completions",
                json={"model": "kimi-k2.5", "messages": MSG, "max_tokens": 3},
                headers={**headers, "x-request-id": rid},
                timeout=30,
            )
        except httpx.TransportError as exc:  # a router on the silent node holds it
            seen.append(repr(exc))
            return None
        answers[rid] = r.status_code
        seen.append(f"{r.status_code} {r.headers.get('x-kimi-tier')} {r.text[:80]!r}")
        return r

    before = ask()
    assert before is not None and before.headers["x-kimi-tier"] == "standard"
    streams = [Stream(serve_url, key, "kimi-k2.5:standard") for _ in range(2)]
    wait_for("the streams flowing", lambda: all(len(s.events) >= 3 for s in streams), 60)
    processes = node_processes(node)
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.suspend()
    stopped_at = time.monotonic()
    try:
        for s in streams:
            # a router elsewhere ends it after the stall bound; a router on the silent
            # node holds the client's connection until the client gives up
            assert s.ended.wait(180), "a stream on the silent node hung"
            last = s.events[-1]
            assert "error" in last or "transport" in last, last
            if "error" in last:
                assert last["error"]["type"] == "server_error", last
                assert "retry" in last["error"]["message"], last
        ended_after = time.monotonic() - stopped_at
        print(f"silent node: streams ended {ended_after:.1f} s after SIGSTOP")

        def elsewhere() -> httpx.Response | None:
            r = ask()
            return r if r is not None and r.status_code == 200 else None

        try:
            moved = wait_for("a request served without the silent node", elsewhere, 240, every_s=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; answers: {seen}") from None
        assert moved.headers["x-kimi-tier"] == "premium"  # the plan's next tier
    finally:
        for proc in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
    if not alive(node.node_id):  # Ray gave it up meanwhile: its raylet leaves on waking
        cluster.add_node(**NODES["ram"])

    def standard_again() -> bool:
        r = ask()
        return r is not None and r.status_code == 200 and r.headers["x-kimi-tier"] == "standard"

    wait_for("standard serving again", standard_again, 300, every_s=2)
    table = flushed_usage(admin, state_dir)
    rows = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    ids = [r["request_id"] for r in rows]
    twice = [(r["request_id"], r["time"], r["status"], r["latency_ms"]) for r in rows]
    assert len(ids) == len(set(ids)), sorted(twice)  # none twice
    served = [rid for rid, status in answers.items() if status == 200]
    assert set(served) <= set(ids)  # each answer metered
    for s in streams:
        # settled by its router, or by the gateway from its lease: once, not charged
        [cut] = [r for r in rows if r["request_id"] == s.rid]
        assert cut["status"] >= 500 and cut["cost_usd"] == 0, cut
