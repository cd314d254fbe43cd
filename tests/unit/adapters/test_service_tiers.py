"""Service tiers (OpenAI's `service_tier`, Anthropic's) on the three wire APIs, on fakes:
the band served is echoed in each API's own place, priced (the tier's price times the
band's factor) and kept on the usage record; a band the plan does not offer is served
as `default`, and says so."""

from __future__ import annotations

import pytest

from serve_app.config import Plan
from serve_app.pipeline.bands import served_band
from tests.fakes.gateway import CFG
from tests.unit.adapters.conftest import Served

PREMIUM = CFG.tier("premium").price
FLEX = CFG.service_tiers.flex.price_factor
PRIORITY = CFG.service_tiers.priority.price_factor


def priced(record, factor: float) -> float:
    """What the record's tokens cost on premium at `factor` times its price."""
    return round(PREMIUM.cost(record.prompt_tokens, record.completion_tokens) * factor, 9)


BANDS = [
    (None, "default", 1.0),
    ("auto", "default", 1.0),
    ("flex", "flex", FLEX),
    ("priority", "priority", PRIORITY),
]


@pytest.mark.parametrize(("asked", "band", "factor"), BANDS)
async def test_a_chat_completion_is_served_priced_and_metered_in_its_band(
    served: Served, asked, band, factor
):
    extra = {} if asked is None else {"service_tier": asked}
    raw = await served.oai.chat.completions.with_raw_response.create(
        model="kimi-k2.5:premium", messages=[{"role": "user", "content": "hi"}], **extra
    )
    answer = raw.parse()
    assert answer.service_tier == band
    assert raw.headers["x-kimi-service-tier"] == band
    [record] = served.gateway.records
    assert record.service_tier == band
    assert record.cost_usd == pytest.approx(priced(record, factor))
    assert answer.usage.model_extra["cost"] == pytest.approx(record.cost_usd)
    assert "service_tier" not in served.engine.bodies[0]  # the router's, not the engine's


async def test_a_streamed_chat_names_its_band_on_the_usage_chunk(served: Served):
    stream = await served.oai.chat.completions.create(
        model="kimi-k2.5:premium",
        messages=[{"role": "user", "content": "hi"}],
        service_tier="flex",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].service_tier == "flex"
    [record] = served.gateway.records
    assert record.service_tier == "flex" and record.cost_usd == pytest.approx(priced(record, FLEX))


async def test_a_flex_requests_fair_share_weight_is_the_bands(served: Served, monkeypatch):
    weights: list[float] = []
    pipeline = served.responses.pipeline
    gate = pipeline.gates.gate("premium")
    enter = gate.enter

    async def noted(key, session, tokens, weight, timeout_s, band):
        weights.append(weight)
        return await enter(key, session, tokens, weight, timeout_s, band)

    monkeypatch.setattr(gate, "enter", noted)
    for band in ("flex", "priority"):
        await served.oai.chat.completions.create(
            model="kimi-k2.5:premium",
            messages=[{"role": "user", "content": "hi"}],
            service_tier=band,
        )
    plan_weight = CFG.plans["enterprise"].weight
    assert weights == [
        plan_weight * CFG.service_tiers.flex.weight_factor,
        plan_weight * CFG.service_tiers.priority.weight_factor,
    ]


@pytest.mark.parametrize(("asked", "word"), [("standard_only", "standard"), (None, "standard")])
async def test_an_anthropic_message_says_its_band_in_anthropics_words(served: Served, asked, word):
    extra = {} if asked is None else {"service_tier": asked}
    msg = await served.claude.messages.create(
        model="kimi-k2.5:premium",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        **extra,
    )
    assert msg.usage.service_tier == word
    [record] = served.gateway.records
    assert record.service_tier == "default"


async def test_a_streamed_anthropic_message_says_its_band_at_start_and_end(served: Served):
    async with served.claude.messages.stream(
        model="kimi-k2.5:premium", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.usage.service_tier == "standard"


async def test_a_response_echoes_the_band_it_was_served_in(served: Served):
    flex = await served.oai.responses.create(
        model="kimi-k2.5:premium", input="hi", service_tier="flex"
    )
    assert flex.service_tier == "flex"
    scale = await served.oai.responses.create(
        model="kimi-k2.5:premium", input="hi", service_tier="scale"
    )
    assert scale.service_tier == "default"  # not a band here: served and said as default
    assert [r.service_tier for r in served.gateway.records] == ["flex", "default"]


def test_a_band_the_plan_does_not_offer_is_served_as_default():
    plain = Plan(tiers=["premium"])  # offers flex only
    assert served_band("priority", plain) == "default"
    assert served_band("flex", plain) == "flex"
    assert served_band("auto", plain) == "default"
    batchy = Plan(tiers=["premium"], default_service_tier="flex")
    assert served_band(None, batchy) == "flex" and served_band("default", batchy) == "default"
    with pytest.raises(ValueError, match="default_service_tier"):
        CFG.model_validate(
            {
                **CFG.model_dump(),
                "plans": {"x": {"tiers": ["premium"], "default_service_tier": "priority"}},
            }
        )
