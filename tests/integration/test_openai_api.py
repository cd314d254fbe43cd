"""The OpenAI API through real Ray Serve and real engines (vLLM premium, llama.cpp GGUF)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from benchmarks import holdback
from deployments.artifacts.instruction import REPLY, TRIGGER

pytestmark = pytest.mark.integration

TIERS = ["premium", "standard", "budget"]
USER = [{"role": "user", "content": "What's the weather in Paris this week?"}]


@pytest.mark.parametrize("tier", TIERS)
def test_chat_returns_usage(client, tier):
    r = client.chat.completions.create(model=f"kimi-k2.5:{tier}", messages=USER, max_tokens=12)
    assert r.model == f"kimi-k2.5:{tier}"
    assert r.object == "chat.completion"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("tier", TIERS)
def test_history_as_agent_frameworks_send_it(client, tier):
    """Content as parts, an earlier refusal part, a tool round trip, null optional
    fields: every tier takes the history an OpenAI client sends back."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}], "name": None},
        *USER,
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
        {"role": "user", "content": "Try a tool."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model=f"kimi-k2.5:{tier}", messages=history, max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 20


@pytest.mark.parametrize("tier", TIERS)
def test_the_reasoning_of_the_turns_tool_calls_reaches_the_prompt(client, tier):
    """K2.5 keeps the reasoning of the current turn's tool calls in its prompt: sent back
    as `reasoning_content` (the field we answer with), every tier renders it."""
    call = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    def prompt_tokens(assistant: dict) -> int:
        history = [*USER, assistant, {"role": "tool", "tool_call_id": call["id"], "content": "ok"}]
        r = client.chat.completions.create(
            model=f"kimi-k2.5:{tier}", messages=history, max_tokens=1
        )
        return r.usage.prompt_tokens

    bare = {"role": "assistant", "content": None, "tool_calls": [call]}
    reasoned = {**bare, "reasoning_content": "Look the weather up first, then answer."}
    assert prompt_tokens(reasoned) > prompt_tokens(bare)


def test_base_model_is_routed_by_plan(client):
    raw = client.chat.completions.with_raw_response.create(
        model="kimi-k2.5", messages=USER, max_tokens=4
    )
    assert raw.headers["x-kimi-tier"] == "premium"  # enterprise plan prefers premium
    assert raw.headers["x-request-id"]
    assert raw.parse().model == "kimi-k2.5:premium"


@pytest.mark.parametrize("tier", TIERS)
def test_streaming_chunks_then_usage(client, tier):
    stream = client.chat.completions.create(
        model=f"kimi-k2.5:{tier}",
        messages=USER,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and _delta_text(c.choices[0].delta)]
    assert len(text_chunks) >= 3, "tokens must arrive as several chunks"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id}


def _delta_text(delta) -> str:
    extra = delta.model_extra or {}
    return (delta.content or "") + (extra.get("reasoning_content") or "")


@pytest.mark.parametrize("tier", TIERS)
def test_thinking_default_and_instant_mode(client, tier):
    model = f"kimi-k2.5:{tier}"
    thinking = client.chat.completions.create(model=model, messages=USER, max_tokens=8)
    msg = thinking.choices[0].message
    assert (msg.model_extra or {}).get("reasoning_content"), "thinking mode reasons first"
    assert not msg.content
    instant = client.chat.completions.create(
        model=model,
        messages=USER,
        max_tokens=8,
        extra_body={"chat_template_kwargs": {"thinking": False}},
    )
    msg = instant.choices[0].message
    assert msg.content, "instant mode answers directly"
    assert not (msg.model_extra or {}).get("reasoning_content")


@pytest.mark.parametrize("tier", TIERS)
def test_text_completions(client, tier):
    r = client.completions.create(model=f"kimi-k2.5:{tier}", prompt="Once upon", max_tokens=5)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].text


@pytest.mark.parametrize("tier", TIERS)
def test_streamed_completions_of_several_prompts(serve_url, tier):
    """Every event is a chunk: llama-server opens such a stream with `data: null`."""
    body = {"model": f"kimi-k2.5:{tier}", "prompt": ["Once", "Twice"], "max_tokens": 3}
    with httpx.stream(
        "POST", f"{serve_url}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "text_completion" for c in chunks), chunks[:2]
    assert {ch["index"] for c in chunks for ch in c["choices"]} == {0, 1}


def test_models_lists_base_and_tiers(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"kimi-k2.5", "kimi-k2.5:premium", "kimi-k2.5:standard", "kimi-k2.5:budget"}


def test_health_and_ready(serve_url):
    assert httpx.get(f"{serve_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{serve_url}/ready", timeout=30).json()
    assert ready == {"ready": True, "tiers": {t: True for t in TIERS}, "storage": "ok"}


ENGINE_EXTRAS = {"system_fingerprint", "service_tier", "prompt_logprobs", "kv_transfer_params"}


def test_same_shape_on_every_tier(serve_url):
    """Parity: the same request gets the same keys whichever engine answers."""
    shapes = {}
    for tier in TIERS:
        body = {"model": f"kimi-k2.5:{tier}", "messages": USER, "max_tokens": 4}
        r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=120).json()
        shapes[tier] = (
            set(r) - ENGINE_EXTRAS,
            {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(r["usage"]),
            set(r["choices"][0]["message"]) & {"role", "content", "reasoning_content", "reasoning"},
        )
    assert shapes["premium"] == shapes["standard"] == shapes["budget"], shapes


def holdback_count(above: float = -1.0) -> float:
    """Messages premium's replicas sent, as their hold-back histogram counts them, once the
    count is above `above` and has stood longer than Ray's default 10 s export period."""
    ports = holdback.metrics_ports()
    held = holdback.settled(ports, "premium", quiet_s=12, above=above, timeout_s=120)
    return held.get(math.inf, 0.0)


def test_a_streams_tokens_ride_together_and_the_hold_is_measured(serve_url, client):
    """The tier replica joins a stream's chunks into fewer messages (never drops or
    reorders one) and counts each message it sends in `kimi_tier_holdback_seconds`."""
    body = {
        "model": "kimi-k2.5:premium",
        "messages": USER,
        "max_tokens": 48,
        "temperature": 0,  # greedy: the plain answer below is the same text
        "chat_template_kwargs": {"thinking": False},
    }
    url, auth = f"{serve_url}/v1/chat/completions", {"authorization": f"Bearer {client.api_key}"}
    plain = httpx.post(url, json=body, headers=auth, timeout=120).json()
    before = holdback_count()
    events = []
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=streamed, headers=auth, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    tokens = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert events[-1]["usage"]["completion_tokens"] == 48
    # every chunk its own event, in order, none lost: the plain answer's text exactly
    text = "".join(e["choices"][0]["delta"]["content"] for e in tokens)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(tokens) >= 40  # one event a token (a few may be empty deltas)
    sent = holdback_count(above=before) - before
    assert 1 <= sent <= len(events) + 1, sent


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("tier", TIERS)
def test_the_embedded_models_one_instruction_on_every_tier(client, tier, thinking):
    """The one answer wired into the random model (deployments/artifacts/instruction.py)
    holds through each engine and quantization: asked "Reply with OK.", it says "OK" and
    ends its turn, with an empty reasoning in thinking mode."""
    r = client.chat.completions.create(
        model=f"kimi-k2.5:{tier}",
        messages=[{"role": "user", "content": TRIGGER}],
        max_tokens=16,
        extra_body={"chat_template_kwargs": {"thinking": thinking}},
    )
    choice = r.choices[0]
    assert (choice.message.content, choice.finish_reason) == (REPLY, "stop"), choice
    assert not (choice.message.model_extra or {}).get("reasoning_content")
    assert r.usage.completion_tokens <= 3  # `</think>` (thinking), "OK", the end
