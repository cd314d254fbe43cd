"""The request pipeline with in-process engines: failover, time limits, clients leaving,
lost replicas and budgets, settled exactly once, in seconds and without Ray or a model.

The engines implement `deployments/protocol.py`; their calls go through the tier's own
`coalesce` (coalescing, the first message naming the replica), so the pipeline sees what a
tier replica sends. The gateway keeps each key's state with the real `limits.KeyState`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import time
from typing import Any

import pytest
from PIL import Image

from deployments.protocol import Endpoint
from serve_app.canonical import ChatRequest, canonical_body
from serve_app.errors import APIError
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.request import Completed, Inbound, Streamed
from serve_app.pipeline.telemetry import IngressMetrics
from tests.fakes.engine import FakeEngine
from tests.fakes.gateway import CFG, KEY, FakeGateway
from tests.fakes.tiers import InProcessTiers


def pipeline(tiers: InProcessTiers, gateway: FakeGateway) -> Pipeline:
    return Pipeline(CFG, tiers, gateway, "ingress-0", IngressMetrics())


def inbound(model: str = "kimi-k2.5", stream: bool = False, **extra: Any) -> Inbound:
    request = ChatRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream} | extra
    )
    body = canonical_body(request)
    return Inbound(
        endpoint=Endpoint.CHAT,
        request=request,
        body=body,
        body_bytes=len(json.dumps(body)),
        api_key=KEY,
        request_id=f"req-{time.monotonic_ns()}",
    )


async def drain(stream: Streamed) -> list[str]:
    events = []
    stream.started()
    try:
        async for text in stream.events:
            events.extend(e for e in text.split("\n\n") if e)
    finally:
        await stream.close()
    return events


def engines() -> dict[str, FakeEngine]:
    return {"premium": FakeEngine(), "standard": FakeEngine(), "budget": FakeEngine()}


async def test_an_engine_failing_before_any_token_moves_the_request_to_the_next_tier():
    eng = engines()
    eng["premium"].down = True
    gateway = FakeGateway("enterprise")
    result = await pipeline(InProcessTiers(**eng), gateway).serve(inbound())
    assert isinstance(result, Completed)
    assert result.headers["x-kimi-tier"] == "standard"
    assert result.headers["x-kimi-retried"] == "1"
    assert result.headers["x-kimi-degraded"] == "premium->standard"
    [record] = gateway.records
    assert (record.tier, record.status, record.degraded) == ("standard", 200, True)
    assert record.completion_tokens == 4 and gateway.state.in_flight == 0


async def test_the_last_tier_failing_is_a_503_settled_once():
    eng = engines()
    eng["premium"].down = True
    gateway = FakeGateway("enterprise")
    with pytest.raises(APIError) as err:
        await pipeline(InProcessTiers(**eng), gateway).serve(inbound("kimi-k2.5:premium"))
    assert err.value.status == 503 and err.value.type == "server_error"
    [record] = gateway.records
    assert record.status == 503 and gateway.state.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_the_plan_time_limit_ends_the_request_504_settled(stream: bool):
    eng = engines()
    eng["premium"].hang = True
    gateway = FakeGateway("enterprise", request_timeout_s=0.3)
    p = pipeline(InProcessTiers(**eng), gateway)
    with pytest.raises(APIError) as err:
        await p.serve(inbound("kimi-k2.5:premium", stream=stream))
    assert err.value.status == 504 and err.value.code == "request_timeout"
    assert err.value.headers["x-kimi-tier"] == "premium"
    [record] = gateway.records
    assert record.status == 504 and gateway.state.in_flight == 0
    await asyncio.sleep(0.05)  # the cancelled call closes its engine request
    assert eng["premium"].stopped == eng["premium"].requests


async def test_the_time_limit_mid_stream_ends_it_with_an_error_event():
    eng = {"premium": FakeEngine(tokens=100, delay_s=0.02)}
    gateway = FakeGateway("enterprise", request_timeout_s=0.3)
    result = await pipeline(InProcessTiers(**eng), gateway).serve(
        inbound("kimi-k2.5:premium", stream=True)
    )
    assert isinstance(result, Streamed)
    events = await drain(result)
    assert json.loads(events[-1][6:])["error"]["code"] == "request_timeout"
    [record] = gateway.records
    assert record.status == 504 and 0 < record.completion_tokens < 100
    assert record.cost_usd == 0  # its client got an error: the tokens are kept, not charged
    await asyncio.sleep(0.05)
    assert eng["premium"].stopped == eng["premium"].requests


async def test_a_stream_is_settled_before_done_and_only_once():
    gateway = FakeGateway("enterprise")
    result = await pipeline(InProcessTiers(**engines()), gateway).serve(inbound(stream=True))
    assert isinstance(result, Streamed)
    events = await drain(result)
    assert events[-1] == "data: [DONE]"
    [record] = gateway.records
    assert record.status == 200 and record.completion_tokens == 4
    assert gateway.state.in_flight == 0


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_carries_usage_only_when_asked_and_is_metered_either_way(
    include_usage: bool,
):
    gateway = FakeGateway("enterprise")
    asked = {"stream_options": {"include_usage": True}} if include_usage else {}
    result = await pipeline(InProcessTiers(**engines()), gateway).serve(
        inbound(stream=True, **asked)
    )
    assert isinstance(result, Streamed)
    events = [json.loads(e[6:]) for e in (await drain(result))[:-1]]
    with_usage = [e for e in events if e.get("usage")]
    if include_usage:
        assert [e["usage"]["completion_tokens"] for e in with_usage] == [4]
        assert with_usage[0]["usage"]["cost"] > 0
    else:
        assert not with_usage
    [record] = gateway.records
    assert record.completion_tokens == 4 and record.cost_usd > 0


async def reading(result: Streamed, chunks: int) -> asyncio.Task[None]:
    """A client reading the stream, once it has had `chunks` of it."""
    received: list[str] = []

    async def client() -> None:
        async for text in result.events:
            received.append(text)

    reader = asyncio.create_task(client())
    while len(received) < chunks:
        await asyncio.sleep(0.01)
    return reader


async def test_a_client_leaving_mid_stream_is_settled_once_and_stops_the_engine():
    eng = {"premium": FakeEngine(tokens=1000, delay_s=0.01)}
    gateway = FakeGateway("enterprise")
    result = await pipeline(InProcessTiers(**eng), gateway).serve(
        inbound("kimi-k2.5:premium", stream=True)
    )
    assert isinstance(result, Streamed)
    result.started()
    reader = await reading(result, 3)
    reader.cancel()  # the connection drops: the response task is cancelled...
    with pytest.raises(asyncio.CancelledError):
        await reader
    await result.close()  # ...and the response closes its stream, as it always does
    await result.close()
    [record] = gateway.records
    assert record.status == 499 and 3 <= record.completion_tokens < 1000
    assert record.cost_usd > 0  # it had what it read
    assert gateway.state.in_flight == 0
    await asyncio.sleep(0.05)
    assert eng["premium"].stopped == eng["premium"].requests


async def stall_bounded_stream(delay_s: float) -> tuple[FakeEngine, FakeGateway, Streamed]:
    """A premium stream started under a 0.2 s stall bound: its engine, gateway, stream."""
    engine = FakeEngine(tokens=1000, delay_s=delay_s)
    gateway = FakeGateway("enterprise")
    cfg = CFG.model_copy(deep=True)
    cfg.router = cfg.router.model_copy(update={"stream_stall_s": 0.2})
    p = Pipeline(cfg, InProcessTiers(premium=engine), gateway, "ingress-0", IngressMetrics())
    result = await p.serve(inbound("kimi-k2.5:premium", stream=True))
    assert isinstance(result, Streamed)
    result.started()
    return engine, gateway, result


async def test_a_client_leaving_a_stream_stalled_on_our_side_is_not_billed():
    """A router frozen with its node holds its stream until the client gives up; when it
    wakes, the stream had waited on the tier past the stall bound: a 503, not a 499."""
    engine, gateway, result = await stall_bounded_stream(delay_s=0.01)
    reader = await reading(result, 3)
    engine.delay_s = 5  # the tier stops sending
    await asyncio.sleep(0.5)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await result.close()
    [record] = gateway.records
    assert record.status == 503 and record.cost_usd == 0, record
    assert "stalled" in (record.error or "")
    assert 3 <= record.completion_tokens < 1000  # what it had, recorded, not charged
    assert gateway.state.in_flight == 0


async def test_a_stream_left_while_its_router_was_frozen_is_not_billed():
    """Frozen with its node, the router pulls nothing (its stream suspended wherever it
    was); woken after the client gave up, its response closes the stream: a 503."""
    _, gateway, result = await stall_bounded_stream(delay_s=0.001)
    for _ in range(3):
        await result.events.__anext__()
    await asyncio.sleep(0.5)  # nothing pulled: the router is stopped
    await result.close()
    [record] = gateway.records
    assert record.status == 503 and record.cost_usd == 0, record
    assert gateway.state.in_flight == 0


async def test_a_stream_woken_with_its_tier_buffered_is_still_not_billed():
    """Woken after the client gave up, the router may read what its tier had buffered
    before it learns the client is gone: the stall it slept through still counts."""
    _, gateway, result = await stall_bounded_stream(delay_s=0.001)
    for _ in range(3):
        await result.events.__anext__()
    await asyncio.sleep(0.5)  # frozen
    for _ in range(3):  # awake: the buffered messages come at once
        await result.events.__anext__()
    await result.close()  # and then the client is found gone
    [record] = gateway.records
    assert record.status == 503 and record.cost_usd == 0, record
    assert "stalled" in (record.error or "")


async def test_a_lost_replica_is_retried_once():
    tiers = InProcessTiers(**engines())
    tiers.lose_next["premium"] = 1
    gateway = FakeGateway("enterprise")
    result = await pipeline(tiers, gateway).serve(inbound("kimi-k2.5:premium"))
    assert isinstance(result, Completed)
    assert result.headers["x-kimi-retried"] == "1" and result.headers["x-kimi-tier"] == "premium"
    [record] = gateway.records
    assert record.status == 200


async def test_a_replica_lost_twice_is_a_503_settled_once():
    tiers = InProcessTiers(**engines())
    tiers.lose_next["premium"] = 2
    gateway = FakeGateway("enterprise")
    with pytest.raises(APIError) as err:
        await pipeline(tiers, gateway).serve(inbound("kimi-k2.5:premium"))
    assert err.value.status == 503 and err.value.headers["retry-after"] == "5"
    [record] = gateway.records
    assert record.status == 503 and gateway.state.in_flight == 0
    assert tiers.engines["premium"].requests == []  # no engine ever saw it


async def test_a_spent_budget_refuses_with_402_and_meters_nothing():
    gateway = FakeGateway("enterprise", monthly_token_budget=2000)
    p = pipeline(InProcessTiers(**engines()), gateway)
    first = await p.serve(inbound(max_tokens=1000))
    assert isinstance(first, Completed)
    with pytest.raises(APIError) as err:
        await p.serve(inbound(max_tokens=1990))
    assert err.value.status == 402 and err.value.code == "insufficient_quota"
    assert err.value.headers["x-kimi-router"] == "ingress-0"
    assert len(gateway.records) == 1 and gateway.state.in_flight == 0


async def test_a_wrong_key_is_refused_before_any_tier_is_called():
    eng = engines()
    gateway = FakeGateway("enterprise")
    bad = dataclasses.replace(inbound(), api_key="sk-kimi-zzzzzzzzzzzz-" + "q" * 24)
    with pytest.raises(APIError) as err:
        await pipeline(InProcessTiers(**eng), gateway).serve(bad)
    assert err.value.status == 401
    assert not gateway.records and all(not e.requests for e in eng.values())


async def test_an_output_limit_past_the_plan_is_lowered_where_the_api_asks_it():
    """Anthropic's adapter asks for clamping (agent CLIs ask for 32,000 tokens): the
    request is served within the plan's cap, and a header says so; chat completions
    keep refusing it."""
    gateway = FakeGateway("free")
    p = pipeline(InProcessTiers(**engines()), gateway)
    asked = dataclasses.replace(inbound(max_tokens=32000), clamp_output=True)
    result = await p.serve(asked)
    assert isinstance(result, Completed)
    assert result.headers["x-kimi-max-tokens-clamped"] == "32000->1024"
    assert asked.body["max_tokens"] == 1024
    with pytest.raises(APIError) as refused:
        await p.serve(inbound(max_tokens=1500))  # fits the budget tier, not the plan
    assert refused.value.status == 400 and refused.value.param == "max_tokens"


async def test_clamping_also_fits_the_longest_tier_of_the_plan():
    gateway = FakeGateway("enterprise")  # no output cap; premium's context is the longest
    asked = dataclasses.replace(inbound(max_tokens=128000), clamp_output=True)
    result = await pipeline(InProcessTiers(**engines()), gateway).serve(asked)
    assert isinstance(result, Completed) and result.headers["x-kimi-tier"] == "premium"
    granted = asked.body["max_tokens"]
    assert granted < CFG.tier("premium").max_context
    assert result.headers["x-kimi-max-tokens-clamped"] == f"128000->{granted}"


@pytest.mark.parametrize("call", ["authenticate", "admit"])
async def test_a_gateway_away_past_the_wait_is_a_503_to_retry(call: str):
    gateway = FakeGateway("enterprise")
    gateway.down.add(call)
    eng = engines()
    with pytest.raises(APIError) as away:
        await pipeline(InProcessTiers(**eng), gateway).serve(inbound())
    assert away.value.status == 503 and away.value.code == "gateway_unavailable"
    assert int(away.value.headers["retry-after"]) >= 1
    assert all(not e.requests for e in eng.values())  # nothing was served unadmitted


async def test_a_record_the_gateway_could_not_take_is_settled_when_it_is_back():
    gateway = FakeGateway("enterprise")
    p = pipeline(InProcessTiers(**engines()), gateway)
    gateway.down.add("settle")
    result = await p.serve(inbound())
    assert isinstance(result, Completed)  # the client has its answer
    assert not gateway.records and len(p.unsettled) == 1
    await p.refresh({})  # still away: kept
    await asyncio.sleep(0.01)
    assert len(p.unsettled) == 1
    gateway.down.clear()
    await p.refresh({})
    await asyncio.sleep(0.01)
    [record] = gateway.records
    assert record.status == 200 and not p.unsettled and gateway.state.in_flight == 0


def with_vision(**vision: bool) -> Any:
    """The embedded config with some tiers' vision turned off."""
    config = CFG.model_copy(deep=True)
    for tier in config.tiers:
        tier.capabilities.vision = vision.get(tier.name, tier.capabilities.vision)
    return config


PNG_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4"
    "z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def image_inbound(model: str = "kimi-k2.5") -> Inbound:
    content = [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
    ]
    return inbound(model, messages=[{"role": "user", "content": content}])


async def test_the_model_cards_sampling_fills_what_the_client_left_out():
    eng = {"premium": FakeEngine(), "standard": FakeEngine(), "budget": FakeEngine()}
    serve = pipeline(InProcessTiers(**eng), FakeGateway()).serve
    await serve(inbound())
    await serve(inbound(chat_template_kwargs={"thinking": False}, top_p=0.5))
    await serve(inbound(temperature=0.0))
    thinking, instant, asked = eng["premium"].bodies
    assert (thinking["temperature"], thinking["top_p"]) == (1.0, 0.95)
    assert (instant["temperature"], instant["top_p"]) == (0.6, 0.5)
    assert (asked["temperature"], asked["top_p"]) == (0.0, 0.95)


async def test_an_image_skips_the_plans_tiers_without_vision_and_says_so():
    gateway = FakeGateway("enterprise")
    p = Pipeline(
        with_vision(premium=False), InProcessTiers(**engines()), gateway, "i-0", IngressMetrics()
    )
    result = await p.serve(image_inbound())
    assert result.headers["x-kimi-tier"] == "standard"
    assert result.headers["x-kimi-tiers-skipped"] == "premium (no vision)"
    assert "x-kimi-degraded" not in result.headers
    text = await p.serve(inbound())  # text alone still goes to the plan's first tier
    assert text.headers["x-kimi-tier"] == "premium" and "x-kimi-tiers-skipped" not in text.headers


async def test_an_image_no_tier_of_the_plan_takes_is_a_400_that_says_why():
    config = with_vision(premium=False, standard=False, budget=False)
    p = Pipeline(config, InProcessTiers(**engines()), FakeGateway(), "i-0", IngressMetrics())
    with pytest.raises(APIError) as caught:
        await p.serve(image_inbound())
    assert caught.value.status == 400 and caught.value.code == "capability_unsupported"
    assert "vision is not supported" in caught.value.message
    with pytest.raises(APIError) as pinned:
        await p.serve(image_inbound("kimi-k2.5:budget"))
    assert "tier 'budget'" in pinned.value.message


async def test_inline_image_data_does_not_count_as_prompt_text():
    """A 2 MB image is a few hundred tokens, not the 350K its base64 would suggest."""
    big = Image.effect_noise((1400, 1000), 64).convert("RGB")
    out = io.BytesIO()
    big.save(out, "PNG")
    image = f"data:image/png;base64,{base64.b64encode(out.getvalue()).decode()}"
    assert len(image) > 1_000_000
    content = [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    gateway = FakeGateway()
    result = await pipeline(InProcessTiers(**engines()), gateway).serve(
        inbound("kimi-k2.5:budget", messages=[{"role": "user", "content": content}])
    )
    assert result.headers["x-kimi-tier"] == "budget"  # 2,048 tokens of context suffice


async def test_with_clamping_off_messages_refuses_in_anthropics_own_words():
    """Claude Code retries with the limit it reads in Anthropic's sentence."""
    import json as _json

    from starlette.requests import Request

    from serve_app.api.anthropic.routes import AnthropicAPI
    from serve_app.reasoning.sealing import Sealer

    config = CFG.model_copy(deep=True)
    config.router.clamp_messages_max_tokens = False
    p = Pipeline(config, InProcessTiers(**engines()), FakeGateway("free"), "i-0", IngressMetrics())
    api = AnthropicAPI(p, config, Sealer([b"k" * 32]))
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    raw = _json.dumps(body).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"x-api-key", KEY.encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/v1/messages", "headers": headers}
    answer = await api.messages(Request(scope, receive))
    assert answer.status_code == 400
    error = _json.loads(answer.body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        "max_tokens: 32000 > 1024, which is the maximum allowed number of output tokens"
        " for claude-sonnet-4-5"
    )


async def test_an_output_limit_lowered_to_fit_a_session_cap_is_what_the_engine_gets():
    """The gateway's admission names the most output the session's cap leaves; the
    engine is asked for no more (set where the client set none), and the answer says so."""
    eng = engines()
    gateway = FakeGateway("enterprise")
    gateway.max_output = 3
    asked = inbound("kimi-k2.5:premium", max_tokens=50)
    asked = dataclasses.replace(asked, session="task-1")
    result = await pipeline(InProcessTiers(**eng), gateway).serve(asked)
    assert isinstance(result, Completed)
    assert eng["premium"].bodies[-1]["max_tokens"] == 3
    assert result.headers["x-kimi-max-tokens-clamped"] == "50->3"
    [ask] = gateway.asks
    assert ask.session == "task-1" and ask.output_bound == 50
    assert ask.prompt_bound >= asked.prompt_estimate()  # a bound, not the estimate


async def silent_stream() -> tuple[FakeEngine, FakeGateway, Pipeline, Streamed]:
    """A premium stream under way whose engine then goes quiet (its node stopped), on
    a router that stalls streams at once (`stall_s` 0)."""
    engine = FakeEngine(tokens=1000, delay_s=0.001)
    gateway = FakeGateway("enterprise")
    router = pipeline(InProcessTiers(premium=engine), gateway)
    router.silent.stall_s = 0.0
    result = await router.serve(inbound("kimi-k2.5:premium", stream=True))
    assert isinstance(result, Streamed)
    result.started()
    return engine, gateway, router, result


async def test_a_stream_whose_replica_falls_silent_ends_with_a_retryable_error():
    engine, gateway, router, result = await silent_stream()
    events: list[str] = []

    async def client() -> None:
        async for text in result.events:
            events.extend(e for e in text.split("\n\n") if e)

    reader = asyncio.create_task(client())
    while len(events) < 3:
        await asyncio.sleep(0.005)
    engine.delay_s = 3600  # the replica's node stops: nothing more comes
    await asyncio.sleep(0.02)
    assert router.silent.sweep({"premium-0"}) == 0  # still reporting: slow, not gone
    assert router.silent.sweep(set()) == 1  # gone from the board
    await asyncio.wait_for(reader, 5)
    await result.close()
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "retry" in error["message"]
    [record] = gateway.records
    assert record.status == 503 and record.cost_usd == 0 and record.completion_tokens >= 3
    await asyncio.sleep(0.01)
    assert engine.stopped == engine.requests  # the engine request is cancelled


async def test_streams_silent_past_the_bound_end_when_the_load_board_is_silent_too():
    engine, gateway, router, result = await silent_stream()
    reader = asyncio.create_task(drain(result))
    await asyncio.sleep(0.02)
    engine.delay_s = 3600
    router.board_unanswered()  # the board answered a moment ago: nothing ends
    await asyncio.sleep(0.02)
    assert not reader.done()
    router.refreshed_at -= 60  # and then not for a minute
    router.board_unanswered()
    events = await asyncio.wait_for(reader, 5)
    assert "retry" in json.loads(events[-1].removeprefix("data: "))["error"]["message"]
    [record] = gateway.records
    assert record.status == 503
