"""The gateway through real Ray Serve: keys, plans, limits across router replicas,
budgets, cost, and usage records that match what clients were told."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.compute as pc
import pytest
import ray

from tests.integration.conftest import ADMIN_TOKEN, flushed_usage, new_key

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]


def chat(url: str, key: str | None, model: str = "kimi-k2.5", **extra) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": MSG, "max_tokens": 4, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_guessing_the_admin_credential_is_slowed_per_address(serve_url):
    """20 wrong admin credentials from one client address (as a trusted proxy names it
    in X-Forwarded-For): the first ten are 401s, then its door closes for longer after
    each failure, 429 with Retry-After, whatever is tried; the right credential from
    another address is accepted."""
    url = f"{serve_url}/admin/keys"
    wrong = {"authorization": "Bearer guess-0000", "x-forwarded-for": "203.0.113.5"}
    codes = [httpx.get(url, headers=wrong, timeout=60).status_code for _ in range(20)]
    assert codes[:10] == [401] * 10 and codes[-1] == 429, codes
    right = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    refused = httpx.get(url, headers={**right, "x-forwarded-for": "203.0.113.5"}, timeout=60)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "too_many_attempts"
    elsewhere = httpx.get(url, headers={**right, "x-forwarded-for": "203.0.113.9"}, timeout=60)
    assert elsewhere.status_code == 200


def test_admin_api_needs_its_own_credential(serve_url, admin):
    assert httpx.get(f"{serve_url}/admin/keys").status_code == 401
    key, _ = new_key(admin, "standard")
    r = httpx.get(f"{serve_url}/admin/keys", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    listed = admin.get("/admin/keys").json()["data"]
    assert listed and all("key" not in k and "key_hash" not in k for k in listed)
    assert admin.post("/admin/keys", json={"plan": "platinum"}).status_code == 400


def test_bad_and_revoked_keys_get_401_at_once(serve_url, admin):
    key, key_id = new_key(admin, "standard")
    assert chat(serve_url, key).status_code == 200
    bad = chat(serve_url, key[:-2] + "xx")
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    # a placeholder that is not a kimi key is anonymous where key-less use is allowed
    anon = chat(serve_url, "unused")
    assert anon.status_code == 200  # with its plan's limits (the tests' enterprise has one)
    assert anon.headers["x-ratelimit-limit-requests"] == "1000000"
    assert admin.delete(f"/admin/keys/{key_id}").json()["revoked"] is True
    r = chat(serve_url, key)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_any_string_in_our_key_format_is_verified_on_every_api(serve_url, admin):
    """With anonymous use on (the tests' app), a truncated, mistyped, revoked or expired
    sk-kimi- key is refused in each API's own error shape, never served as anonymous."""
    key, key_id = new_key(admin, "standard")
    revoked, revoked_id = new_key(admin, "standard")
    admin.delete(f"/admin/keys/{revoked_id}")
    made = admin.post("/admin/keys", json={"plan": "standard", "expires_at": time.time() + 1})
    expired = made.json()["key"]
    time.sleep(1.5)
    wrong = [
        f"sk-kimi-{key_id}-WRONGWRONGWRONG",  # a real id, a short secret
        "sk-kimi-bogus-0000",
        key[:-2] + "xx",
        key[:20],
        "sk-kimi-",
        revoked,
        expired,
    ]
    for bad in wrong:
        r = chat(serve_url, bad)
        assert r.status_code == 401, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(
            f"{serve_url}/v1/messages",
            json={"model": "kimi-k2.5", "max_tokens": 4, "messages": MSG},
            headers={"x-api-key": bad, "anthropic-version": "2023-06-01"},
            timeout=60,
        )
        assert r.status_code == 401, (bad, r.text)
        assert r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(
            f"{serve_url}/v1/responses",
            json={"model": "kimi-k2.5", "max_output_tokens": 4, "input": "hi"},
            headers={"authorization": f"Bearer {bad}"},
            timeout=60,
        )
        assert r.status_code == 401, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    for placeholder in ("unused", "sk-placeholder", "EMPTY"):  # not our format: anonymous
        assert chat(serve_url, placeholder).status_code == 200


def test_plan_without_premium_cannot_pin_it(serve_url, admin):
    key, _ = new_key(admin, "standard")
    r = chat(serve_url, key, model="kimi-k2.5:premium")
    assert r.status_code == 403 and r.json()["error"]["code"] == "tier_not_in_plan"
    ok = chat(serve_url, key)  # the base model follows the plan: standard tier
    assert ok.status_code == 200 and ok.headers["x-kimi-tier"] == "standard"


def test_a_key_less_refusal_carries_the_rate_limit_headers_too(serve_url):
    """A prompt the router lets through (its estimate is low) and budget's engine counts
    past its context: the 400 of a key-less request says what is left of the plan's
    limits, as its answers do, in each API's own shape."""
    long = [{"role": "user", "content": "word " * 18_000}]
    for path, body in (
        ("/v1/chat/completions", {"model": "kimi-k2.5:budget", "messages": long, "max_tokens": 8}),
        ("/v1/messages", {"model": "kimi-k2.5:budget", "messages": long, "max_tokens": 8}),
    ):
        r = httpx.post(f"{serve_url}{path}", json=body, timeout=120)
        assert r.status_code == 400, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "1000000", path
        error = r.json()["error"]
        if path == "/v1/messages":
            assert re.fullmatch(r"prompt is too long: \d+ tokens > 16384 maximum", error["message"])
        else:
            assert error["code"] == "context_length_exceeded", error


def test_rpm_limit_is_per_key_with_retry_after_and_headers(serve_url, admin):
    key, _ = new_key(admin, "standard", requests_per_minute=3)
    other, _ = new_key(admin, "standard", requests_per_minute=3)
    first = chat(serve_url, key)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert "x-ratelimit-remaining-tokens" in first.headers
    codes = [chat(serve_url, key).status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = chat(serve_url, key)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 20
    # the refusal says what is left too, as the answers do
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert chat(serve_url, other).status_code == 200


def test_limit_holds_across_two_router_replicas(serve_url, admin):
    limit = 6
    key, _ = new_key(admin, "standard", requests_per_minute=limit)
    start = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: chat(serve_url, key), range(24)))
    elapsed = time.monotonic() - start
    admitted = [r for r in responses if r.status_code == 200]
    routers = {r.headers.get("x-kimi-router") for r in responses}  # refusals name theirs too
    assert {r.status_code for r in responses} <= {200, 429}
    assert len(admitted) <= limit + int(elapsed * limit / 60)
    assert len(admitted) >= limit
    assert len(routers) == 2, routers


def test_budget_exhaustion_answers_402(serve_url, admin):
    key, _ = new_key(admin, "standard", monthly_token_budget=150)
    statuses = [chat(serve_url, key).status_code for _ in range(8)]
    assert statuses[0] == 200 and statuses[-1] == 402
    r = chat(serve_url, key)
    assert r.json()["error"]["code"] == "insufficient_quota"


def test_cost_in_response_header_and_final_stream_chunk(serve_url, admin):
    key, _ = new_key(admin, "premium")
    r = chat(serve_url, key)
    usage = r.json()["usage"]
    assert usage["cost"] > 0 and float(r.headers["x-kimi-cost-usd"]) == pytest.approx(usage["cost"])
    expected = (usage["prompt_tokens"] * 0.60 + usage["completion_tokens"] * 2.50) / 1e6
    assert usage["cost"] == pytest.approx(expected, rel=1e-6)
    with httpx.stream(
        "POST",
        f"{serve_url}/v1/chat/completions",
        timeout=60,
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": "kimi-k2.5",
            "messages": MSG,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["cost"] > 0


def test_every_request_metered_with_the_usage_the_client_saw(serve_url, admin, state_dir):
    key, key_id = new_key(admin, "enterprise")
    seen: dict[str, dict] = {}
    for i, tier in enumerate(["premium", "standard", "budget"] * 2):
        rid = f"meter-{uuid.uuid4().hex}"
        headers = {"authorization": f"Bearer {key}", "x-request-id": rid}
        body = {"model": f"kimi-k2.5:{tier}", "messages": MSG, "max_tokens": 3 + i}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream(
                "POST", f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=60
            ) as s:
                events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
            seen[rid] = json.loads(events[-2])["usage"]
        else:
            seen[rid] = httpx.post(
                f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=60
            ).json()["usage"]
    # a stream whose client did not ask for usage is metered all the same
    rid = f"meter-{uuid.uuid4().hex}"
    with httpx.stream(
        "POST",
        f"{serve_url}/v1/chat/completions",
        timeout=60,
        headers={"authorization": f"Bearer {key}", "x-request-id": rid},
        json={"model": "kimi-k2.5:budget", "messages": MSG, "max_tokens": 5, "stream": True},
    ) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert all('"usage"' not in e or '"usage": null' in e for e in events[:-1])
    table = flushed_usage(admin, state_dir)
    mine = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    assert len(mine) == len(seen) + 1
    by_id = {r["request_id"]: r for r in mine}
    for rid_, usage in seen.items():
        rec = by_id[rid_]
        assert rec["prompt_tokens"] == usage["prompt_tokens"]
        assert rec["completion_tokens"] == usage["completion_tokens"]
        assert rec["cost_usd"] == pytest.approx(usage["cost"])
        assert rec["status"] == 200 and rec["plan"] == "enterprise"
    assert by_id[rid]["completion_tokens"] == 5 and by_id[rid]["stream"]


def test_keys_at_rest_are_hashes(admin, state_dir):
    key, key_id = new_key(admin, "free")
    raw = b"".join(p.read_bytes() for p in state_dir.glob("keys.db*"))
    assert key.encode() not in raw and key_id.encode() in raw
    rows = sqlite3.connect(state_dir / "keys.db").execute("SELECT key_hash FROM keys").fetchall()
    assert all(len(h) == 64 for (h,) in rows)


def test_killing_a_router_replica_loses_no_completed_record(serve_url, admin, state_dir):
    key, key_id = new_key(admin, "enterprise")
    completed: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                rid = f"kill-{uuid.uuid4().hex}"
                try:
                    r = c.post(
                        f"{serve_url}/v1/chat/completions",
                        headers={"authorization": f"Bearer {key}", "x-request-id": rid},
                        json={"model": "kimi-k2.5:budget", "messages": MSG, "max_tokens": 4},
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    completed.append(rid)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    routers = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Ingress" in a["name"] and a["namespace"] == "serve"
    ]
    assert len(routers) == 2
    ray.kill(ray.get_actor(routers[0]["name"], namespace="serve"), no_restart=False)
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join()
    table = flushed_usage(admin, state_dir)
    metered = set(table.filter(pc.equal(table["key_id"], key_id))["request_id"].to_pylist())
    assert len(completed) > 10
    assert set(completed) <= metered


def test_a_swarm_of_100_in_one_session_never_passes_its_token_cap(serve_url, admin, state_dir):
    """100 requests of one session sent at once against a 3,000-token session cap: each
    is admitted only with its most possible cost held (its output limit lowered to what
    is left), so what the session used, by its usage records, is within the cap."""
    key, key_id = new_key(admin, "enterprise", max_session_tokens=3000)
    headers = {"authorization": f"Bearer {key}", "x-session-id": "swarm-capped"}
    # premium: its one replica (standard would scale out for this, under the next tests)
    body = {"model": "kimi-k2.5:premium", "messages": MSG, "max_tokens": 48, "ignore_eos": True}

    def one(_: int) -> httpx.Response:
        return httpx.post(
            f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=300
        )

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(one, range(100)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 402} and codes.count(200) >= 1 and codes.count(402) >= 1
    refused = [r.json()["error"] for r in answers if r.status_code == 402]
    assert {e["code"] for e in refused} == {"session_budget_exceeded"}
    table = flushed_usage(admin, state_dir)
    rows = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    assert len(rows) == codes.count(200)  # each served request metered once
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows if r["status"] == 200)
    assert 0 < used <= 3000, used


def test_a_sessions_concurrency_cap_refuses_the_requests_past_it(serve_url, admin):
    key, _ = new_key(admin, "enterprise", max_concurrent_per_session=2)
    headers = {"authorization": f"Bearer {key}", "x-session-id": "narrow"}
    body = {"model": "kimi-k2.5:premium", "messages": MSG, "max_tokens": 400, "ignore_eos": True}
    started, ended = threading.Barrier(3), threading.Event()

    def hold() -> int:
        with httpx.stream(
            "POST",
            f"{serve_url}/v1/chat/completions",
            json={**body, "stream": True},
            headers=headers,
            timeout=300,
        ) as r:
            started.wait()
            ended.wait(120)
            return r.status_code

    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(hold) for _ in range(2)]
        started.wait()  # both streams answered: two of the session's requests in flight
        third = httpx.post(
            f"{serve_url}/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        other = httpx.post(
            f"{serve_url}/v1/chat/completions",
            json={**body, "max_tokens": 2},
            headers={**headers, "x-session-id": "another"},
            timeout=120,
        )
        ended.set()
        assert [f.result() for f in held] == [200, 200]
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "session_concurrency_exceeded"
    assert int(third.headers["retry-after"]) >= 1
    assert other.status_code == 200  # another session of the key is not held back
