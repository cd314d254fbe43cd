"""The Anthropic and chat-completions adapters on fakes (conftest.py)."""

from __future__ import annotations

import json
import re
from functools import partial

import anthropic
import openai
import pytest

from deployments.engines.llama_cpp.engine import engine_error_from
from deployments.engines.vllm.engine import refusal
from deployments.protocol import context_overflow
from tests.unit.adapters.conftest import Served


async def test_a_streamed_message_is_anthropics_event_stream_and_one_record(served: Served):
    async with served.claude.messages.stream(
        model="kimi-k2.5",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-claude-code-session-id": "sess-1"},
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
    assert final.content[0].text == "x" * 6 and final.usage.output_tokens == 6
    [record] = served.gateway.records
    assert (record.api, record.status, record.completion_tokens) == ("anthropic", 200, 6)
    assert served.engine.bodies[0]["max_tokens"] == 64


async def test_an_anthropic_refusal_is_in_anthropics_error_shape(served: Served):
    with pytest.raises(anthropic.BadRequestError) as err:
        await served.claude.messages.create(model="kimi-k2.5", max_tokens=0, messages=[])
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert served.engine.requests == [] and served.gateway.records == []


async def test_a_chat_completion_through_the_route_table(served: Served):
    answer = await served.oai.chat.completions.create(
        model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert answer.choices[0].message.content == "x" * 6
    [record] = served.gateway.records
    assert (record.api, record.endpoint, record.status) == ("openai", "chat", 200)
    models = await served.oai.models.list()
    assert "kimi-k2.5" in [m.id for m in models.data]


async def test_a_prompt_past_every_tiers_context_is_worded_as_each_api_words_it(served: Served):
    """Agent CLIs compact their history on these exact words: Anthropic's "prompt is too
    long: N tokens > M maximum", OpenAI's `context_length_exceeded`."""
    long = [{"role": "user", "content": "word " * 200_000}]
    with pytest.raises(anthropic.BadRequestError) as err:
        await served.claude.messages.create(model="kimi-k2.5", max_tokens=8, messages=long)
    message = err.value.body["error"]["message"]
    assert re.fullmatch(r"prompt is too long: \d+ tokens > \d+ maximum", message), message
    needs, limit = map(int, re.findall(r"\d+", message))
    assert needs > limit
    with pytest.raises(openai.BadRequestError) as err:
        await served.oai.chat.completions.create(model="kimi-k2.5", max_tokens=8, messages=long)
    assert err.value.code == "context_length_exceeded"
    said = err.value.body["message"]
    assert said.startswith(f"This model's maximum context length is {limit} tokens"), said
    assert served.engine.bodies == []  # refused before any engine


async def test_an_engines_own_context_refusal_is_worded_as_each_api_words_it(served: Served):
    """The router's estimate of a prompt is deliberately low; where the engine counts more
    than its context holds, its refusal (any engine's, one shape) carries its counts and
    is worded as the router's own."""
    served.engine.refusal = context_overflow(20_480, 16_384)
    ask = [{"role": "user", "content": "a long history"}]
    with pytest.raises(anthropic.BadRequestError) as err:
        await served.claude.messages.create(model="kimi-k2.5", max_tokens=8, messages=ask)
    said = err.value.body["error"]["message"]
    assert said == "prompt is too long: 20480 tokens > 16384 maximum", said
    with pytest.raises(openai.BadRequestError) as err:
        await served.oai.chat.completions.create(model="kimi-k2.5", max_tokens=8, messages=ask)
    assert err.value.code == "context_length_exceeded"
    assert err.value.body["message"].startswith("This model's maximum context length is 16384")


def test_each_engines_context_refusal_is_read_into_one_shape():
    llama = {
        "error": {
            "code": 400,
            "message": "request (20480 tokens) exceeds the available context size (16384 "
            "tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 20480,
            "n_ctx": 16384,
        }
    }
    vllm = [
        "This model's maximum context length is 16384 tokens. However, your prompt contains "
        "at least 20480 input tokens, which exceeds this limit even without any output tokens.",
        "The decoder prompt (length 20480) is longer than the maximum model length of 16384.",
    ]
    read = [engine_error_from(400, json.dumps(llama).encode()), *map(partial(refusal, 400), vllm)]
    assert {(e.code, e.prompt_tokens, e.max_context) for e in read} == {
        ("context_length_exceeded", 20480, 16384)
    }
    other = refusal(400, "temperature: must be at most 2")
    assert (other.code, other.prompt_tokens) == (None, None)


async def test_a_token_count_is_sent_without_an_output_limit(served: Served):
    """Counting a prompt generates nothing: no `max_tokens` is set on its way (the
    Messages API's clamping lowers a limit asked, never adds one)."""
    counted = await served.claude.messages.count_tokens(
        model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens > 0
    assert "max_tokens" not in served.engine.bodies[-1]
