"""The gateway actor's class run in-process (no Ray), and the records its tests settle."""

from __future__ import annotations

from typing import Any

from serve_app.config import Plan
from serve_app.gateway.actor import GatewayState
from serve_app.gateway.protocol import Caller, KeyOverrides, UsageRecord

Gateway = GatewayState.__ray_actor_class__  # the class itself, without Ray
CALLER = Caller("abcdefabcdef", "pro", KeyOverrides())
T0 = 1795400000.0


def plans(**limits: Any) -> dict[str, dict]:
    """The one plan `pro` (premium only) with `limits`, as the actor takes plans."""
    return {"pro": Plan(tiers=["premium"], **limits).model_dump(mode="json")}


def record(n: int, status: int = 200, **fields: Any) -> UsageRecord:
    """Request `req-n` of CALLER, as a router settles it (10 prompt, n + 1 output tokens)."""
    base = {
        "request_id": f"req-{n}",
        "key_id": CALLER.key_id,
        "plan": "pro",
        "tier": "premium",
        "model": "kimi-k2.5",
        "endpoint": "chat",
        "stream": False,
        "time": T0 + n,
        "status": status,
        "prompt_tokens": 10,
        "completion_tokens": n + 1,
    }
    return UsageRecord(**(base | fields))
