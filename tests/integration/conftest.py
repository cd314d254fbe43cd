"""One real Ray cluster and one deployment of the embedded default for the whole session.

Every integration test talks HTTP to the same router; engines start once (~1 min).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from deployments.ports import free_listen_port
from serve_app.ray_env import LOCAL_AUTH, on_free_ports, ray_env, stop_orphaned_haproxy

ROOT = Path(__file__).resolve().parents[2]


ADMIN_TOKEN = "test-admin-token"


STATE_FS = "512m"  # the state dir's own filesystem, which the disk-full test fills


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The state dir (keys, usage, stored responses), on a tmpfs of its own where this
    machine lets us mount one, so a test can fill it without filling the machine's."""
    path = tmp_path_factory.mktemp("kimi-state")
    mount = ["mount", "-t", "tmpfs", "-o", f"size={STATE_FS}", "tmpfs", str(path)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0
    yield path
    if mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def own_filesystem(path: Path) -> bool:
    return os.path.ismount(path)


# The session's cluster is three Ray nodes on this machine, as cluster/local_multinode.sh
# starts them: custom resources stand in for the production node types.
NODES = {
    "head": {"num_cpus": 4, "resources": {"node_head": 1}},
    "h200": {"num_cpus": 2, "resources": {"node_h200x8": 1}},
    "ram": {"num_cpus": 2, "resources": {"host_ram_gb": 800}},
}
# The embedded default, placed on those nodes and with delays short enough to watch the
# autoscaler act within a test (the figures the tests assert against come from here).
OVERLAY: dict[str, dict] = {
    "premium": {
        "resources": {"num_cpus": 0.5, "custom": {"node_h200x8": 1}},
        "engine_args": {"max-num-seqs": 8},  # saturates with a handful of streams
        # no TTFT objective: tests that saturate premium must not make later ones spill
        "slo": {"ttft_ms": None},
    },
    "standard": {
        "resources": {"num_cpus": 0.25, "custom": {"host_ram_gb": 100}},
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 4,
            "upscale_delay_s": 2,
            "downscale_delay_s": 30,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    },
    "budget": {
        "resources": {"num_cpus": 0.25, "custom": {"host_ram_gb": 100}},
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 1,
            "initial_replicas": 1,
            "downscale_to_zero_delay_s": 20,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    },
}


def session_app_args() -> dict:
    from serve_app.cli import app_args

    args = app_args(ROOT / "serve_config.yaml")
    for tier in args["tiers"]:
        for field, values in OVERLAY[tier["name"]].items():
            tier[field] = {**tier.get(field, {}), **values}
    args["router"]["allow_strategy_header"] = True
    # as in production: the routers on two nodes, so a lost node leaves one serving
    args["router"]["max_replicas_per_node"] = 1
    # a plan whose first tier (standard) shares a node with budget, and whose next
    # (premium) does not: the node-loss test watches its requests move
    args["plans"]["spill"] = {"tiers": ["standard", "premium"], "allow_degrade": True}
    # a per-minute limit no test reaches, so key-less answers (the enterprise plan's)
    # carry the x-ratelimit headers a plan with limits gives them
    args["plans"]["enterprise"]["requests_per_minute"] = 1_000_000
    # webhook receivers in the tests listen on this machine, over plain http
    outbound = {"allowed_hosts": ["127.0.0.1"], "allow_http": True}
    args["sessions"] = {"webhooks": {"outbound": outbound, "retry_base_s": 0.2}}
    # image URLs from this machine's `localhost` only (the vision tests serve images there;
    # 127.0.0.1 by that name stays refused)
    remote = {"enabled": True, "allowed_hosts": ["localhost"], "allow_http": True}
    args["media"] = {**args["media"], "remote": remote}
    return args


@pytest.fixture(scope="session")
def cluster(state_dir: Path) -> Iterator[object]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's workers inherit these: the gateway keeps keys and usage in the session's dir.
    os.environ["KIMI_SERVE_STATE"] = str(state_dir)
    os.environ["KIMI_SERVE_ADMIN_TOKEN"] = ADMIN_TOKEN
    os.environ["KIMI_SERVE_TRACES"] = f"file:{state_dir / 'traces.jsonl'}"
    # The "nodes" share one machine: the proxy's preference for router replicas on its own
    # node would send every request to one of them, and the tests want both to serve.
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    # as `ray start` gets them (cluster/ray.env), HAProxy's own ports where nothing else is
    os.environ.update({**ray_env(), **on_free_ports(), **LOCAL_AUTH})
    # A 2-core machine needs more logical CPUs than it reports (README: `make serve`).
    c = Cluster(initialize_head=True, head_node_args={**NODES["head"], "include_dashboard": False})
    c.add_node(**NODES["h200"])
    c.add_node(**NODES["ram"])
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()
    stop_orphaned_haproxy()


@pytest.fixture(scope="session")
def serve_url(cluster: object) -> Iterator[str]:
    from ray import serve

    from serve_app.app import build_app

    port = free_listen_port()  # bound by HAProxy once Serve starts
    # One proxy, on the head, as serve_config.yaml says: the "nodes" share one machine, and
    # a worker node's HAProxy would find the head's holding its ports and restart forever.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(session_app_args()), name="kimi", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/ready", timeout=10)
            # every tier up (the scale-to-zero one may already have gone idle again)
            tiers = r.json()["tiers"].values()
            if r.status_code == 200 and all(v is True or v == "idle" for v in tiers):
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("the application never became ready")
    yield url
    serve.shutdown()


def new_key(admin: httpx.Client, plan: str, **overrides: object) -> tuple[str, str]:
    """A fresh API key of `plan`, with per-key `overrides`: the key and its id."""
    r = admin.post("/admin/keys", json={"plan": plan, "name": "test", "overrides": overrides})
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["key_id"]


def flushed_usage(admin: httpx.Client, state_dir: Path) -> Any:
    """Every usage record so far (the gateway's batch flushed first), as an Arrow table."""
    from serve_app.gateway.usage_log import read_usage

    assert admin.post("/admin/usage/flush").status_code == 200
    return read_usage(state_dir / "usage")


@pytest.fixture(scope="session")
def client(serve_url: str, admin: httpx.Client) -> openai.OpenAI:
    """The official OpenAI client with an enterprise-plan key (all tiers, no limits)."""
    key = admin.post("/admin/keys", json={"plan": "enterprise", "name": "sdk"}).json()["key"]
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def admin(serve_url: str) -> httpx.Client:
    return httpx.Client(
        base_url=serve_url, timeout=60, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )


class Hogs:
    """Long streaming requests pinned to one tier, from threads, until stopped; closing
    a stream cancels its engine request, so the tier drains as soon as the hogs stop."""

    def __init__(self, url: str, key: str, model: str, n: int, max_tokens: int) -> None:
        self.url, self.key, self.model, self.max_tokens = url, key, model, max_tokens
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"authorization": f"Bearer {self.key}"}
        while not self.stop.is_set():
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream(
                    "POST",
                    f"{self.url}/v1/chat/completions",
                    json=body,
                    headers=headers,
                    timeout=120,
                ) as r,
            ):
                # a hog the router refuses for good would leave the tier idle: fail loudly
                assert r.status_code in (200, 429, 503), r.read()[:300]
                if r.status_code != 200:
                    time.sleep(0.5)  # shed or limited: try again shortly
                for _ in r.iter_lines():
                    if self.stop.is_set():
                        break

    def __enter__(self) -> Hogs:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


def tier_status(url: str, tier: str) -> dict | None:
    return httpx.get(f"{url}/status", timeout=30).json()["tiers"][tier]


def tier_pressure(url: str, tier: str) -> float:
    """(running + waiting in the engines + waiting at the routers) / capacity."""
    s = tier_status(url, tier)
    return 0.0 if not s else (s["running"] + s["waiting"] + s["queued"]) / s["capacity"]


def wait_for(what: str, check: Callable[[], object], timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@contextlib.contextmanager
def saturated(
    url: str, key: str, tier: str, n: int, max_tokens: int, above: float, holds: float
) -> Iterator[Hogs]:
    """Hogs on `tier` until its pressure passes `above`, and still passes `holds` once the
    routers have had time to see it (they read the load board every 0.5 s)."""
    with Hogs(url, key, f"kimi-k2.5:{tier}", n=n, max_tokens=max_tokens) as hogs:
        wait_for(f"{tier} over {above}", lambda: tier_pressure(url, tier) > above, 90)
        time.sleep(1.0)
        assert tier_pressure(url, tier) > holds, "saturation did not hold"
        yield hogs
