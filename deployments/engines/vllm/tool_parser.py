"""vLLM tool parser `kimi_k2_bounded`: vLLM's Kimi K2 parser with a tighter call grammar.

vLLM constrains forced and required tool calls with xgrammar's built-in Kimi structural
tag. Five gaps in it let a model that has not learnt the format (our random-weight tiny
model; a real model gone astray) produce calls that never parse:
- the call index after `functions.NAME:` is `\\d+`: digits can run to `max_tokens`;
  Kimi numbers calls within a conversation, so three digits are plenty;
- JSON arguments allow unlimited whitespace between tokens; capped at one character;
- control tokens may appear inside JSON strings (xgrammar matches them by their text),
  and the parser ends the call at a `<|tool_call_end|>` token in mid-string. A -100
  logit bias on them keeps them out of free text, while where the grammar demands one
  it is the only token allowed and still comes out (the bias cannot veto the mask).
  xgrammar's own `excludes` would drop the schema's maxLength, so it is not used;
- xgrammar's rule for strings with minLength/maxLength admits raw control characters
  (`[^"\\\r\n]`), which strict JSON parsers reject; tokens holding a control character
  other than newline get the same bias (JSON never needs them raw);
- the envelope markers are plain strings, so the model may spell
  `<|tool_call_begin|>` out of ordinary byte tokens, which vLLM's parser (matching the
  special token ids, as the real model emits them) does not see as a call. In forced
  and required envelopes each marker must be the special token itself.
Parsing is untouched: only the grammar and the sampling bias get tighter, so forced and
required calls always yield schema-valid arguments (with `--tool-strict-level parameter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
from vllm.tool_parsers.kimi_k2_tool_parser import KimiK2ToolParser
from xgrammar.structural_tag import (
    ConstStringFormat,
    JSONSchemaFormat,
    RegexFormat,
    SequenceFormat,
    TagFormat,
    TokenFormat,
    TriggeredTagsFormat,
)

NAME = "kimi_k2_bounded"
CALL_INDEX_PATTERN = r"\d{1,3}"
MAX_JSON_WHITESPACE = 1
CALL_BEGIN = "<|tool_call_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = frozenset(
    {
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        CALL_BEGIN,
        "<|tool_call_argument_begin|>",
        CALL_END,
    }
)

# Kimi's control tokens that never belong inside a forced call's arguments. <think> and
# </think> stay free: a real model must be able to close its reasoning naturally.
BIASED_IN_FORCED_CALLS = MARKERS | {
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
}


def tighten(node: Any, token_ids: Mapping[str, int]) -> Any:
    """Return a copy of a Kimi tool-call structural tag format with the gaps closed.

    `token_ids` maps the markers to their ids (vLLM validates the grammar before it has
    a tokenizer at hand, so markers go in as ids, not strings). Auto tool choice
    (`TriggeredTagsFormat`) is left as it is: there the model decides whether to call at
    all, and its triggers are matched as text.
    """

    def token(marker: str) -> TokenFormat:
        return TokenFormat(token=token_ids[marker])

    if isinstance(node, TriggeredTagsFormat):
        return node
    if isinstance(node, RegexFormat) and node.pattern == r"\d+":
        return RegexFormat(pattern=CALL_INDEX_PATTERN)
    if isinstance(node, JSONSchemaFormat) and node.max_whitespace_cnt is None:
        return node.model_copy(update={"max_whitespace_cnt": MAX_JSON_WHITESPACE})
    if isinstance(node, ConstStringFormat) and node.value in MARKERS:
        return token(node.value)
    if (
        isinstance(node, TagFormat)
        and isinstance(node.begin, str)
        and node.begin.startswith(CALL_BEGIN)
    ):
        rest = node.begin[len(CALL_BEGIN) :]
        content = tighten(node.content, token_ids)
        if rest:  # `functions.NAME:` moves from the tag's begin into its content
            content = SequenceFormat(elements=[ConstStringFormat(value=rest), content])
        end = token(CALL_END) if node.end == CALL_END else node.end
        return node.model_copy(update={"begin": token(CALL_BEGIN), "content": content, "end": end})
    if isinstance(node, BaseModel):
        return node.model_copy(
            update={f: tighten(getattr(node, f), token_ids) for f in type(node).model_fields}
        )
    if isinstance(node, list):
        return [tighten(item, token_ids) for item in node]
    return node


# Raw characters JSON forbids inside strings; \n and \r stay (xgrammar already keeps them
# out of strings, and they serve as whitespace between JSON tokens).
CONTROL_CHARS = frozenset(chr(c) for c in range(0x20)) - {"\n", "\r"}
_control_ids_cache: dict[int, frozenset[int]] = {}


def control_token_ids(tokenizer: Any, vocab: Mapping[str, int]) -> frozenset[int]:
    """Ids of tokens whose text holds a control character, computed once per tokenizer."""
    key = id(tokenizer)
    if key not in _control_ids_cache:
        _control_ids_cache[key] = frozenset(
            i for i in vocab.values() if CONTROL_CHARS.intersection(tokenizer.decode([i]))
        )
    return _control_ids_cache[key]


def control_bias(tokenizer: Any, vocab: Mapping[str, int]) -> dict[str, float]:
    return {str(i): -100.0 for i in control_token_ids(tokenizer, vocab)}


# Tokens that end a turn: in a JSON answer's unconstrained reasoning one of them would end
# the turn with no JSON at all. Once the JSON is complete the grammar allows only them, so
# the bias cannot keep the turn from ending (as with the markers above).
TURN_ENDS = ("<|im_end|>", "[EOS]")


def json_answer_bias(vocab: Mapping[str, int]) -> dict[str, float]:
    """For a turn that must answer in JSON and has no tools to call: it may neither end
    before its JSON nor open a tool-call section (Kimi's reasoning parser ends the
    reasoning there, and the JSON grammar then refuses the section: vLLM fails the
    request)."""
    tokens = (MARKERS - {CALL_END}) | set(TURN_ENDS)
    return {str(vocab[t]): -100.0 for t in tokens if t in vocab}


def forced(tool_choice: Any) -> bool:
    return tool_choice == "required" or (
        tool_choice is not None and not isinstance(tool_choice, str)
    )


@ToolParserManager.register_module(NAME)
class BoundedKimiK2ToolParser(KimiK2ToolParser):
    def adjust_request(self, request: Any) -> Any:
        request = super().adjust_request(request)
        if request.tools and forced(request.tool_choice):
            bias = {**(request.logit_bias or {}), **control_bias(self.model_tokenizer, self.vocab)}
            for token in BIASED_IN_FORCED_CALLS:
                if token in self.vocab:
                    bias[str(self.vocab[token])] = -100.0
            request.logit_bias = bias
        return request

    def extract_tool_calls(self, model_output: str, request: Any) -> Any:
        """Only calls that were closed: vLLM's parser turns a call that `max_tokens` cut
        off (even inside `functions.NAME:IDX`) into a call of its own, with a name like
        `functions.` and `{}` for arguments, that the model never made."""
        info = super().extract_tool_calls(model_output, request)
        closed = model_output.count(CALL_END)
        if len(info.tool_calls) <= closed:
            return info
        kept = info.tool_calls[:closed]
        return info.model_copy(update={"tools_called": bool(kept), "tool_calls": kept})

    def finish_streaming(self) -> Any:
        """The same in a stream: at its end vLLM's parser flushes a call header that never
        reached `<|tool_call_argument_begin|>` as a new call; a call that starts only now
        was cut off, so it is not sent."""
        delta = super().finish_streaming()
        if delta is None or not delta.tool_calls:
            return delta
        kept = [c for c in delta.tool_calls if not (c.function and c.function.name)]
        if kept or delta.content or delta.reasoning:
            return delta.model_copy(update={"tool_calls": kept})
        return None

    def get_structural_tag(self, request: Any, **kwargs: Any) -> Any:
        tag = super().get_structural_tag(request, **kwargs)
        if tag is None:
            return None
        ids = {marker: self.vocab[marker] for marker in MARKERS}
        return tag.model_copy(update={"format": tighten(tag.format, ids)})
