"""A lost node, in the three-node test cluster: the node that holds the GGUF tiers'
replicas (standard and budget) and, moved there for the test, the gateway actor, is
removed during traffic. Streams on it end with a clean error event, new requests go to
the tier the plan allows next, the gateway comes back on another node from the shared
state dir (keys, budgets and records intact), and the tiers come back when a node with
their resources joins again."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

import httpx
import psutil
import pyarrow.compute as pc
import pytest
import ray
from ray._private import ray_constants
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve_app.actors import NAMESPACE
from serve_app.config import load_config
from serve_app.gateway.actor import ACTOR_NAME, GatewayState
from tests.integration.conftest import (
    NODES,
    flushed_usage,
    new_key,
    session_app_args,
    wait_for,
)

pytestmark = pytest.mark.integration
MSG = [{"role": "user", "content": "go"}]


def ram_node(cluster):
    ids = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "host_ram_gb" in n["Resources"]}
    [node] = [n for n in cluster.worker_nodes if n.node_id in ids]
    return node


def lose(cluster, node) -> None:
    """The node gone as a machine goes: its Ray processes and every process they started.
    Ray's `remove_node` kills only the former; its workers (replicas, engines) run on until
    they notice, and a replica reached over Serve's gRPC transport would answer meanwhile."""
    [raylet] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    started = psutil.Process(raylet.process.pid).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def router_nodes() -> list[str]:
    """The node of each router replica (asked of the replica actors themselves: the
    tests' cluster runs no dashboard for Ray's state API)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    routers = [a for a in named if "#Ingress#" in a["name"]]
    handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in routers]
    where = [
        h.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for h in handles
    ]
    return ray.get(where, timeout=30)


SEEN: list[object] = []  # what gateway_node() found, for a failure's message


def gateway_node() -> str | None:
    try:
        gateway = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        SEEN.append(found := ray.get(gateway.node.remote(), timeout=10))
        return found
    except Exception as exc:  # not there, or restarting
        SEEN.append(exc)
        return None


def move_gateway_to(node_id: str, state_dir) -> None:
    """The gateway killed for good and made again, bound to `node_id`: when that node
    goes, it cannot come back there, and the routers make it again on a node that lives
    (they find it by name, and make it where it is gone)."""
    ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE), no_restart=True)

    def name_free() -> bool:
        try:
            ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        except ValueError:
            return True
        return False

    wait_for("the old gateway gone", name_free, 30)
    gw = load_config(session_app_args()).gateway
    plans = {
        name: p.model_dump(mode="json") for name, p in load_config(session_app_args()).plans.items()
    }
    GatewayState.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(str(state_dir), plans, gw.meter_batch_size, gw.meter_flush_interval_s)
    try:
        wait_for("the gateway on the node", lambda: gateway_node() == node_id, 60)
    except AssertionError:
        raise AssertionError(f"gateway not on {node_id}: {SEEN[-3:]!r}") from None


class Stream:
    """A long stream pinned to a tier, read in a thread: its events and how it ended."""

    def __init__(self, url: str, key: str, model: str) -> None:
        self.events: list[dict] = []
        self.status: int | None = None
        self.rid = f"node-loss-{uuid.uuid4().hex}"
        body = {"model": model, "messages": MSG, "max_tokens": 3800, "stream": True}
        body["ignore_eos"] = True
        headers = {"authorization": f"Bearer {key}", "x-request-id": self.rid}
        self.ended = threading.Event()

        def run() -> None:
            try:
                with httpx.stream(
                    "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120
                ) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            self.events.append(json.loads(line[6:]))
            except httpx.HTTPError as exc:
                self.events.append({"transport": repr(exc)})
            self.ended.set()

        threading.Thread(target=run, daemon=True).start()


def test_a_lost_node_takes_its_tiers_and_the_gateway_and_all_come_back(
    cluster, serve_url, admin, state_dir
):
    node = ram_node(cluster)
    move_gateway_to(node.node_id, state_dir)
    key, key_id = new_key(admin, "spill")
    headers = {"authorization": f"Bearer {key}"}
    answers: dict[str, int] = {}

    def ask(model: str = "kimi-k2.5") -> httpx.Response:
        rid = f"node-loss-{uuid.uuid4().hex}"
        body = {"model": model, "messages": MSG, "max_tokens": 3}
        r = httpx.post(
            f"{serve_url}/v1/chat/completions",
            json=body,
            headers={**headers, "x-request-id": rid},
            timeout=60,
        )
        answers[rid] = r.status_code
        return r

    before = ask()
    assert before.status_code == 200 and before.headers["x-kimi-tier"] == "standard"
    streams = [Stream(serve_url, key, "kimi-k2.5:standard") for _ in range(2)]
    wait_for("the streams flowing", lambda: all(len(s.events) >= 3 for s in streams), 60)

    routers = router_nodes()  # one a node (router.max_replicas_per_node): one survives
    assert len(routers) == 2 and len(set(routers)) == 2, routers
    lose(cluster, node)
    lost_at = time.monotonic()
    try:
        for s in streams:
            assert s.ended.wait(90), "a stream on the lost node hung"
            assert s.status == 200
            last = s.events[-1]
            # the router names the lost tier replica in an error event; a router that was on
            # the lost node itself can only drop the connection
            assert "error" in last or "transport" in last, last
            if "error" in last:
                error = last["error"]
                assert error["type"] == "server_error" and "retry" in error["message"], error

        seen: list[str] = []  # what each request got while the node was gone, for a failure

        def served() -> httpx.Response | None:
            at = f"{time.monotonic() - lost_at:.1f}s"
            try:
                r = ask()
            except httpx.TransportError as exc:
                # held while Serve replaces the lost routers, or sent by HAProxy to one of
                # them before it saw it gone (the connection ends with no answer)
                seen.append(f"{at} {exc!r}")
                return None
            seen.append(f"{at} {r.status_code} {r.text[:80]!r}")
            assert r.status_code in (200, 503), seen  # never a 500 while the node is gone
            return r if r.status_code == 200 else None

        try:
            moved = wait_for("a request served without the lost node", served, 420, every_s=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; answers: {seen}") from None
        assert moved.headers["x-kimi-tier"] == "premium"  # the plan's next tier
        assert gateway_node() not in (None, node.node_id)  # made again elsewhere
    finally:  # the rest of the session needs the tiers this node held, whatever failed
        cluster.add_node(**NODES["ram"])

    def tiers_back() -> bool:
        try:
            tiers = httpx.get(f"{serve_url}/ready", timeout=30).json()["tiers"]
        except httpx.TransportError:
            return False
        # budget may scale to zero (it is then "idle": a request wakes it)
        return tiers["standard"] is True and tiers["budget"] in (True, "idle")

    wait_for("standard and budget back on the new node", tiers_back, 300, every_s=2)
    woken = httpx.post(
        f"{serve_url}/v1/chat/completions",
        json={"model": "kimi-k2.5:budget", "messages": MSG, "max_tokens": 3},
        headers={"authorization": f"Bearer {new_key(admin, 'enterprise')[0]}"},
        timeout=120,
    )
    assert woken.status_code == 200 and woken.headers["x-kimi-tier"] == "budget"
    back = wait_for(
        "standard serving again",
        lambda: (r := ask()).status_code == 200 and r.headers["x-kimi-tier"] == "standard" and r,
        120,
        every_s=2,
    )
    assert back
    table = flushed_usage(admin, state_dir)
    rows = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    ids = [r["request_id"] for r in rows]
    served_ids = [rid for rid, status in answers.items() if status == 200]
    assert sorted(i for i in ids if i in answers) == sorted(served_ids)  # each once
    for s in streams:
        [cut] = [r for r in rows if r["request_id"] == s.rid] or [None]
        if cut is not None:  # its router lived to settle it: recorded, not charged
            assert cut["status"] >= 500 and cut["cost_usd"] == 0, cut
