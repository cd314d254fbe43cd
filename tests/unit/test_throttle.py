"""Credential guessing slowed (gateway/throttle.py): per address, doors that close for
longer after each failure past the free ones; in total, a bucket that bounds the rate
and all that other addresses' failures can cost a right credential."""

from __future__ import annotations

import ipaddress

import pytest
from starlette.requests import Request

from serve_app.api.admin import AdminAPI, Doorman
from serve_app.api.common.http import client_address
from serve_app.errors import APIError
from serve_app.gateway.throttle import FREE, GLOBAL_BURST, GLOBAL_PER_S, MAX_BLOCK_S, Throttle
from tests.fakes.gateway import InMemoryGuard


def test_an_address_waits_longer_after_each_failure_past_the_free_ones():
    t = Throttle()
    waits = [t.failed("admin", "203.0.113.5", now=100.0) for _ in range(FREE + 4)]
    assert waits[:FREE] == [0.0] * FREE
    assert waits[FREE:] == [1.0, 2.0, 4.0, 8.0]
    assert t.wait("admin", "203.0.113.5", now=100.0) == 8.0
    assert t.wait("admin", "203.0.113.9", now=100.0) == 0.0  # another address: at once
    assert t.wait("console", "203.0.113.5", now=100.0) == 0.0  # another scope
    assert t.wait("admin", "203.0.113.5", now=108.5) == 0.0


def test_the_wait_is_bounded_and_a_quiet_address_starts_afresh():
    t = Throttle()
    for _ in range(FREE + 40):
        last = t.failed("admin", "a", now=0.0)
    assert last == MAX_BLOCK_S
    assert t.failed("admin", "a", now=MAX_BLOCK_S * 3) == 0.0  # forgotten


def test_many_addresses_drain_the_global_bucket_which_bounds_every_attempt():
    t = Throttle()
    now = t.filled_at
    for i in range(int(GLOBAL_BURST)):
        t.failed("admin", f"10.0.{i // 250}.{i % 250}", now=now)
    wait = t.wait("admin", "198.51.100.1", now=now)  # a fresh address, maybe the operator
    assert 0 < wait <= 1 / GLOBAL_PER_S
    assert t.wait("admin", "198.51.100.1", now=now + 1 / GLOBAL_PER_S) == 0.0


def request(address: str | None, bearer: str, peer: str = "127.0.0.1") -> Request:
    headers = [(b"authorization", f"Bearer {bearer}".encode())]
    if address:
        headers.append((b"x-forwarded-for", address.encode()))
    scope = {"type": "http", "method": "GET", "path": "/admin/keys", "headers": headers}
    return Request(scope | {"client": (peer, 40000)})


def test_the_client_address_is_the_last_one_no_trusted_proxy_wrote():
    trusted = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    assert client_address(request(None, "x"), trusted) == "127.0.0.1"
    assert client_address(request("198.51.100.7", "x"), trusted) == "198.51.100.7"
    # a client's own entry left of the proxies' is not believed
    spoofed = request("1.2.3.4, 198.51.100.7, 10.1.1.1", "x")
    assert client_address(spoofed, trusted) == "198.51.100.7"
    # from an untrusted peer, X-Forwarded-For is ignored
    direct = request("1.2.3.4", "x", peer="203.0.113.50")
    assert client_address(direct, trusted) == "203.0.113.50"


async def test_wrong_admin_credentials_from_one_address_end_in_429_not_for_another(
    monkeypatch,
):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "right-credential")
    trusted = [ipaddress.ip_network("127.0.0.0/8")]
    admin = AdminAPI(None, None, "TEST_ADMIN_TOKEN", 1, Doorman(InMemoryGuard(), trusted))  # type: ignore[arg-type]
    statuses = []
    for _ in range(20):
        try:
            await admin.check(request("203.0.113.5", "wrong"))
        except APIError as exc:
            statuses.append(exc.status)
    assert statuses[:FREE] == [401] * FREE and statuses[-1] == 429
    with pytest.raises(APIError) as refused:  # even the right one, from that address
        await admin.check(request("203.0.113.5", "right-credential"))
    assert refused.value.status == 429 and int(refused.value.headers["retry-after"]) >= 1
    await admin.check(request("203.0.113.9", "right-credential"))  # another address: in
