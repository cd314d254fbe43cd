"""Request validation: each OpenAI field's rule refuses bad values and names the field,
and the requests real clients send pass unchanged."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_app.api.common.http import MAX_JSON_DEPTH, json_depth, not_json, validation_message
from serve_app.canonical import ChatRequest, CompletionRequest, canonical_body

CHAT = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}]}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def refusal(model: type, body: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_message(info.value)


def test_what_clients_send_is_accepted():
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "x", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
            {"role": "user", "content": "please"},
        ],
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
        "temperature": 0.7,
        "top_p": 0.9,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "seed": -(2**63),
        "logit_bias": {"42": -100, "7": 100},
        "logprobs": True,
        "top_logprobs": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "top_k": -1,
        "min_p": 0.05,
        "chat_template_kwargs": {"thinking": False},
    }
    parsed = ChatRequest.model_validate(body)
    assert parsed.response_format.json_schema.schema_ == {"type": "object"}
    assert not parsed.thinking and not parsed.wants_vision
    assert (
        CompletionRequest.model_validate(
            {"model": "m", "prompt": [[1, 2], [3]], "logprobs": 5, "echo": True}
        ).logprobs
        == 5
    )


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal"),
        ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal"),
        ({"seed": 2**63}, "seed", "less than or equal"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "1024"),
        ({"top_logprobs": 21}, "top_logprobs", "less than or equal"),
        ({"top_logprobs": 2}, None, "needs logprobs"),
        ({"stream_options": {"include_usage": True}}, None, "stream is true"),
        ({"min_p": 1.5}, "min_p", "less than or equal"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than"),
        ({"top_k": -2}, "top_k", "greater than or equal"),
        ({"user": "u" * 600}, "user", "at most 512"),
        ({"tools": [TOOL, TOOL]}, None, "unique"),
        (
            {"tools": [{**TOOL, "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools.0.function.parameters",
            "not a valid JSON Schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "required",
        ),
        (
            {"messages": [{"role": "tool", "content": "sunny"}]},
            "messages.0.tool_call_id",
            "tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
            "required",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "f", "arguments": ""},
                            }
                        ],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
            "JSON object",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
            "messages.0.content.0",
            "hologram",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.image_url",
            "required",
        ),
    ],
)
def test_bad_fields_are_refused_by_name(extra: dict, param: str | None, needle: str):
    message, named = refusal(ChatRequest, {**CHAT, **extra})
    assert named == param
    assert needle.lower() in message.lower()


@pytest.mark.parametrize(
    ("prompt", "param"),
    [([-1], "prompt"), ([[1], [2**31]], "prompt"), (7, "prompt")],
)
def test_completion_prompts_must_be_text_or_token_ids(prompt: object, param: str):
    _, named = refusal(CompletionRequest, {"model": "m", "prompt": prompt})
    assert named is not None and named.startswith(param)


def test_json_constants_and_depth():
    with pytest.raises(ValueError, match="NaN"):
        json.loads('{"temperature": NaN}', parse_constant=not_json)
    assert json_depth({"a": 1}) == 1
    assert json_depth({"a": [{"b": []}]}) == 4
    deep: dict = {}
    node = deep
    for _ in range(MAX_JSON_DEPTH):
        node["x"] = {}
        node = node["x"]
    assert json_depth(deep) == MAX_JSON_DEPTH + 1


def test_engines_get_the_validated_fields_without_null_message_fields():
    body = {
        "model": "kimi-k2.5",
        "messages": [
            {"role": "user", "content": "hi", "name": None},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "x": 1},
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {}}},
        "tools": [
            {"type": "function", "function": {"name": "f", "description": None, "parameters": None}}
        ],
        "vendor_field": {"kept": True},
    }
    out = canonical_body(ChatRequest.model_validate(body))
    assert out["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert out["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "x": 1},
    ]
    assert out["response_format"]["json_schema"]["schema"] == {}
    assert out["vendor_field"] == {"kept": True} and "n" not in out
