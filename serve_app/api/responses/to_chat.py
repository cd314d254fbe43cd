"""A Responses API request as the canonical OpenAI chat request, pure.

Input items (and the stored items of earlier turns) become chat messages: a
`reasoning` item becomes the `reasoning_content` of the assistant turn after it (K2.5
wants its own reasoning back in tool-call histories), `function_call` items the tool calls
of that turn, `function_call_output` items tool messages. The answer goes back through
`writer.py`.

Function call ids are the engine's (`functions.get_weather:0`, the form K2.5 was trained
on): clients send them back as they got them, so the model sees its own ids.
"""

from __future__ import annotations

import uuid
from typing import Any

from serve_app.api.responses.protocol import (
    InputFile,
    InputImage,
    InputText,
    Item,
    OutputText,
    Refusal,
    ResponsesRequest,
    in_namespace,
)
from serve_app.errors import APIError
from serve_app.reasoning.sealing import Sealer
from serve_app.reasoning.thinking import effort_budget, thinking_fields


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- input items -----------------------------------------------------------------------


def input_items(given: str | list[Item] | None, param: str = "input") -> list[dict[str, Any]]:
    """A request's input (or a conversation's new items) as stored items, each with an id
    (for `input_items` and item listings); refusals name `param`, the field they came in."""
    if given is None:
        return []
    if isinstance(given, str):
        return [stored_item({"type": "message", "role": "user", "content": given})]
    out: list[dict[str, Any]] = []
    for item in given:
        if item.type == "item_reference":
            raise APIError(400, "item_reference inputs are not supported", param=param)
        out.append(stored_item(item.model_dump(mode="json", exclude_none=True)))
    ids = [i["id"] for i in out]
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise APIError(400, f"two items have the id {dup!r}; item ids must be unique", param=param)
    return out


def stored_item(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as the API lists it back: an id, a status, a message's content as
    parts."""
    kind = item.get("type", "message")
    out = {"type": kind, **item, "id": item.get("id") or new_id(ID_PREFIX[kind])}
    out.setdefault("status", "completed")
    if kind == "message" and isinstance(item["content"], str):
        text = item["content"]
        assistant = item["role"] == "assistant"
        part = (
            {"type": "output_text", "text": text, "annotations": []}
            if assistant
            else {
                "type": "input_text",
                "text": text,
            }
        )
        out["content"] = [part]
    return out


ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


def chat_messages(items: list[dict[str, Any]], sealer: Sealer) -> list[dict[str, Any]]:
    """Stored items (input and output, oldest first) as chat messages."""
    out: list[dict[str, Any]] = []
    thought: list[str] = []  # reasoning waiting for the assistant turn it belongs to
    for n, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "reasoning":
            thought.append(reasoning_text(item, sealer))
        elif kind == "function_call":
            turn = out[-1] if out and out[-1]["role"] == "assistant" and not thought else None
            if turn is None:
                turn = assistant_turn("", thought)
                out.append(turn)
            name = item["name"]
            if space := item.get("namespace"):
                name = in_namespace(space, name)
            call = {"name": name, "arguments": item["arguments"]}
            turn.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": call}
            )
        elif kind == "function_call_output":
            content = item["output"]
            if not isinstance(content, str):
                content = chat_parts(content, f"input[{n}].output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
        elif item["role"] == "assistant":
            out.append(assistant_turn(text_of(item["content"]), thought))
        else:
            role = "user" if item["role"] == "user" else "system"
            content = item["content"]
            if not isinstance(content, str):
                content = chat_parts(content, f"input[{n}].content")
            out.append({"role": role, "content": content})
        if kind != "reasoning":
            thought = []
    return out


def assistant_turn(text: str, thought: list[str]) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning := "".join(thought):
        turn["reasoning_content"] = reasoning
    return turn


def reasoning_text(item: dict[str, Any], sealer: Sealer) -> str:
    """What a reasoning item brings back: what its `encrypted_content` seals (ours only;
    another server's or an altered one brings nothing), else its text."""
    if sealed := item.get("encrypted_content"):
        return sealer.open(sealed) or ""
    texts = item.get("content") or item.get("summary") or []
    return "".join(t.get("text", "") for t in texts)


PART_MODELS = {
    "input_text": InputText,
    "output_text": OutputText,
    "input_image": InputImage,
    "refusal": Refusal,
    "input_file": InputFile,
}


def chat_parts(parts: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            out.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and part.get("image_url"):
            out.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_image":
            raise APIError(400, "file_id images are not supported; send image_url", param=where)
        else:
            raise APIError(400, f"{where}[{i}]: {kind} parts are not supported", param=where)
    return out


def text_of(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or p.get("refusal") or "" for p in content)


# ---- the chat request ------------------------------------------------------------------


def chat_body(req: ResponsesRequest, items: list[dict[str, Any]], sealer: Sealer) -> dict:
    """The chat body for `items` (earlier turns' and this request's), under `req`'s
    instructions and settings (instructions are this request's only, never carried). A
    background response is streamed from its engine, so it can stop when cancelled."""
    messages = chat_messages(items, sealer)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    if not messages:
        raise APIError(400, "input is empty: send input, a conversation or a previous response")
    stream = req.stream or req.background
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("user", "user")):
        if (value := getattr(req, theirs)) is not None:
            body[ours] = value
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if (value := getattr(req, name)) is not None:
            body[name] = value
    functions = req.function_tools
    if functions:
        body["tools"] = [chat_tool(t.model_dump(exclude_none=True)) for t in functions]
    if req.tool_choice is not None and (functions or req.tool_choice == "required"):
        choice = req.tool_choice
        body["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    if req.text is not None and req.text.format is not None:
        body["response_format"] = response_format(req)
    if req.include and "message.output_text.logprobs" in req.include:
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    body.update(reasoning_mode(req))
    return body


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": fn}


def response_format(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format  # type: ignore[union-attr]
    assert fmt is not None
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    if fmt.name is None or fmt.schema_ is None:
        raise APIError(400, "text.format json_schema needs a name and a schema", param="text")
    schema = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def reasoning_mode(req: ResponsesRequest) -> dict[str, Any]:
    """`reasoning.effort`: none and minimal are K2.5's instant mode, the others its
    thinking with a budget; no effort is the model's default (thinking)."""
    effort = req.reasoning.effort if req.reasoning else None
    if effort is None:
        return {}
    if effort in ("none", "minimal"):
        return thinking_fields(False)
    return thinking_fields(True, effort_budget(effort, req.max_output_tokens))


# ---- the answer ------------------------------------------------------------------------
