"""Anthropic Messages <-> chat translation, both ways, with plain inputs."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_app.api.anthropic.events import Answering, EventWriter, error_status, error_type, message
from serve_app.api.anthropic.protocol import MessagesRequest
from serve_app.api.anthropic.to_chat import call_id, chat_body, tool_use_id
from serve_app.canonical import ChatRequest
from serve_app.reasoning.sealing import Sealer

SEALER = Sealer([b"k" * 32])


def answering(stop: list[str] | None = None, omit: bool = False) -> Answering:
    return Answering("msg_1", "claude-x", stop, SEALER, omit)


WEATHER = {
    "name": "get_weather",
    "description": "weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}},
        "required": ["city"],
    },
}


def request(**fields: object) -> MessagesRequest:
    base = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return MessagesRequest.model_validate(base | fields)


def test_call_ids_survive_the_round_trip_and_foreign_ids_pass():
    kimi = "functions.get_weather:3"
    encoded = tool_use_id(kimi)
    assert encoded.startswith("toolu_") and all(c.isalnum() or c in "_-" for c in encoded)
    assert call_id(encoded) == kimi
    assert call_id("toolu_01A09q90qw90lq917835lq9") == "toolu_01A09q90qw90lq917835lq9"
    assert call_id("call_abc") == "call_abc"


def test_a_tool_round_trip_becomes_openai_messages_in_openai_order():
    call = tool_use_id("functions.get_weather:0")
    req = request(
        system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "look it up"},
                    {"type": "text", "text": "checking"},
                    {
                        "type": "tool_use",
                        "id": call,
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "and be quick"},
                    {
                        "type": "tool_result",
                        "tool_use_id": call,
                        "content": "sunny",
                        "is_error": True,
                    },
                ],
            },
        ],
    )
    body = chat_body(req, SEALER)
    ChatRequest.model_validate(body)  # the pipeline's own validation accepts it
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert body["messages"][0]["content"] == "be brief\n\nbe kind"
    assistant = body["messages"][2]
    assert assistant["reasoning_content"] == "look it up" and assistant["content"] == "checking"
    assert assistant["tool_calls"][0]["id"] == "functions.get_weather:0"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    tool = body["messages"][3]
    assert tool["tool_call_id"] == "functions.get_weather:0"
    assert tool["content"].endswith("sunny") and "error" in tool["content"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]


@pytest.mark.parametrize(
    ("thinking", "on", "budget"),
    [
        (None, False, None),
        ({"type": "disabled"}, False, None),
        ({"type": "enabled", "budget_tokens": 8}, True, 8),
    ],
)
def test_thinking_maps_to_kimi_modes_and_a_budget(thinking, on, budget):
    body = chat_body(request(**({"thinking": thinking} if thinking else {})), SEALER)
    assert body["chat_template_kwargs"] == {"thinking": on}
    assert body.get("thinking_token_budget") == budget


def test_sampling_fields_and_their_bounds():
    body = chat_body(
        request(stop_sequences=["END"], temperature=0.5, top_k=5, metadata={"user_id": "u1"}),
        SEALER,
    )
    assert (body["stop"], body["temperature"], body["top_k"], body["user"]) == (
        ["END"],
        0.5,
        5,
        "u1",
    )
    with pytest.raises(ValidationError, match="budget_tokens"):
        request(thinking={"type": "enabled", "budget_tokens": 64})
    with pytest.raises(ValidationError, match="not in tools"):
        request(tools=[WEATHER], tool_choice={"type": "tool", "name": "other"})
    with pytest.raises(ValidationError, match="temperature"):
        request(temperature=1.5)


def test_an_image_block_becomes_an_image_part():
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    body = chat_body(
        request(messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]),
        SEALER,
    )
    parts = body["messages"][0]["content"]
    assert parts[0] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert ChatRequest.model_validate(body).wants_vision


def test_a_completion_becomes_a_message():
    answer = {
        "choices": [
            {
                "finish_reason": "stop",
                "message": {
                    "reasoning_content": "hmm",
                    "content": "ok",
                    "tool_calls": [
                        {"id": "functions.f:0", "function": {"name": "f", "arguments": '{"a": 1}'}}
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
            "cost": 0.5,
        },
    }
    msg = message(answer, answering())
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    assert (
        msg["content"][2]["input"] == {"a": 1}
        and call_id(msg["content"][2]["id"]) == "functions.f:0"
    )
    assert msg["stop_reason"] == "tool_use"  # a named call, which OpenAI ends with `stop`
    assert msg["usage"] == {
        "input_tokens": 6,
        "output_tokens": 5,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 0,
        "service_tier": "standard",  # Anthropic's word for the default band
        "cost_usd": 0.5,
    }
    flex = Answering("msg_1", "claude-x", None, SEALER, False, band="flex")
    assert message(answer, flex)["usage"]["service_tier"] == "batch"


@pytest.mark.parametrize(
    ("finish", "matched", "reason", "sequence"),
    [
        ("length", None, "max_tokens", None),
        ("stop", "END", "stop_sequence", "END"),
        ("stop", None, "end_turn", None),
    ],
)
def test_stop_reasons(finish, matched, reason, sequence):
    answer = {
        "choices": [{"finish_reason": finish, "stop_reason": matched, "message": {"content": "x"}}]
    }
    msg = message(answer, answering(stop=["END"]))
    assert (msg["stop_reason"], msg["stop_sequence"]) == (reason, sequence)


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


def test_a_chunk_stream_becomes_anthropics_event_sequence():
    w = EventWriter(answering())
    out = w.start()
    for delta in (
        {"reasoning_content": "th"},
        {"reasoning_content": "ink"},
        {"content": "Hel"},
        {"content": "lo"},
        {
            "tool_calls": [
                {"index": 0, "id": "functions.f:0", "function": {"name": "f", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
    ):
        out += w.chunk({"choices": [{"index": 0, "delta": delta}]})
    out += w.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    out += w.chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9}})
    out += w.finish()
    seq = events(out)
    assert [e["type"] for e in seq] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",  # the thinking block's signature
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    [signed] = [e["delta"] for e in seq if e.get("delta", {}).get("type") == "signature_delta"]
    assert SEALER.open(signed["signature"]) == "think"
    starts = [e["content_block"] for e in seq if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    assert [e["index"] for e in seq if e["type"] == "content_block_start"] == [0, 1, 2]
    partial = "".join(
        e["delta"].get("partial_json", "") for e in seq if e["type"] == "content_block_delta"
    )
    assert json.loads(partial) == {"a": 1}
    end = seq[-2]
    assert end["delta"]["stop_reason"] == "tool_use"
    assert end["usage"]["input_tokens"] == 7 and end["usage"]["output_tokens"] == 9


@pytest.mark.parametrize(
    ("status", "wire", "kind"),
    [
        (400, 400, "invalid_request_error"),
        (401, 401, "authentication_error"),
        (402, 402, "billing_error"),
        (403, 403, "permission_error"),
        (404, 404, "not_found_error"),
        (413, 413, "request_too_large"),
        (429, 429, "rate_limit_error"),
        (500, 500, "api_error"),
        (503, 529, "overloaded_error"),
        (504, 504, "timeout_error"),
    ],
)
def test_errors_take_anthropics_types_and_statuses(status, wire, kind):
    assert (error_status(status), error_type(status)) == (wire, kind)


def test_what_claude_code_sends_is_understood():
    """A system message inside `messages`, adaptive thinking with an effort, and fields
    that change nothing here (`context_management`, `cache_control`, `display`)."""
    req = MessagesRequest.model_validate(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 32000,
            "system": [
                {"type": "text", "text": "you code", "cache_control": {"type": "ephemeral"}}
            ],
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "be careful"}]},
                {"role": "user", "content": "fix it"},
            ],
            "thinking": {"type": "adaptive", "display": "omitted"},
            "output_config": {"effort": "medium"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        }
    )
    body = chat_body(req, SEALER)
    ChatRequest.model_validate(body)
    assert [m["role"] for m in body["messages"]] == ["system", "system", "user"]
    assert body["messages"][1]["content"] == "be careful"
    assert body["chat_template_kwargs"] == {"thinking": True}
    assert body["thinking_token_budget"] == 8000  # a quarter of max_tokens at medium effort


@pytest.mark.parametrize(("effort", "budget"), [("low", 100), ("high", 400), ("max", None)])
def test_adaptive_thinking_budget_follows_the_effort(effort, budget):
    req = request(max_tokens=800, thinking={"type": "adaptive"}, output_config={"effort": effort})
    assert chat_body(req, SEALER).get("thinking_token_budget") == budget


def test_sealed_reasoning_round_trip_tamper_wrong_key_rotation_and_age():
    old, new = Sealer([b"o" * 32]), Sealer([b"n" * 32, b"o" * 32])
    token = old.seal("step one", now=1000.0)
    assert old.open(token, now=1001.0) == "step one"
    assert new.open(token, now=1001.0) == "step one"  # rotated out, still read
    assert old.open(new.seal("later")) is None  # sealed with the new key: not ours
    assert Sealer([b"x" * 32]).open(token, now=1001.0) is None  # another server's
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    assert old.open(flipped, now=1001.0) is None  # altered
    assert old.open("not-a-token") is None and old.open("") is None
    assert old.open(token, now=1000.0 + 31 * 86400) is None  # too old


def test_omitted_thinking_travels_in_its_signature_and_comes_back():
    answer = {
        "choices": [
            {"finish_reason": "stop", "message": {"reasoning_content": "plan", "content": "ok"}}
        ]
    }
    msg = message(answer, answering(omit=True))
    block = msg["content"][0]
    assert block["thinking"] == "" and SEALER.open(block["signature"]) == "plan"
    back = request(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [block, {"type": "text", "text": "ok"}]},
            {"role": "user", "content": "more"},
        ]
    )
    assert chat_body(back, SEALER)["messages"][1]["reasoning_content"] == "plan"


def test_a_signature_that_does_not_open_brings_no_reasoning():
    foreign = {"type": "thinking", "thinking": "someone else's", "signature": "EqQBCkYIBxgC"}
    back = request(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [foreign, {"type": "text", "text": "ok"}]},
            {"role": "user", "content": "more"},
        ]
    )
    assert "reasoning_content" not in chat_body(back, SEALER)["messages"][1]


def test_omitted_thinking_streams_only_its_signature():
    w = EventWriter(answering(omit=True))
    out = w.start() + w.chunk({"choices": [{"index": 0, "delta": {"reasoning_content": "plan"}}]})
    out += w.chunk({"choices": [{"index": 0, "delta": {"content": "ok"}}]}) + w.finish()
    deltas = [e["delta"] for e in events(out) if e["type"] == "content_block_delta"]
    assert [d["type"] for d in deltas] == ["signature_delta", "text_delta"]
    assert SEALER.open(deltas[0]["signature"]) == "plan"


def test_how_reasoning_came_back_is_counted_per_request():
    from serve_app.pipeline.telemetry import reasoning_back

    sealer = SEALER.counting()
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}
    good = {"type": "thinking", "thinking": "", "signature": SEALER.seal("plan")}
    bad = {"type": "thinking", "thinking": "", "signature": "EqQBCkYIBxgC"}
    back = request(
        thinking={"type": "enabled", "budget_tokens": 32},
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [good, call]},
            {"role": "user", "content": [result]},
            {"role": "assistant", "content": [bad, {**call, "id": "toolu_2"}]},
            {"role": "user", "content": [{**result, "tool_use_id": "toolu_2"}]},
            {"role": "assistant", "content": [{**call, "id": "toolu_3"}]},
            {"role": "user", "content": [{**result, "tool_use_id": "toolu_3"}]},
        ],
    )
    body = chat_body(back, sealer)
    counts = reasoning_back(body, sealer.opened)
    assert counts == {"sealed": 1, "memory": 0, "dropped": 1, "text": 0, "missing": 2}
    assert sealer.opened is not SEALER.opened  # each request counts its own
