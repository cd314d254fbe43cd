"""Service tiers through real Ray Serve and real engines, on the three wire APIs with
their official SDKs: the band served is echoed where each API puts it, priced at the
tier's price times the band's factor, and kept on the usage record."""

from __future__ import annotations

import anthropic
import openai
import pyarrow.compute as pc
import pytest

from serve_app.cli import app_args
from serve_app.config import load_config
from tests.integration.conftest import ROOT, flushed_usage, new_key

pytestmark = pytest.mark.integration

CONFIG = load_config(app_args(ROOT / "serve_config.yaml"))
INSTANT = {"effort": "none"}


def records(admin, state_dir, key_id: str) -> dict[str, dict]:
    table = flushed_usage(admin, state_dir)
    rows = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    return {r["request_id"]: r for r in rows}


def priced(row: dict, band: str) -> float:
    price = CONFIG.tier(row["tier"]).price
    factor = CONFIG.service_tiers.band(band).price_factor
    cached = row["cached_tokens"]
    cost = price.cost(row["prompt_tokens"], row["completion_tokens"], cached) * factor
    return pytest.approx(cost, rel=1e-6, abs=1e-9)


def test_each_api_echoes_prices_and_meters_the_band(serve_url, admin, state_dir):
    key, key_id = new_key(admin, "enterprise")  # offers flex and priority
    oai = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0, timeout=300)
    claude = anthropic.Anthropic(base_url=serve_url, api_key=key, max_retries=0, timeout=300)
    chat = oai.chat.completions.with_raw_response.create(
        model="kimi-k2.5:premium",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        service_tier="flex",
    )
    answer = chat.parse()
    assert answer.service_tier == "flex" and chat.headers["x-kimi-service-tier"] == "flex"
    message = claude.messages.with_raw_response.create(
        model="kimi-k2.5:standard",
        max_tokens=4,
        messages=[{"role": "user", "content": "hi"}],
        service_tier="standard_only",
    )
    assert message.parse().usage.service_tier == "standard"
    response = oai.responses.with_raw_response.create(
        model="kimi-k2.5:premium",
        input="hi",
        max_output_tokens=4,
        reasoning=INSTANT,
        service_tier="priority",
    )
    assert response.parse().service_tier == "priority"
    rows = records(admin, state_dir, key_id)
    expected = {
        chat.headers["x-request-id"]: ("flex", answer.usage.model_extra["cost"]),
        message.headers["request-id"]: ("default", None),
        response.headers["x-request-id"]: ("priority", response.parse().usage.model_extra["cost"]),
    }
    assert set(rows) == set(expected)
    for request_id, (band, told) in expected.items():
        row = rows[request_id]
        assert row["service_tier"] == band and row["cost_usd"] == priced(row, band)
        if told is not None:  # what the client was told is what was metered
            assert told == pytest.approx(row["cost_usd"])


def test_a_band_the_plan_does_not_offer_is_served_and_said_as_default(serve_url, admin):
    key, _ = new_key(admin, "premium")  # flex only
    oai = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0, timeout=300)
    answer = oai.chat.completions.create(
        model="kimi-k2.5:premium",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        service_tier="priority",
    )
    assert answer.service_tier == "default"
    with pytest.raises(openai.BadRequestError, match="service_tier"):
        oai.chat.completions.create(
            model="kimi-k2.5:premium",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            service_tier="fastest",  # not a band at all: a 400 naming the field
        )
