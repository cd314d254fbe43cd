"""A router (ingress) replica killed with streams in flight through it and requests
waiting in its fair queue, through real Ray Serve and vLLM: every request keeps exactly
one usage record (the lost router's settled by the gateway from their leases: status
502, the tokens generated, nothing billed), none admitted twice, and the routers serve
on. Asserted on records, never on time."""

from __future__ import annotations

import collections
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.compute as pc
import pytest
import ray

from serve_app.gateway.leases import LEASE_S, LOST
from tests.integration.conftest import flushed_usage, new_key, tier_status, wait_for

pytestmark = pytest.mark.integration

N = 24  # premium runs 8 at once in the tests' overlay, 4 per router: most of these queue


def routers() -> dict[str, str]:
    """The live router replicas: replica id -> actor name."""
    return {
        a["name"].rsplit("#", 1)[-1]: a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and "Ingress#" in a["name"]
    }


def test_a_router_lost_mid_stream_and_mid_queue_leaves_one_record_per_request(
    serve_url, admin, state_dir
):
    key, key_id = new_key(admin, "enterprise")
    ids = [f"lost-{uuid.uuid4().hex}" for _ in range(N)]
    began: dict[str, str] = {}  # request id -> the router its answer came from
    outcome: dict[str, str] = {}

    def one(rid: str) -> None:
        body = {
            "model": "kimi-k2.5:premium",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"authorization": f"Bearer {key}", "x-request-id": rid}
        try:
            with httpx.stream(
                "POST", f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=300
            ) as r:
                if r.status_code != 200:
                    outcome[rid] = f"http {r.status_code}"
                    return
                began[rid] = r.headers["x-kimi-router"]
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        outcome[rid] = "done"
                        return
                outcome[rid] = "cut"
        except httpx.HTTPError as exc:
            outcome[rid] = f"broken: {type(exc).__name__}"

    with ThreadPoolExecutor(N) as pool:
        futures = [pool.submit(one, rid) for rid in ids]
        wait_for(
            "streams under way and requests waiting at the routers",
            lambda: len(began) >= 4 and (tier_status(serve_url, "premium") or {}).get("queued"),
            120,
            every_s=0.2,
        )
        [(lost_router, _)] = collections.Counter(began.values()).most_common(1)
        ray.kill(ray.get_actor(routers()[lost_router], namespace="serve"), no_restart=False)
        for f in futures:
            f.result()

    def metered() -> list[dict] | None:
        table = flushed_usage(admin, state_dir)
        rows = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
        return rows if {r["request_id"] for r in rows} >= set(ids) else None

    # the lost router's leases lapse and the gateway settles them
    rows = wait_for("a record of every request", metered, LEASE_S + 60, every_s=2)
    by_id = {r["request_id"]: r for r in rows}
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # each once, none twice
    lost = [r for r in rows if r["error"] == LOST]
    assert lost, outcome
    assert all(r["status"] == 502 and r["cost_usd"] == 0.0 for r in lost)
    # the streams under way through it: recorded with what they had generated
    cut = [rid for rid, router in began.items() if router == lost_router and outcome[rid] != "done"]
    assert cut and all(by_id[rid]["error"] == LOST for rid in cut), (cut, outcome)
    assert all(by_id[rid]["completion_tokens"] > 0 for rid in cut)
    # those waiting in its queue: recorded with nothing generated, never sent to vLLM
    waiting = [rid for rid in ids if rid not in began and by_id[rid]["error"] == LOST]
    assert waiting and all(by_id[rid]["completion_tokens"] == 0 for rid in waiting)
    # every answer a client read to its end is billed once; nothing else is
    for rid, how in outcome.items():
        assert (by_id[rid]["status"] == 200) == (how == "done"), (rid, how, by_id[rid])
    # Serve replaces the router; both serve again
    wait_for("two routers again", lambda: len(routers()) == 2, 120)
    r = httpx.post(
        f"{serve_url}/v1/chat/completions",
        json={"model": "kimi-k2.5:premium", "messages": [{"role": "user", "content": "go"}],
              "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
