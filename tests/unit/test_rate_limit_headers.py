"""Rate-limit headers where key-less use has limits: the router and the gateway's own
class in-process (the embedded default's anonymous plan has none, so the integration
tests cannot show it)."""

from __future__ import annotations

import dataclasses

import pytest

from serve_app.errors import APIError
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.telemetry import IngressMetrics
from tests.fakes.engine import FakeEngine
from tests.fakes.gateway import CFG
from tests.fakes.tiers import InProcessTiers
from tests.unit.gateway_in_process import Gateway
from tests.unit.test_leases import PLANS
from tests.unit.test_pipeline import inbound


async def test_an_anonymous_plan_with_limits_says_them_on_answers_and_refusals(tmp_path):
    """Where key-less use is on and its plan has limits (here `free`: 20 requests a
    minute), its answers carry the x-ratelimit headers as a key's do, and so does the
    429 past them."""
    config = CFG.model_copy(deep=True)
    config.router.anonymous_plan = "free"
    gateway = Gateway(str(tmp_path), PLANS, 1000, 3600)
    router = Pipeline(
        config, InProcessTiers(budget=FakeEngine()), gateway, "ingress-0", IngressMetrics()
    )
    first = await router.serve(dataclasses.replace(inbound(), api_key=None))
    assert first.headers["x-ratelimit-limit-requests"] == "20"
    assert first.headers["x-ratelimit-remaining-requests"] == "19"
    with pytest.raises(APIError) as refused:
        for _ in range(25):
            await router.serve(dataclasses.replace(inbound(), api_key=None))
    assert refused.value.status == 429
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.value.headers["retry-after"]) >= 1
    gateway.close()
