"""Responses API <-> chat translation, checked against the `openai` SDK's own models."""

from __future__ import annotations

import json

import pytest
from openai.types.conversations import ConversationItem
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from serve_app.api.responses.protocol import ResponsesRequest
from serve_app.api.responses.to_chat import chat_body, chat_messages, input_items
from serve_app.api.responses.writer import ResponseWriter, response_doc
from serve_app.canonical import ChatRequest
from serve_app.errors import APIError
from serve_app.reasoning.sealing import Sealer

SEALER = Sealer([b"k" * 32])
EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(ConversationItem)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}},
        "required": ["city"],
    },
    "strict": True,
}


def request(**fields: object) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "kimi-k2.5", "input": "hi"} | fields)


def test_input_items_with_one_id_twice_are_refused_and_an_empty_id_gets_a_fresh_one():
    twice = [{"type": "message", "role": "user", "content": "hi", "id": "msg_1"}] * 2
    with pytest.raises(APIError) as err:
        input_items(request(input=twice).input, "items")
    assert (err.value.status, err.value.param) == (400, "items")
    with pytest.raises(APIError) as err:
        input_items(request(input=twice).input)
    assert (err.value.status, err.value.param) == (400, "input")  # a response's own input
    blank = [{"type": "message", "role": "user", "content": "hi", "id": ""}] * 2
    ids = [i["id"] for i in input_items(request(input=blank).input)]
    assert len(set(ids)) == 2 and all(ids)


def test_a_string_input_is_one_user_message_and_settings_carry_over():
    req = request(
        instructions="be brief",
        max_output_tokens=50,
        temperature=0.3,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        reasoning={"effort": "low"},
    )
    items = input_items(req.input)
    assert items[0]["id"].startswith("msg_")
    assert items[0]["content"] == [{"type": "input_text", "text": "hi"}]
    body = chat_body(req, items, SEALER)
    ChatRequest.model_validate(body)
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert body["max_tokens"] == 50 and body["temperature"] == 0.3
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tools"][0]["function"]["strict"] is True
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"]["json_schema"]["name"] == "w"
    assert body["chat_template_kwargs"] == {"thinking": True}
    assert body["thinking_token_budget"] == 6  # low: an eighth of the output


@pytest.mark.parametrize("effort", ["none", "minimal"])
def test_no_reasoning_effort_is_instant_mode(effort):
    body = chat_body(request(reasoning={"effort": effort}), input_items(request().input), SEALER)
    assert body["chat_template_kwargs"] == {"thinking": False}
    assert "thinking_token_budget" not in body


def test_a_tool_round_trip_with_reasoning_becomes_one_assistant_turn():
    sealed = SEALER.seal("I should look it up")
    items = [
        {"type": "message", "role": "user", "content": "weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": sealed},
        {
            "type": "function_call",
            "call_id": "functions.get_weather:0",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "sun"},
    ]
    req = request(input=items)
    messages = chat_messages(input_items(req.input), SEALER)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["reasoning_content"] == "I should look it up"
    assert messages[1]["tool_calls"][0]["id"] == "functions.get_weather:0"
    assert messages[2] == {
        "role": "tool",
        "tool_call_id": "functions.get_weather:0",
        "content": "sun",
    }
    # a sealed reasoning that is not ours brings nothing back
    forged = [dict(items[1], encrypted_content="not-ours"), items[2]]
    assert "reasoning_content" not in chat_messages(forged, SEALER)[0]


def test_unsupported_input_is_refused_with_its_place():
    with pytest.raises(ValidationError, match="not supported"):
        request(input=[{"type": "web_search_call", "id": "x"}])
    with pytest.raises(ValidationError, match="hosted tool 'web_search'"):
        request(tools=[{"type": "web_search"}], tool_choice={"type": "web_search"})
    file_image = [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]
    with pytest.raises(APIError) as err:
        chat_body(request(input=file_image), input_items(request(input=file_image).input), SEALER)
    assert err.value.param == "input[0].content"
    with pytest.raises(APIError, match="input is empty"):
        chat_body(request(input=None), [], SEALER)


def answer(message: dict, finish: str = "stop") -> dict:
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 4},
        "cost": 0.001,
    }
    return {"choices": [{"message": message, "finish_reason": finish}], "usage": usage}


def test_a_completion_becomes_a_response_the_sdk_parses():
    req = request(include=["reasoning.encrypted_content"])
    doc = response_doc(req, "resp_1")
    writer = ResponseWriter(doc, SEALER, encrypt=True)
    call = {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    writer.chunk(answer({"reasoning_content": "hmm", "content": "ok", "tool_calls": [call]}))
    writer.finish()
    parsed = Response.model_validate(doc)
    assert parsed.status == "completed"
    kinds = [item.type for item in parsed.output]
    assert kinds == ["reasoning", "message", "function_call"]
    assert SEALER.open(parsed.output[0].encrypted_content) == "hmm"
    assert parsed.output[1].content[0].text == "ok"
    assert parsed.output[2].call_id == "functions.get_weather:0"
    assert parsed.usage.input_tokens_details.cached_tokens == 4
    assert doc["usage"]["cost"] == 0.001
    # what was answered, sent back as input, is the same conversation
    back = chat_messages(doc["output"], SEALER)
    assert back[0]["reasoning_content"] == "hmm" and back[0]["content"] == "ok"
    assert back[0]["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo"}'
    for item in input_items(request(input=doc["output"]).input):
        ITEMS.validate_python(item)


def test_a_chunk_stream_gives_typed_events_in_sequence_and_incomplete_at_length():
    doc = response_doc(request(), "resp_2")
    writer = ResponseWriter(doc, SEALER, encrypt=False)
    events = writer.start()
    deltas = [
        {"reasoning_content": "a"},
        {"reasoning_content": "b"},
        {"content": "x"},
        {"tool_calls": [{"index": 0, "id": "functions.f:0", "function": {"name": "f"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
    ]
    for delta in deltas:
        events += writer.chunk({"choices": [{"delta": delta}]})
    events += writer.chunk({"choices": [{"delta": {}, "finish_reason": "length"}]})
    events += writer.chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 6}})
    events += writer.finish()
    parsed = [EVENTS.validate_python(json.loads(json.dumps(e))) for e in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    kinds = [e.type for e in parsed]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert (
        kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    )
    done = next(e for e in parsed if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"a":1}'
    final = parsed[-1].response
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].content[0].text == "ab" and final.usage.output_tokens == 6


def test_a_failure_keeps_what_came_and_says_why():
    writer = ResponseWriter(response_doc(request(), "resp_3"), SEALER, encrypt=False)
    writer.start()
    writer.chunk({"choices": [{"delta": {"content": "par"}}]})
    events = writer.fail("server_error", "the engine stopped")
    assert events[-1]["type"] == "response.failed"
    final = Response.model_validate(events[-1]["response"])
    assert final.error.message == "the engine stopped" and final.output[0].content[0].text == "par"
    assert writer.finish() == []


def test_a_background_response_is_streamed_from_its_engine_with_usage():
    body = chat_body(request(background=True), input_items(request().input), SEALER)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_a_conversations_new_items_are_stored_like_a_responses_input():
    from serve_app.api.responses.protocol import ConversationCreate

    spec = ConversationCreate.model_validate(
        {
            "items": [
                {"type": "function_call_output", "call_id": "c1", "output": "x"},
                {"role": "user", "content": "hi"},
            ]
        }
    )
    stored = input_items(spec.items)
    assert [i["type"] for i in stored] == ["function_call_output", "message"]
    assert all(i["id"] and i["status"] == "completed" for i in stored)
    for item in stored:
        ITEMS.validate_python(item)


def test_hosted_tools_are_taken_but_not_shown_to_the_model():
    fn = {"type": "function", "name": "shell", "parameters": {"type": "object"}}
    req = request(tools=[fn, {"type": "web_search"}], tool_choice="auto")
    assert req.hosted_tools == ["web_search"]
    body = chat_body(req, input_items(req.input), SEALER)
    assert [t["function"]["name"] for t in body["tools"]] == ["shell"]
    assert body["tool_choice"] == "auto"
    alone = request(
        tools=[{"type": "web_search", "search_context_size": "low"}], tool_choice="auto"
    )
    body = chat_body(alone, input_items(alone.input), SEALER)
    assert "tools" not in body and "tool_choice" not in body


CODEX_NAMESPACE = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [{**WEATHER, "name": "spawn_agent", "strict": False}],
}


def test_namespace_tools_are_flattened_for_the_model_and_restored_in_the_output():
    req = request(
        tools=[WEATHER, CODEX_NAMESPACE, {"type": "web_search", "external_web_access": False}],
        client_metadata={"session_id": "s1", "x-codex-turn-metadata": "{}"},
    )
    body = chat_body(req, input_items(req.input), SEALER)
    ChatRequest.model_validate(body)
    names = [t["function"]["name"] for t in body["tools"]]
    assert names == ["get_weather", "multi_agent_v1.spawn_agent"]
    assert req.hosted_tools == ["web_search"]

    writer = ResponseWriter(response_doc(req, "resp_ns"), SEALER, False, req.namespaced)
    writer.start()
    call = {"id": "functions.multi_agent_v1.spawn_agent:0", "function": {"name": names[1]}}
    events = writer.chunk({"choices": [{"delta": {"tool_calls": [{"index": 0, **call}]}}]})
    writer.chunk({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    events += writer.finish()
    item = Response.model_validate(events[-1]["response"]).output[0]
    assert (item.name, item.namespace) == ("spawn_agent", "multi_agent_v1")

    # the call comes back in the next turn's input under its namespace
    back = chat_messages(input_items(request(input=[item.model_dump()]).input), SEALER)
    assert back[0]["tool_calls"][0]["function"]["name"] == "multi_agent_v1.spawn_agent"
