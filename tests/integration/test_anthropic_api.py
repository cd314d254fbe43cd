"""Anthropic's Messages API through the real app, with the official `anthropic` SDK:
plain and streamed messages, thinking on (with a budget) and off, a tool round trip,
count_tokens, errors as the SDK's own exceptions, model aliases, and limits, budgets and
metering shared with chat completions. On every tier: premium (vLLM), standard and
budget (llama.cpp)."""

from __future__ import annotations

import json
import uuid

import anthropic
import httpx
import jsonschema
import openai
import pyarrow.compute as pc
import pytest

from tests.integration.conftest import flushed_usage, new_key, tier_status, wait_for

pytestmark = pytest.mark.integration

TIERS = ["premium", "standard", "budget"]
WEATHER = {
    "name": "get_weather",
    "description": "Forecast for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What's the weather in Paris this week?"}]


@pytest.fixture(scope="module")
def key(admin: httpx.Client) -> str:
    return new_key(admin, "enterprise")[0]


@pytest.fixture(scope="module")
def claude(serve_url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=serve_url, api_key=key, max_retries=0, timeout=300)


def records(admin: httpx.Client, state_dir, key_id: str) -> list[dict]:
    table = flushed_usage(admin, state_dir)
    return table.filter(pc.equal(table["key_id"], key_id)).to_pylist()


@pytest.mark.parametrize("tier", TIERS)
def test_a_plain_message(claude, tier):
    msg = claude.messages.create(
        model=f"kimi-k2.5:{tier}", max_tokens=12, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.model == f"kimi-k2.5:{tier}"
    assert [b.type for b in msg.content] == ["text"]  # no thinking unless asked
    assert msg.usage.input_tokens > 0 and 1 <= msg.usage.output_tokens <= 12
    assert msg.stop_reason == ("max_tokens" if msg.usage.output_tokens == 12 else "end_turn")


@pytest.mark.parametrize("tier", TIERS)
def test_a_streamed_message_with_a_thinking_budget(claude, tier):
    """The budget closes the reasoning (a random model never does), so text follows."""
    kinds: set[str] = set()
    with claude.messages.stream(
        model=f"kimi-k2.5:{tier}",
        max_tokens=48,
        thinking={"type": "enabled", "budget_tokens": 8},
        messages=[{"role": "user", "content": "hi"}],
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                kinds.add(event.delta.type)
        final = stream.get_final_message()
    assert kinds == {"thinking_delta", "signature_delta", "text_delta"}
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking and final.content[1].text
    assert final.content[0].signature  # it seals the thinking, to come back next turn
    assert final.usage.input_tokens > 0 and final.usage.output_tokens <= 48
    assert final.stop_reason in ("max_tokens", "end_turn")


@pytest.mark.parametrize("tier", TIERS)
# One call a turn: offered parallel calls, the random model may write calls until max_tokens
# cuts one (1 turn in 40 on budget, measured), and the round trip is what is under test here
# (benchmarks/tool_calls.py measures parallel turns).
@pytest.mark.parametrize(
    "choice",
    [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_weather"}],
)
def test_a_tool_round_trip(claude, tier, choice):
    model = f"kimi-k2.5:{tier}"
    first = claude.messages.create(
        model=model,
        max_tokens=200,
        tools=[WEATHER],
        tool_choice=choice,
        thinking={"type": "disabled"},
        messages=ASK,
    )
    calls = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and calls
    for call in calls:
        assert call.name == "get_weather" and call.id.startswith("toolu_")
        jsonschema.validate(call.input, WEATHER["input_schema"])
    results = [
        {"type": "tool_result", "tool_use_id": c.id, "content": "sunny, 21 C"} for c in calls
    ]
    second = claude.messages.create(
        model=model,
        max_tokens=8,
        tools=[WEATHER],
        messages=[
            *ASK,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": results},
        ],
    )

    def prompt(usage: anthropic.types.Usage) -> int:
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)

    assert prompt(second.usage) > prompt(first.usage)  # the history reached the engine


@pytest.mark.parametrize("tier", TIERS)
def test_count_tokens_counts_what_the_engine_renders(claude, tier):
    model = f"kimi-k2.5:{tier}"
    short = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
    longer = claude.messages.count_tokens(
        model=model, tools=[WEATHER], messages=[{"role": "user", "content": "hi " * 50}]
    )
    assert 0 < short.input_tokens < longer.input_tokens
    sent = claude.messages.create(
        model=model,
        max_tokens=1,
        thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "hi"}],
    )
    counted = claude.messages.count_tokens(
        model=model, thinking={"type": "disabled"}, messages=[{"role": "user", "content": "hi"}]
    )
    cached = sent.usage.cache_read_input_tokens or 0
    assert counted.input_tokens == sent.usage.input_tokens + cached


def test_an_image_url_from_a_host_not_allow_listed_is_refused(claude):
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    with pytest.raises(anthropic.BadRequestError, match="not allow-listed"):
        claude.messages.create(
            model="kimi-k2.5",
            max_tokens=4,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}],
        )


def test_errors_reach_the_sdk_as_its_own_exceptions(serve_url, admin, claude):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.BadRequestError, match="max_tokens") as bad:
        claude.messages.create(model="kimi-k2.5", max_tokens=0, messages=hi)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert bad.value.response.headers["request-id"]
    with pytest.raises(anthropic.NotFoundError, match="gpt-4o"):
        claude.messages.create(model="gpt-4o", max_tokens=4, messages=hi)
    stranger = anthropic.Anthropic(
        base_url=serve_url, api_key="sk-kimi-000000000000-" + "x" * 32, max_retries=0
    )
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="kimi-k2.5", max_tokens=4, messages=hi)
    free = anthropic.Anthropic(base_url=serve_url, api_key=new_key(admin, "free")[0], max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError, match=r"kimi-k2\.5:premium"):
        free.messages.create(model="kimi-k2.5:premium", max_tokens=4, messages=hi)
    limited = anthropic.Anthropic(
        base_url=serve_url,
        api_key=new_key(admin, "enterprise", requests_per_minute=1)[0],
        max_retries=0,
    )
    limited.messages.create(model="kimi-k2.5", max_tokens=1, messages=hi)
    with pytest.raises(anthropic.RateLimitError) as limit:
        limited.messages.create(model="kimi-k2.5", max_tokens=1, messages=hi)
    assert int(limit.value.response.headers["retry-after"]) >= 1


def test_agent_model_names_follow_the_alias_table(serve_url, key):
    def tier_of(model: str) -> str:
        r = httpx.post(
            f"{serve_url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json={"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.headers["x-kimi-tier"]

    assert tier_of("claude-3-5-haiku-20241022") == "budget"
    assert tier_of("claude-sonnet-4-5") == "premium"


def test_a_spent_budget_is_refused_on_both_apis(serve_url, admin, state_dir):
    """Messages spend the key's monthly token budget until it refuses them, and then
    chat completions too: one budget, whichever API spends it."""
    key, key_id = new_key(admin, "enterprise", monthly_token_budget=400)
    claude = anthropic.Anthropic(base_url=serve_url, api_key=key, max_retries=0)
    gpt = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    served = 0
    with pytest.raises(anthropic.APIStatusError) as spent:
        for _ in range(60):
            claude.messages.create(model="kimi-k2.5", max_tokens=100, messages=hi)
            served += 1
    assert spent.value.status_code == 402 and served >= 1
    assert spent.value.body["error"]["type"] == "billing_error"
    with pytest.raises(openai.APIStatusError) as also:
        gpt.chat.completions.create(model="kimi-k2.5", max_tokens=100, messages=hi)
    assert also.value.status_code == 402
    rows = records(admin, state_dir, key_id)
    assert len(rows) == served
    assert {(r["api"], r["endpoint"], r["status"]) for r in rows} == {("anthropic", "chat", 200)}
    # refused once what was spent plus the next request's estimate passes the budget
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) > 400 - 140


def test_a_stream_left_midway_is_metered_with_its_session(serve_url, admin, state_dir):
    key, key_id = new_key(admin, "enterprise")
    session = str(uuid.uuid4())
    body = {
        "model": "kimi-k2.5:premium",
        "max_tokens": 2000,
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }
    headers = {"x-api-key": key, "x-claude-code-session-id": session}
    aborted = tier_status(serve_url, "premium")["aborted_total"]
    seen: list[str] = []
    with httpx.stream(
        "POST", f"{serve_url}/v1/messages", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
            if seen.count("content_block_delta") == 3:
                break  # the client goes
    assert seen[:2] == ["message_start", "ping"]
    wait_for(
        "the engine stopped generating for the client that left",
        lambda: (
            (t := tier_status(serve_url, "premium"))["aborted_total"] > aborted
            and t["running"] == 0
        ),
        30,
    )
    counted = {"x-api-key": key, "x-claude-code-session-id": session}
    r = httpx.post(
        f"{serve_url}/v1/messages/count_tokens",
        json={"model": "kimi-k2.5", "messages": body["messages"]},
        headers=counted,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    rows = wait_for(
        "the stream left midway metered",
        lambda: (rows := records(admin, state_dir, key_id)) and len(rows) == 2 and rows,
        30,
    )
    left = next(x for x in rows if x["endpoint"] == "chat")
    assert left["status"] == 499 and 1 <= left["completion_tokens"] < 2000
    assert (left["api"], left["session_id"]) == ("anthropic", session)
    count = next(x for x in rows if x["endpoint"] == "tokenize")
    assert count["cost_usd"] == 0 and count["prompt_tokens"] > 0


def test_a_stream_is_well_formed_to_its_end(serve_url, key):
    r = httpx.post(
        f"{serve_url}/v1/messages",
        json={
            "model": "kimi-k2.5:standard",
            "max_tokens": 8,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    )
    names = [ln[7:] for ln in r.text.splitlines() if ln.startswith("event: ")]
    datas = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert (
        datas[-2]["usage"]["output_tokens"] == 8 or datas[-2]["delta"]["stop_reason"] == "end_turn"
    )


def test_a_request_shaped_as_claude_code_sends_it(serve_url, admin, state_dir):
    """The shapes Claude Code 2.1 sends (issue "Real coding agents"): `?beta=true`, its
    headers, a system message inside `messages`, adaptive thinking with an effort,
    `context_management`, `cache_control`, `metadata.user_id` as JSON holding the session,
    and `max_tokens: 32000` for a model it does not know. Served, with max_tokens lowered
    to the free plan's cap (a header says so), and metered under its session."""
    key, key_id = new_key(admin, "free")
    session = str(uuid.uuid4())
    body = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            },
        ],
        "tools": [WEATHER],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "low"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": session})},
    }
    headers = {
        "authorization": f"Bearer {key}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-app": "cli",
    }
    r = httpx.post(f"{serve_url}/v1/messages?beta=true", json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-kimi-tier"] == "budget"  # the free plan's only tier
    assert r.headers["x-kimi-max-tokens-clamped"] == "32000->1024"
    names = [ln[7:] for ln in r.text.splitlines() if ln.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    [record] = records(admin, state_dir, key_id)
    assert (record["session_id"], record["status"], record["api"]) == (session, 200, "anthropic")
    assert record["completion_tokens"] <= 1024


@pytest.mark.parametrize("tier", TIERS)
def test_omitted_thinking_comes_back_through_its_signature(claude, tier):
    """K2.5 wants the reasoning of the turn's tool calls back in the prompt. A client that
    keeps no thinking text (`display: "omitted"`, as Claude Code asks) sends back only the
    signature, which seals it: the prompt the engine counts holds it again."""
    model = f"kimi-k2.5:{tier}"
    first = claude.messages.create(
        model=model,
        max_tokens=200,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        thinking={"type": "enabled", "budget_tokens": 8, "display": "omitted"},
        messages=ASK,
    )
    thinking = [b for b in first.content if b.type == "thinking"]
    calls = [b for b in first.content if b.type == "tool_use"]
    assert thinking and calls and thinking[0].thinking == "" and thinking[0].signature
    results = [{"type": "tool_result", "tool_use_id": c.id, "content": "sunny"} for c in calls]

    def counted(assistant_blocks: list) -> int:
        return claude.messages.count_tokens(
            model=model,
            tools=[WEATHER],
            thinking={"type": "enabled", "budget_tokens": 8},
            messages=[
                *ASK,
                {"role": "assistant", "content": assistant_blocks},
                {"role": "user", "content": results},
            ],
        ).input_tokens

    with_signature = counted(first.content)
    without = counted(calls)
    forged = counted([{"type": "thinking", "thinking": "", "signature": "Zm9yZ2Vk"}, *calls])
    assert with_signature > without == forged
