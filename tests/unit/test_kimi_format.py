"""Kimi's turn format: the grammar we force on llama.cpp tiers and the parser that reads
turns back (pure logic; the engines are exercised in the integration tests)."""

from __future__ import annotations

import json

import pytest

from deployments.engines.llama_cpp.constrained import (
    MAX_PARALLEL_CALLS,
    TurnWriter,
    constraint_for,
    delta_dict,
    finish_reason,
    pieces,
    turn_outputs,
)
from deployments.engines.llama_cpp.kimi_format import (
    CallRules,
    KimiTurnParser,
    Marker,
    ReasoningBound,
    call_name,
    turn_grammar,
)
from deployments.spec import TierSpec

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
TIME = {"type": "function", "function": {"name": "get_time"}}
SPEC = TierSpec.model_validate(
    {"name": "standard", "engine": "llama.cpp", "artifact": {"kind": "embedded"}, "max_context": 8}
)


def turn(*items: str | Marker) -> list[tuple[str, Marker | None]]:
    return [(i.value, i) if isinstance(i, Marker) else (i, None) for i in items]


def call(header: str, *args: str) -> list[str | Marker]:
    return [Marker.CALL_BEGIN, *header, Marker.ARG_BEGIN, *args, Marker.CALL_END]


def parse(items, reasoning_open=True):
    parser = KimiTurnParser(reasoning_open=reasoning_open)
    deltas = [parser.feed(text, marker) for text, marker in items]
    return parser, deltas


def test_parser_reads_reasoning_and_two_calls():
    items = turn(
        "hm",
        "m",
        Marker.THINK_END,
        Marker.SECTION_BEGIN,
        *call(["functions.get_", "weather:3"], '{"city"', ':"P"}'),
        *call(["functions.get_time:4"], "{}"),
        Marker.SECTION_END,
    )
    parser, deltas = parse(items)
    assert parser.reasoning == "hmm" and parser.content == ""
    assert [(c.position, c.id, c.name, c.arguments) for c in parser.complete_calls] == [
        (0, "functions.get_weather:3", "get_weather", '{"city":"P"}'),
        (1, "functions.get_time:4", "get_time", "{}"),
    ]
    # the stream's tool-call deltas: id and name once, then argument fragments
    streamed = [delta_dict(d)["tool_calls"][0] for d in deltas if d.started or d.arguments]
    assert streamed[0] == {
        "index": 0,
        "id": "functions.get_weather:3",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert [s["function"]["arguments"] for s in streamed[1:3]] == ['{"city"', ':"P"}']
    assert all("id" not in s for s in streamed[1:3])
    assert finish_reason("eos", parser, named=False) == "tool_calls"
    assert finish_reason("eos", parser, named=True) == "stop"  # as OpenAI says it


def test_a_call_cut_off_keeps_the_calls_before_it():
    items = turn(
        Marker.SECTION_BEGIN,
        *call(["functions.get_time:0"], "{}"),
        Marker.CALL_BEGIN,
        "functions.get_weather:1",
        Marker.ARG_BEGIN,
        '{"ci',
    )
    parser, _ = parse(items, reasoning_open=False)
    assert [c.id for c in parser.complete_calls] == ["functions.get_time:0"]
    assert parser.call_open
    assert finish_reason("limit", parser, named=False) == "length"
    message = TurnWriter(model="m", stream=False).completion(parser, "length", {})
    assert [c["id"] for c in message["choices"][0]["message"]["tool_calls"]] == [
        "functions.get_time:0"
    ]


def test_spelled_markers_are_text():
    """A marker's text that did not come as the special token is ordinary text."""
    parser, _ = parse(turn("<|tool_calls_section_begin|>", "x"), reasoning_open=False)
    assert parser.content == "<|tool_calls_section_begin|>x" and not parser.calls
    assert pieces({"content": "</think>", "tokens": [21]}) == [("</think>", Marker.THINK_END)]
    assert pieces({"content": "</think>", "tokens": [60, 61, 62]}) == [("</think>", None)]
    assert pieces({"content": "", "tokens": [2]}) == []


def test_a_marker_after_a_held_back_character_is_still_the_marker():
    """llama-server holds back a half-written character and sends it with the next
    token's text; when that token is a marker it cannot complete it (U+FFFD)."""
    assert pieces({"content": " \ufffd</think>", "tokens": [21]}) == [
        (" \ufffd", None),
        ("</think>", Marker.THINK_END),
    ]
    assert pieces({"content": "a</think>", "tokens": [60, 61]}) == [("a</think>", None)]
    parser, _ = parse([*pieces({"content": " \ufffd</think>", "tokens": [21]}), ("ok", None)])
    assert (parser.reasoning, parser.content) == (" \ufffd", "ok")


@pytest.mark.parametrize(
    ("header", "name"),
    [("functions.get_weather:12", "get_weather"), ("functions.a:b:0", "a:b"), ("odd", "odd")],
)
def test_call_name(header, name):
    assert call_name(header) == name


def rules_of(grammar: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in grammar.strip().splitlines())


CALLS = CallRules(
    ("get_weather", "get_time"),
    {"get_weather": "args-0", "get_time": "args-1"},
    first_index=2,
    max_calls=2,
)


def test_forced_call_grammar_is_bounded_and_numbered():
    rules = rules_of(turn_grammar(ReasoningBound(enabled=True, tokens=16), CALLS, forced=True))
    # no free text: reasoning, then the section at once
    assert rules["root"] == "kimi-think kimi-section"
    assert rules["kimi-section"] == (
        "<|tool_calls_section_begin|> kimi-calls-0 <|tool_calls_section_end|>"
    )
    assert rules["kimi-think"] == "(!</think>){0,16} </think>"
    assert '"functions.get_weather:2" <|tool_call_argument_begin|> args-0' in rules["kimi-call-0"]
    assert '"functions.get_time:3" <|tool_call_argument_begin|> args-1' in rules["kimi-call-1"]
    assert rules["kimi-calls-0"] == "kimi-call-0 kimi-calls-1?"
    assert rules["kimi-calls-1"] == "kimi-call-1"
    assert "kimi-text" not in rules


def test_auto_grammar_allows_text_or_calls():
    rules = rules_of(turn_grammar(ReasoningBound(enabled=True), CALLS))
    assert rules["root"] == "kimi-think kimi-text kimi-section?"
    assert rules["kimi-think"] == "(!</think>)* </think>"
    assert rules["kimi-text"] == "(!<|tool_calls_section_begin|>)*"
    with_json = rules_of(turn_grammar(ReasoningBound(enabled=False), CALLS, answer_rule="answer"))
    assert with_json["root"] == "kimi-think ( answer | kimi-section )"


def test_json_grammar_without_reasoning():
    grammar = turn_grammar(ReasoningBound(enabled=False), answer_rule="answer")
    assert grammar.splitlines() == ["root ::= kimi-think answer", 'kimi-think ::= ""']


def test_markers_out_of_place_are_text():
    """A call marker outside the section (auto mode's free text may hold one) or a
    section marker inside the reasoning is text: no call escapes the section's schema."""
    items = turn(
        "a",
        Marker.SECTION_BEGIN,
        Marker.THINK_END,
        Marker.CALL_BEGIN,
        "functions.x:0",
        Marker.ARG_BEGIN,
        "{",
        Marker.CALL_END,
    )
    parser, _ = parse(items)
    assert parser.reasoning == "a<|tool_calls_section_begin|>"
    assert parser.content == (
        "<|tool_call_begin|>functions.x:0<|tool_call_argument_begin|>{<|tool_call_end|>"
    )
    assert not parser.calls


def body(**kw):
    return {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, TIME], **kw}


def test_constraints_follow_tool_choice():
    assert constraint_for(body(tool_choice="none"), SPEC) is None
    assert constraint_for({"messages": []}, SPEC) is None
    auto = constraint_for(body(max_tokens=64), SPEC)
    assert auto.callable_tools == ("get_weather", "get_time") and not auto.forced
    assert auto.reasoning.tokens is None  # nothing must come: reasoning unbounded
    named = constraint_for(
        body(tool_choice={"type": "function", "function": {"name": "get_time"}}), SPEC
    )
    assert named.callable_tools == ("get_time",) and named.named and named.max_calls == 1
    assert named.parameters["get_time"] == {"type": "object"}  # no parameters: any object
    required = constraint_for(body(tool_choice="required", max_tokens=64), SPEC)
    assert required.callable_tools == ("get_weather", "get_time") and not required.named
    assert required.forced
    assert required.max_calls == MAX_PARALLEL_CALLS
    assert required.reasoning == ReasoningBound(enabled=True, tokens=16)  # 64 // 4
    single = constraint_for(body(tool_choice="required", parallel_tool_calls=False), SPEC)
    assert single.max_calls == 1 and single.reasoning.tokens == 64


def test_call_index_continues_the_conversation():
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a"}, {"id": "b"}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
    ]
    c = constraint_for(body(messages=history, tool_choice="required"), SPEC)
    assert c.first_index == 2


def test_json_constraints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    c = constraint_for({"messages": [], "response_format": fmt}, SPEC)
    assert c.answer_schema == schema
    instant = {"messages": [], "response_format": {"type": "json_object"}}
    instant["chat_template_kwargs"] = {"thinking": False}
    c = constraint_for(instant, SPEC)
    assert c.answer_schema == {"type": "object"} and not c.reasoning.enabled
    assert constraint_for({"messages": [], "response_format": {"type": "text"}}, SPEC) is None


@pytest.mark.parametrize(
    ("configured", "max_tokens", "budget"),
    [(64, None, 64), (64, 64, 16), (64, 4000, 64), (None, 64, None), (0, 64, 0)],
)
def test_thinking_budget_fits_inside_max_tokens(configured, max_tokens, budget):
    spec = SPEC.model_copy(update={"forced_tool_thinking_budget": configured})
    assert spec.thinking_budget(max_tokens) == budget


async def test_an_engine_error_mid_answer_is_the_answers_error_not_a_quiet_stop():
    """llama-server's grammar may refuse a token it sampled (a 500 event mid-stream):
    that reaches the client as an error, never as `stop` with whatever came before."""
    from deployments.protocol import EngineError

    async def events():
        yield {"content": "some reasoning", "tokens": [5], "stop": False}
        yield {"error": {"code": 500, "message": "Unexpected empty grammar stack", "type": "x"}}

    constraint = constraint_for(body(tool_choice="required", max_tokens=64), SPEC)
    for stream in (True, False):
        writer = TurnWriter(model="m", stream=stream, include_usage=True)
        out = [item async for item in turn_outputs(events(), writer, constraint)]
        assert isinstance(out[-1], EngineError), out
        assert out[-1].status_code == 500 and "grammar" in out[-1].message
        assert not any(isinstance(o, str) and "[DONE]" in o for o in out)


async def test_the_reasoning_tokens_of_a_constrained_turn_are_counted():
    async def events():
        yield {"content": "think", "tokens": [5], "stop": False}
        yield {"content": " more", "tokens": [6, 7], "stop": False}  # a held character
        yield {"content": "</think>", "tokens": [9], "stop": False}  # the marker: not counted
        yield {"content": "answer", "tokens": [8], "stop": False}
        yield {"content": "", "stop": True, "stop_type": "eos", "tokens_predicted": 5}

    constraint = constraint_for(body(tool_choice="required", max_tokens=64), SPEC)
    writer = TurnWriter(model="m", stream=False, include_usage=True)
    [answer] = [item async for item in turn_outputs(events(), writer, constraint)]
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_llama_servers_chat_chunks_with_reasoning_count_and_usage_carries_them():
    from deployments.engines.llama_cpp.engine import thinks, with_reasoning_tokens

    chunk = {"choices": [{"delta": {"reasoning_content": "hm"}}]}
    assert thinks(f"data: {json.dumps(chunk)}") == 1
    assert thinks('data: {"choices": [{"delta": {"reasoning_content": null}}]}') == 0
    usage = {"usage": {"completion_tokens": 9, "completion_tokens_details": {"x": 1}}}
    counted = with_reasoning_tokens(usage, 4)["usage"]["completion_tokens_details"]
    assert counted == {"x": 1, "reasoning_tokens": 4}
