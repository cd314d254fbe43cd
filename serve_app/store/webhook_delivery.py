"""Webhooks: a key's endpoints hear when its background responses end.

Events are OpenAI's (`response.completed` / `.failed` / `.cancelled` / `.incomplete`,
`{"id": "evt_...", "object": "event", "type", "created_at", "data": {"id"}}`), signed the
way OpenAI signs them (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, the key being the
base64 after `whsec_`), so the `openai` SDK's `webhooks.unwrap` verifies them. Each
delivery is retried with exponential backoff until a 2xx; the event id stays the same, so
a receiver that saw it already can tell (at least once, never silently lost).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

import httpx

from serve_app.config import WebhookSettings
from serve_app.outbound import Refused, resolve

EVENT_TYPES = (
    "response.completed",
    "response.failed",
    "response.cancelled",
    "response.incomplete",
)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(secret: str, event_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{event_id}.{timestamp}.{body}".encode()
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def event_body(event_id: str, kind: str, response_id: str) -> str:
    event = {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created_at": int(time.time()),
        "data": {"id": response_id},
    }
    return json.dumps(event, separators=(",", ":"))


@dataclass(frozen=True)
class Delivery:
    event_id: str
    endpoint: str
    url: str
    secret: str
    body: str
    attempts: int  # made before this one


def backoff_s(attempts: int, base_s: float) -> float:
    return min(base_s * 2 ** max(attempts - 1, 0), 3600.0)


async def deliver(client: httpx.AsyncClient, d: Delivery, settings: WebhookSettings) -> str | None:
    """One attempt; None when the endpoint took it (2xx), else why not."""
    try:
        target = await resolve(d.url, settings.outbound)
    except Refused as exc:
        return f"refused: {exc}"
    now = int(time.time())
    default_port = 443 if target.scheme == "https" else 80
    host = target.host if target.port == default_port else f"{target.host}:{target.port}"
    headers = {
        "host": host,
        "content-type": "application/json",
        "user-agent": "kimi-serve-webhooks/1",
        "webhook-id": d.event_id,
        "webhook-timestamp": str(now),
        "webhook-signature": signature(d.secret, d.event_id, now, d.body),
    }
    try:
        r = await client.post(
            target.pinned_url(),
            content=d.body,
            headers=headers,
            timeout=settings.timeout_s,
            extensions={"sni_hostname": target.host},
        )
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"
