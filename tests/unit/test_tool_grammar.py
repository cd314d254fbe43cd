"""The tightened Kimi tool-call grammar, compiled by xgrammar against the tiny tokenizer."""

import pytest

xgr = pytest.importorskip("xgrammar")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from xgrammar.structural_tag import JSONSchemaFormat, RegexFormat, TokenFormat  # noqa: E402

from deployments.artifacts.tiny_model import ensure_tiny_model  # noqa: E402
from deployments.engines.vllm.tool_parser import (  # noqa: E402
    CONTROL_CHARS,
    BoundedKimiK2ToolParser,
)

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_model())


def tag_for(tok, choice):
    from vllm.tool_parsers.tool_strict_level import ToolStrictLevel

    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], tools=[TOOL], tool_choice=choice
    )
    parser = BoundedKimiK2ToolParser(tok, req.tools)
    return (
        parser,
        req,
        parser.get_structural_tag(req, reasoning=False, strict_level=ToolStrictLevel.PARAMETER),
    )


def walk(node):
    yield node
    if hasattr(type(node), "model_fields"):
        for f in type(node).model_fields:
            yield from walk(getattr(node, f))
    elif isinstance(node, list):
        for x in node:
            yield from walk(x)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_grammar_is_bounded_and_pins_marker_tokens(tok, choice):
    _, _, tag = tag_for(tok, choice)
    nodes = list(walk(tag.format))
    assert not any(isinstance(n, RegexFormat) and n.pattern == r"\d+" for n in nodes)
    assert all(n.max_whitespace_cnt == 1 for n in nodes if isinstance(n, JSONSchemaFormat))
    pinned = {tok.convert_ids_to_tokens(n.token) for n in nodes if isinstance(n, TokenFormat)}
    assert {
        "<|tool_calls_section_begin|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
    } <= pinned

    matcher = xgr.GrammarMatcher(
        xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        ).compile_structural_tag(tag)
    )
    # spelling a marker out of ordinary text is not accepted; the special token is
    assert not matcher.accept_string("<|tool_calls_section_begin|>")
    assert matcher.accept_token(tok.convert_tokens_to_ids("<|tool_calls_section_begin|>"))


def test_forced_calls_bias_control_tokens(tok):
    parser, req, _ = tag_for(tok, "required")
    req = parser.adjust_request(req)
    biased = {int(i) for i, v in req.logit_bias.items() if v == -100.0}
    assert tok.convert_tokens_to_ids("<|tool_call_end|>") in biased
    assert tok.convert_tokens_to_ids("<think>") not in biased  # reasoning may still close
    controls = {i for i in range(len(tok)) if CONTROL_CHARS & set(tok.decode([i]))}
    assert controls and controls <= biased
    auto = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], tools=[TOOL], tool_choice="auto"
    )
    assert not parser.adjust_request(auto).logit_bias


def stream_through(parser, tok, req, text):
    """Feed `text` to the streaming parser token by token, as vLLM's serving layer does."""
    ids = tok.encode(text, add_special_tokens=False)
    deltas, prev_text = [], ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1], skip_special_tokens=False)
        d = parser.extract_tool_calls_streaming(
            prev_text, cur, cur[len(prev_text) :], ids[:i], ids[: i + 1], [ids[i]], req
        )
        deltas.append(d)
        prev_text = cur
    deltas.append(parser.finish_streaming())
    return [c for d in deltas if d is not None for c in d.tool_calls]


CUT = [
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "P',
]
WHOLE = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "P"}<|tool_call_end|>'
)


@pytest.mark.parametrize("text", CUT)
def test_a_call_cut_off_is_no_call(tok, text):
    """vLLM's Kimi parser made a call named `functions.` out of a header cut short."""
    parser, req, _ = tag_for(tok, "required")
    info = parser.extract_tool_calls(text, req)
    assert not info.tools_called and not info.tool_calls
    streamed = stream_through(BoundedKimiK2ToolParser(tok, req.tools), tok, req, text)
    assert all(c.function.name in (None, "get_weather") for c in streamed)


def test_closed_calls_are_kept_before_a_cut_one(tok):
    parser, req, _ = tag_for(tok, "required")
    info = parser.extract_tool_calls(WHOLE + CUT[0][len("<|tool_calls_section_begin|>") :], req)
    assert [c.function.name for c in info.tool_calls] == ["get_weather"]
    assert info.tool_calls[0].function.arguments == '{"city": "P"}'


def test_json_answers_neither_open_a_call_section_nor_end_early(tok):
    """Kimi's reasoning parser ends the reasoning at a tool-call section, which a JSON
    answer's grammar refuses (vLLM then fails the request); an end-of-turn token in the
    reasoning would end the turn with no JSON."""
    from deployments.engines.vllm.tool_parser import json_answer_bias

    bias = {int(i) for i, v in json_answer_bias(tok.get_vocab()).items() if v == -100.0}
    ids = tok.convert_tokens_to_ids
    assert {ids("<|tool_calls_section_begin|>"), ids("<|tool_call_begin|>")} <= bias
    assert ids("<|im_end|>") in bias
    assert ids("<|tool_call_end|>") not in bias and ids("</think>") not in bias
