"""Tool calls and JSON answers on llama.cpp tiers, as strict as on vLLM.

llama-server's own Kimi handler lets free text come before a forced call (a model that
never writes the section marker never calls), numbers calls with unbounded digits and
ignores `response_format` altogether. So a request that offers tools (unless
`tool_choice` is `none`) or asks for JSON (`response_format` `json_object` /
`json_schema`) does not go to its chat endpoint. Instead:
1. the prompt is rendered by llama-server's own template (`/apply-template`: the same
   prompt its chat endpoint would build, all offered tools declared);
2. generation runs on `/completion` with our grammar (`kimi_format`): where an answer
   must come (a forced call, JSON) reasoning bounded to a budget fitted inside
   `max_tokens`, then at once the call section or the JSON; otherwise free text or the
   call section; every marker the special token itself, names, call ids and arguments
   fixed by grammar;
3. the streamed tokens are parsed back (`KimiTurnParser`) into OpenAI chat chunks, or
   gathered into one chat completion: one generation path for both, so a streamed and a
   non-streamed answer carry the same calls.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.engines.image_tokens import is_image_part
from deployments.engines.llama_cpp.kimi_format import (
    MARKER_TEXTS,
    CallRules,
    KimiTurnParser,
    Marker,
    ReasoningBound,
    turn_grammar,
)
from deployments.engines.llama_cpp.schema_grammar import SchemaGrammar, SchemaNotSupported
from deployments.engines.openai_shape import (
    ANY_OBJECT,
    answer_schema,
    call_forced,
    calls_offered,
    output_limit,
    reasoning_budget,
    thinking_on,
)
from deployments.protocol import EngineError, mid_answer_error
from deployments.spec import TierSpec

# Calls one forced turn may make with parallel_tool_calls (each is one grammar rule).
MAX_PARALLEL_CALLS = 8

# OpenAI sampling fields and their `/completion` names.
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repeat_penalty",
    "logit_bias": "logit_bias",
    "stop": "stop",
}


@dataclass(frozen=True)
class Constraint:
    """What the grammar enforces for one request."""

    reasoning: ReasoningBound
    callable_tools: tuple[str, ...] = ()  # calls may go to these (none: no calls)
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_index: int = 0
    max_calls: int = 1
    forced: bool = False  # tool_choice required or named: a call must come, at once
    named: bool = False  # tool_choice named one function (OpenAI then says `stop`)
    answer_schema: dict[str, Any] | None = None  # content must be JSON of this schema

    async def grammar(self, schemas: SchemaGrammar) -> str:
        wanted = {f"args-{i}": self.parameters[n] for i, n in enumerate(self.callable_tools)}
        if self.answer_schema is not None:
            wanted["answer"] = self.answer_schema
        rules = await schemas.rules(wanted)
        calls = None
        if self.callable_tools:
            by_tool = {n: rules.rules[f"args-{i}"] for i, n in enumerate(self.callable_tools)}
            calls = CallRules(self.callable_tools, by_tool, self.first_index, self.max_calls)
        root = turn_grammar(self.reasoning, calls, self.forced, rules.rules.get("answer"))
        return root + rules.grammar


def constraint_for(body: dict[str, Any], spec: TierSpec) -> Constraint | None:
    """The constraint a request needs, or None for llama-server's own chat path (no
    tools, no JSON answer and no thinking budget)."""
    answer = answer_schema(body)
    calling, forced = calls_offered(body), call_forced(body)
    asked = body.get("thinking_token_budget") if thinking_on(body) else None
    if not calling and answer is None and asked is None:
        return None
    reasoning = ReasoningBound(enabled=thinking_on(body), tokens=reasoning_budget(body, spec))
    if not calling:
        return Constraint(reasoning=reasoning, answer_schema=answer)
    offered = [t["function"] for t in body["tools"]]
    choice = body.get("tool_choice")
    named = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    return Constraint(
        reasoning=reasoning,
        callable_tools=tuple(f["name"] for f in offered if named in (None, f["name"])),
        parameters={f["name"]: f.get("parameters") or ANY_OBJECT for f in offered},
        first_index=calls_in_history(body.get("messages") or []),
        # a named choice is one call of that function, as on OpenAI and vLLM
        max_calls=1 if named or body.get("parallel_tool_calls") is False else MAX_PARALLEL_CALLS,
        forced=forced,
        named=named is not None,
        answer_schema=answer,
    )


def calls_in_history(messages: list[dict[str, Any]]) -> int:
    """Kimi numbers tool calls across the conversation; the next call takes this index."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def unsupported(body: dict[str, Any]) -> EngineError | None:
    """Fields the constrained path cannot honour: refused, never silently dropped."""
    if body.get("logprobs"):
        return EngineError(
            status_code=400,
            message="logprobs is not supported with tools or JSON answers on this tier",
            param="logprobs",
        )
    if (body.get("n") or 1) > 1:
        return EngineError(
            status_code=400,
            message="n > 1 is not supported with tools or JSON answers on this tier",
            param="n",
        )
    return None


def schema_error(exc: SchemaNotSupported, constraint: Constraint) -> EngineError:
    param = "response_format.json_schema.schema" if constraint.answer_schema else "tools"
    return EngineError(
        status_code=400,
        message=f"this tier cannot enforce the JSON schema: {exc}",
        param=param,
    )


def image_data(body: dict[str, Any]) -> list[str]:
    """The base64 data of the chat's images in prompt order (the router hands every image
    on as a data: URL), for `/completion`'s `multimodal_data`."""
    return [
        part["image_url"]["url"].partition(",")[2]
        for message in body.get("messages") or ()
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if is_image_part(part)
    ]


def completion_body(body: dict[str, Any], prompt: str, grammar: str) -> dict[str, Any]:
    images = image_data(body)
    out: dict[str, Any] = {
        # the rendered prompt holds llama-server's media marker where each image goes
        "prompt": {"prompt_string": prompt, "multimodal_data": images} if images else prompt,
        "grammar": grammar,
        "stream": True,
        "return_tokens": True,  # markers are told apart from their spelling by token
        "preserved_tokens": MARKER_TEXTS,  # rendered as text, so the parser sees them
        "cache_prompt": True,
        "n_predict": output_limit(body) or -1,
    }
    for name, target in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            out[target] = body[name]
    return out


MARKERS_BY_TEXT = {m.value: m for m in Marker}


def pieces(event: dict[str, Any]) -> list[tuple[str, Marker | None]]:
    """One `/completion` stream event as (text, marker) pieces. An event is one token,
    except where llama-server held back an incomplete UTF-8 character: the next event
    carries the held text too (U+FFFD when a marker follows it, which cannot complete
    it). A marker is only ever a single special token, so a one-token event that ends
    in a marker's text is that marker after any held text."""
    text, tokens = event.get("content") or "", event.get("tokens") or []
    if len(tokens) == 1 and text.endswith(">"):
        for spelled, marker in MARKERS_BY_TEXT.items():
            if text.endswith(spelled):
                held = text[: -len(spelled)]
                return [(held, None), (spelled, marker)] if held else [(spelled, marker)]
    return [(text, None)] if text else []


@dataclass
class TurnWriter:
    """OpenAI chat chunks and completions from the parser's deltas."""

    model: str
    stream: bool
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _object(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            **fields,
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self._object("chat.completion.chunk", choices=[choice])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return self._object("chat.completion.chunk", choices=[], usage=usage)

    def completion(
        self, parser: KimiTurnParser, finish_reason: str, usage: dict[str, Any]
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": parser.content or None}
        if parser.reasoning:
            message["reasoning_content"] = parser.reasoning
        calls = parser.complete_calls
        if calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        return self._object("chat.completion", choices=[choice], usage=usage)


def delta_dict(delta: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.started is not None:
        call = delta.started
        out["tool_calls"] = [
            {
                "index": call.position,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        ]
    elif delta.arguments:
        out["tool_calls"] = [
            {"index": delta.call.position, "function": {"arguments": delta.arguments}}
        ]
    return out


def finish_reason(stop_type: str | None, parser: KimiTurnParser, named: bool) -> str:
    """As OpenAI (and vLLM) say it: `limit` -> length (the calls completed before it are
    kept); calls the model chose (`required`) -> tool_calls; a named call -> stop."""
    if stop_type == "limit" or parser.call_open:
        return "length"
    return "tool_calls" if parser.complete_calls and not named else "stop"


def usage_of(final: dict[str, Any], reasoning: int) -> dict[str, Any]:
    prompt = int(final.get("tokens_evaluated") or 0)
    completion = int(final.get("tokens_predicted") or 0)
    cached = int((final.get("timings") or {}).get("cache_n") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


async def turn_outputs(
    events: AsyncIterator[dict[str, Any]], writer: TurnWriter, constraint: Constraint
) -> AsyncIterator[str | dict[str, Any]]:
    """`/completion` stream events in, chat chunks (SSE) or one completion dict out."""
    parser = KimiTurnParser(reasoning_open=constraint.reasoning.enabled)
    named = constraint.named
    final: dict[str, Any] = {}
    reasoning = 0  # tokens of the reasoning (not its closing marker), as vLLM counts them
    if writer.stream:
        yield sse(writer.chunk({"role": "assistant", "content": None}))
    async for event in events:
        if isinstance(event.get("error"), dict):  # e.g. its grammar refused a sampled token:
            yield mid_answer_error(event["error"])  # an error, never a quiet `stop`
            return
        thought = False
        for text, marker in pieces(event):
            delta = parser.feed(text, marker)
            thought = thought or bool(delta.reasoning)
            if delta and writer.stream:
                yield sse(writer.chunk(delta_dict(delta)))
        if thought:
            reasoning += len(event.get("tokens") or ()) or 1
        if event.get("stop"):
            final = event
    reason = finish_reason(final.get("stop_type"), parser, named)
    usage = usage_of(final, reasoning)
    if not writer.stream:
        yield writer.completion(parser, reason, usage)
        return
    yield sse(writer.chunk({}, reason))
    if writer.include_usage:
        yield sse(writer.usage_chunk(usage))
    yield "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
