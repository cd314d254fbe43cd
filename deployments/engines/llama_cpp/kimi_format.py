"""Kimi K2.5's assistant turn, as text the engine generates: a grammar that forces it and
a parser that reads it back, for engines whose own Kimi handling is not strict enough.

A turn is `<think>REASONING</think>CONTENT`, then, when it calls tools, a section:
`<|tool_calls_section_begin|>` + per call `<|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{JSON}<|tool_call_end|>` + `<|tool_calls_section_end|>`.
IDX numbers calls across the conversation (the id a later `tool` message answers).

The grammar is GBNF with token references: every marker must be the special token
itself (a model cannot spell one out of bytes), the reasoning is bounded in tokens,
names and indices are literal, and each call's arguments follow the tool's JSON schema
(rules from llama.cpp's own schema converter, see `schema_grammar.py`). The parser works
on the same token boundaries, so markers are recognised by id, never by their text.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field


class Marker(enum.Enum):
    THINK_END = "</think>"
    SECTION_BEGIN = "<|tool_calls_section_begin|>"
    SECTION_END = "<|tool_calls_section_end|>"
    CALL_BEGIN = "<|tool_call_begin|>"
    ARG_BEGIN = "<|tool_call_argument_begin|>"
    CALL_END = "<|tool_call_end|>"


# The text of every marker a generated turn may hold; engines render them as text.
MARKER_TEXTS = [m.value for m in Marker] + ["<think>"]


def gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def token_ref(marker: Marker) -> str:
    """GBNF that matches the marker's special token only (never its spelling in bytes)."""
    return marker.value


# ---- grammar ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningBound:
    """How much reasoning a constrained turn may spend: `None` tokens = no bound.
    `enabled` False: the prompt already closed the reasoning (instant mode)."""

    enabled: bool
    tokens: int | None = None

    def rule(self) -> str:
        if not self.enabled:
            return '""'
        any_token = f"!{token_ref(Marker.THINK_END)}"
        body = f"({any_token})*" if self.tokens is None else f"({any_token}){{0,{self.tokens}}}"
        return f"{body} {token_ref(Marker.THINK_END)}"


@dataclass(frozen=True)
class CallRules:
    """The calls a turn may make: to one of `callable_tools` (each with its argument rule
    from the caller's rules), 1..max_calls of them, numbered from `first_index`."""

    callable_tools: tuple[str, ...]
    schema_rules: Mapping[str, str]
    first_index: int = 0
    max_calls: int = 1

    def rules(self) -> list[str]:
        if not self.callable_tools or self.max_calls < 1:
            raise ValueError("a call section needs at least one tool and one call")
        lines = [
            f"kimi-section ::= {token_ref(Marker.SECTION_BEGIN)} kimi-calls-0 "
            f"{token_ref(Marker.SECTION_END)}"
        ]
        for k in range(self.max_calls):
            index = self.first_index + k
            choices = " | ".join(
                f"{gbnf_literal(f'functions.{name}:{index}')} {token_ref(Marker.ARG_BEGIN)} "
                f"{self.schema_rules[name]}"
                for name in self.callable_tools
            )
            lines.append(
                f"kimi-call-{k} ::= {token_ref(Marker.CALL_BEGIN)} ( {choices} ) "
                f"{token_ref(Marker.CALL_END)}"
            )
            more = f" kimi-calls-{k + 1}?" if k + 1 < self.max_calls else ""
            lines.append(f"kimi-calls-{k} ::= kimi-call-{k}{more}")
        return lines


def turn_grammar(
    reasoning: ReasoningBound,
    calls: CallRules | None = None,
    forced: bool = False,
    answer_rule: str | None = None,
) -> str:
    """Root rules of one assistant turn after the prompt's `<think>`: reasoning within its
    bound, then
    - a forced call: the call section at once, no free text before it;
    - calls the model may make: free text (or the JSON answer) or the call section;
    - a JSON answer alone: one value matching `answer_rule`;
    - neither: free text (the reasoning's bound is the point)."""
    if calls is None:
        body = "kimi-text" if answer_rule is None else answer_rule
    elif forced:
        body = "kimi-section"
    elif answer_rule is not None:
        body = f"( {answer_rule} | kimi-section )"
    else:
        body = "kimi-text kimi-section?"
    lines = [f"root ::= kimi-think {body}", f"kimi-think ::= {reasoning.rule()}"]
    if calls is not None:
        lines += calls.rules()
    if body.startswith("kimi-text"):
        # any token but the section's opening one; other markers here are text to the
        # parser, so a call can only come from the schema-bound section
        lines.append(f"kimi-text ::= (!{token_ref(Marker.SECTION_BEGIN)})*")
    return "\n".join(lines) + "\n"


# ---- parser -------------------------------------------------------------------------


@dataclass
class ParsedCall:
    position: int  # 0.. within this turn (the OpenAI `index`)
    id: str  # functions.NAME:IDX
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class Delta:
    """What one step of generation added to the turn."""

    reasoning: str = ""
    content: str = ""
    started: ParsedCall | None = None  # a call whose name and id are now known
    arguments: str = ""  # argument text added to `call`
    call: ParsedCall | None = None

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.started or self.arguments)


class _State(enum.Enum):
    REASONING = 1
    CONTENT = 2
    SECTION = 3
    CALL_HEADER = 4
    ARGUMENTS = 5
    DONE = 6  # after the section: the turn is over


def call_name(header: str) -> str:
    """`functions.get_weather:3` -> `get_weather` (Kimi's call id holds the name)."""
    name = header.strip()
    name = name.removeprefix("functions.")
    head, sep, tail = name.rpartition(":")
    return head if sep and tail.isdigit() else name


@dataclass
class KimiTurnParser:
    """Reads a generated turn piece by piece; each piece is one token's text and whether
    that token was a marker. Unfinished calls stay `complete=False`."""

    reasoning_open: bool
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _state: _State = _State.CONTENT
    _header: str = ""

    def __post_init__(self) -> None:
        self._state = _State.REASONING if self.reasoning_open else _State.CONTENT

    def feed(self, text: str, marker: Marker | None) -> Delta:
        if marker is not None:
            return self._marker(marker)
        state = self._state
        if state is _State.REASONING:
            self.reasoning += text
            return Delta(reasoning=text)
        if state is _State.CONTENT:
            self.content += text
            return Delta(content=text)
        if state is _State.CALL_HEADER:
            self._header += text
        elif state is _State.ARGUMENTS:
            call = self.calls[-1]
            call.arguments += text
            return Delta(arguments=text, call=call)
        return Delta()  # whitespace between calls carries nothing

    def _marker(self, marker: Marker) -> Delta:
        """Markers act only where the turn's grammar places them; elsewhere (a section
        marker inside the reasoning, a call marker outside a section) they are text,
        so every call reported came from the schema-bound section."""
        state = self._state
        if state is _State.REASONING and marker is Marker.THINK_END:
            self._state = _State.CONTENT
        elif state is _State.CONTENT and marker is Marker.SECTION_BEGIN:
            self._state = _State.SECTION
        elif state is _State.SECTION and marker is Marker.CALL_BEGIN:
            self._state, self._header = _State.CALL_HEADER, ""
        elif state is _State.SECTION and marker is Marker.SECTION_END:
            self._state = _State.DONE
        elif state is _State.CALL_HEADER and marker is Marker.ARG_BEGIN:
            header = self._header.strip()
            call = ParsedCall(position=len(self.calls), id=header, name=call_name(header))
            self.calls.append(call)
            self._state = _State.ARGUMENTS
            return Delta(started=call, call=call)
        elif state is _State.ARGUMENTS and marker is Marker.CALL_END:
            self.calls[-1].complete = True
            self._state = _State.SECTION
        elif state in (_State.REASONING, _State.CONTENT):
            return self.feed(marker.value, None)
        return Delta()

    @property
    def complete_calls(self) -> list[ParsedCall]:
        return [c for c in self.calls if c.complete]

    @property
    def call_open(self) -> bool:
        return any(not c.complete for c in self.calls) or self._state is _State.CALL_HEADER
