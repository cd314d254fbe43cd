"""Webhook signing (checked with the `openai` SDK's own verifier), the outbound URL
policy, and the delivery bookkeeping on a real SQLite file."""

from __future__ import annotations

import json
import time

import openai
import pytest

from serve_app.config import OutboundPolicy
from serve_app.outbound import Refused, public, resolve
from serve_app.store.responses_db import ResponsesDB, StoreLimits
from serve_app.store.webhook_delivery import backoff_s, event_body, new_secret, signature


def test_an_event_we_sign_is_unwrapped_by_the_openai_sdk():
    secret = new_secret()
    body = event_body("evt_1", "response.completed", "resp_9")
    now = int(time.time())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(now),
        "webhook-signature": signature(secret, "evt_1", now, body),
    }
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    event = client.webhooks.unwrap(body, headers)
    assert (event.type, event.id, event.data.id) == ("response.completed", "evt_1", "resp_9")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body.replace("resp_9", "resp_8"), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, headers, secret=new_secret())


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # plain http
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",  # the cloud metadata address
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
        "https://user:pw@example.com/hook",
        "ftp://example.com/hook",
    ],
)
async def test_the_default_policy_reaches_only_public_https(url):
    with pytest.raises(Refused):
        await resolve(url, OutboundPolicy())


async def test_an_allow_list_admits_its_hosts_only():
    policy = OutboundPolicy(allowed_hosts=["127.0.0.1", "*.internal.example"], allow_http=True)
    target = await resolve("http://127.0.0.1:8123/hook?x=1", policy)
    assert target.pinned_url() == "http://127.0.0.1:8123/hook?x=1"
    with pytest.raises(Refused, match="allow-listed"):
        await resolve("https://93.184.215.14/hook", policy)
    assert public("93.184.215.14") and not public("100.64.0.1") and not public("fe80::1")


def test_deliveries_are_kept_until_taken_retried_and_isolated(tmp_path):
    store = ResponsesDB(tmp_path / "s.db", StoreLimits(ttl_s=60, quota_bytes=10**6))
    hooks = store.webhooks
    made = hooks.add(
        "alice", "we_1", "n", "https://a.example/h", new_secret(), ["response.completed"]
    )
    assert made["signing_secret"].startswith("whsec_")
    assert "signing_secret" not in hooks.get("alice", "we_1") and hooks.get("bob", "we_1") is None
    hooks.add("alice", "we_2", "n", "https://b.example/h", new_secret(), ["response.failed"])
    assert hooks.emit("alice", "evt_1", "response.completed", "resp_1") == 1
    assert hooks.emit("alice", "evt_1", "response.completed", "resp_1") == 1  # a retried emit
    [due] = hooks.due(time.time())
    assert (due.event_id, due.endpoint, due.attempts) == ("evt_1", "we_1", 0)
    assert json.loads(due.body)["data"] == {"id": "resp_1"}
    hooks.attempted(due, "HTTP 500", time.time() + 60)
    assert hooks.due(time.time()) == []  # backing off
    [again] = hooks.due(time.time() + 61)
    hooks.attempted(again, None, None)
    assert hooks.due(time.time() + 3600) == []
    [record] = hooks.deliveries("alice", "evt_1")
    assert record["attempts"] == 2 and record["done_at"] is not None
    assert hooks.deliveries("bob", "evt_1") == []
    assert backoff_s(1, 2.0) == 2.0 and backoff_s(3, 2.0) == 8.0
    assert store.delete_owner("alice") >= 2 and hooks.list("alice") == []
