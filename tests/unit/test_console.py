"""The console's pure parts: sign-in sessions, CSRF tokens, forms, charts, and /status
keeping replica detail for operators where keys are required. The console itself runs in
a real browser in tests/integration/test_console.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.requests import Request

from deployments.scheduling.loadboard import ReplicaLoad, aggregate
from serve_app.api.console.charts import bar_chart
from serve_app.api.console.pages import csrf_for, expiry_of, overrides_of
from serve_app.api.ops import OpsAPI
from serve_app.cli import app_args
from serve_app.config import load_config
from serve_app.gateway.console_signins import OPERATOR, SignIns

CFG = load_config(app_args(Path(__file__).resolve().parents[2] / "serve_config.yaml"))


def test_sessions_expire_end_at_sign_out_and_with_their_key():
    sessions = SignIns()
    a = sessions.open("key-a", ttl_s=60, now=0)
    b = sessions.open("key-a", ttl_s=60, now=0)
    op = sessions.open(OPERATOR, ttl_s=60, now=0)
    assert sessions.subject(a, now=30) == "key-a" and sessions.subject(op, now=30) == OPERATOR
    assert sessions.subject(a, now=61) is None  # expired
    sessions.close(op)
    assert sessions.subject(op, now=1) is None
    sessions.end_subject("key-a")  # the key was revoked
    assert sessions.subject(b, now=1) is None
    assert sessions.subject("not-a-token", now=1) is None


def test_sessions_are_bounded_and_keep_no_token():
    sessions = SignIns(max_signins=3)
    tokens = [sessions.open(f"k{i}", ttl_s=100, now=i) for i in range(5)]
    assert [sessions.subject(t, now=10) for t in tokens] == [None, None, "k2", "k3", "k4"]
    assert not any(t in repr(sessions.__dict__) for t in tokens)


def test_csrf_tokens_are_per_session():
    assert csrf_for("a") != csrf_for("b") and csrf_for("a") == csrf_for("a")
    assert len(csrf_for("a")) == 64


def test_key_forms():
    assert overrides_of({"requests_per_minute": "12", "monthly_spend_usd": "2.5", "x": "1"}) == {
        "requests_per_minute": 12,
        "monthly_spend_usd": 2.5,
    }
    assert overrides_of({"requests_per_minute": " "}) == {}
    with pytest.raises(ValueError, match="requests_per_minute must be a number"):
        overrides_of({"requests_per_minute": "ten"})
    assert expiry_of({}) is None and expiry_of({"expires_in_days": "1"}) > 0
    with pytest.raises(ValueError):
        expiry_of({"expires_in_days": "soon"})


def test_the_chart_scales_to_its_largest_bar():
    chart = bar_chart([("11-25", 0.5), ("11-26", 2.0), ("11-27", 0.0)], "USD", height=130)
    heights = [b.height for b in chart.bars]
    assert heights == [25.0, 100.0, 0.0] and chart.peak == 2.0
    assert chart.bars[1].title == "11-26: $2.00"
    assert bar_chart([], "tokens").bars == []


def request(bearer: str | None = None) -> Request:
    headers = [(b"authorization", f"Bearer {bearer}".encode())] if bearer else []
    return Request({"type": "http", "method": "GET", "path": "/status", "headers": headers})


def test_status_keeps_replica_detail_for_operators_where_keys_are_required():
    member = ReplicaLoad(replica="r-1", node_id="n-1", running=1, capacity=4)
    loads = {"premium": aggregate([member])}

    async def snapshot():
        return loads

    async def fault():
        return None

    async def is_operator(req: Request) -> bool:
        return req.headers.get("authorization") == "Bearer admin"

    def ops(config) -> OpsAPI:
        return OpsAPI(config, snapshot, fault, is_operator)

    keyed = CFG.model_copy(deep=True)
    keyed.router.anonymous_plan = None
    public = asyncio.run(ops(keyed).status(request()))
    assert public["tiers"] == {
        "premium": {"can_serve": True},
        "standard": {"can_serve": False},
        "budget": {"can_serve": False},
    }
    assert "r-1" not in repr(public) and "n-1" not in repr(public)
    operator = asyncio.run(ops(keyed).status(request("admin")))
    assert operator["tiers"]["premium"]["members"][0]["replica"] == "r-1"
    open_deployment = asyncio.run(ops(CFG).status(request()))
    assert open_deployment["tiers"]["premium"]["members"][0]["node_id"] == "n-1"


def test_the_console_is_off_unless_the_config_turns_it_on():
    from serve_app.api.console.pages import ConsoleAPI
    from serve_app.config import ConsoleSettings
    from serve_app.errors import APIError

    off = CFG.model_copy(update={"console": ConsoleSettings()})
    console = ConsoleAPI(off, None, None, None, None, None, None)  # type: ignore[arg-type]
    for call in (console.home(request()), console.sign_in(request())):
        with pytest.raises(APIError) as refused:
            asyncio.run(call)
        assert refused.value.status == 404
