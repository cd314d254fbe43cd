"""Responses API <-> the canonical OpenAI chat shape, both ways, pure.

Requests: input items (and the stored items of earlier turns) become chat messages: a
`reasoning` item becomes the `reasoning_content` of the assistant turn after it (K2.5
wants its own reasoning back in tool-call histories), `function_call` items the tool calls
of that turn, `function_call_output` items tool messages. Answers: a chat completion or
a chunk stream becomes output items (`reasoning`, `message`, `function_call`) and the
typed stream events, written by one `ResponseWriter` either way.

Function call ids are the engine's (`functions.get_weather:0`, the form K2.5 was trained
on): clients send them back as they got them, so the model sees its own ids.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from serve_app.api.responses_models import (
    InputFile,
    InputImage,
    InputText,
    Item,
    OutputText,
    Refusal,
    ResponsesRequest,
    in_namespace,
)
from serve_app.api.thinking import effort_budget, thinking_fields
from serve_app.errors import APIError
from serve_app.sealing import Sealer


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

ECHOED = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "previous_response_id",
    "prompt_cache_key",
    "safety_identifier",
    "service_tier",
    "temperature",
    "top_logprobs",
    "top_p",
    "user",
)


def response_doc(req: ResponsesRequest, response_id: str) -> dict:
    """The Response object as it starts: the request's settings, no output yet."""
    doc: dict[str, Any] = {name: getattr(req, name) for name in ECHOED}
    doc.update(
        {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": req.model,
            "output": [],
            "error": None,
            "incomplete_details": None,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "tool_choice": dump(req.tool_choice) or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "reasoning": dump(req.reasoning) or {"effort": None, "summary": None},
            "text": dump(req.text) or {"format": {"type": "text"}},
            "truncation": req.truncation or "disabled",
            "store": req.store,
            "background": req.background,
            "conversation": {"id": req.conversation_id} if req.conversation_id else None,
            "usage": None,
        }
    )
    doc["metadata"] = req.metadata or {}
    return doc


def dump(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return value.model_dump(mode="json", by_alias=True, exclude_none=True)


def usage(openai: dict[str, Any] | None) -> dict[str, Any]:
    u = openai or {}
    prompt, completion = u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    out = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }
    if "cost" in u:
        out["cost"] = u["cost"]
    return out


class ResponseWriter:
    """Chat deltas in, output items and the Responses stream's events out. One item is
    open at a time (reasoning, message, or a function call); the next kind closes it.
    The non-streamed answer is written the same way, its events unsent."""

    def __init__(
        self,
        doc: dict[str, Any],
        sealer: Sealer,
        encrypt: bool,
        namespaced: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self.doc = doc
        self.sealer = sealer
        self.encrypt = encrypt  # reasoning items carry their sealed text
        self.namespaced = namespaced or {}  # flattened tool name -> (namespace, name)
        self.seq = 0
        self.open: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}  # the chunk's tool call index -> item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def snapshot(self, kind: str) -> dict[str, Any]:
        return self.event(kind, response=dict(self.doc, output=list(self.doc["output"])))

    def start(self, status: str = "in_progress") -> list[dict[str, Any]]:
        self.doc["status"] = status
        if status == "queued":
            return [self.snapshot("response.created"), self.snapshot("response.queued")]
        return [self.snapshot("response.created"), self.snapshot("response.in_progress")]

    # ---- deltas ----

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or ():
            out += self.delta(choice.get("delta") or choice.get("message") or {})
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        return out

    def delta(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if text := delta.get("reasoning_content"):
            out += self._text("reasoning", "response.reasoning_text.delta", text)
        if text := delta.get("content"):
            out += self._text("message", "response.output_text.delta", text)
        for position, call in enumerate(delta.get("tool_calls") or ()):
            out += self._call(call.get("index", position), call)
        return out

    def _text(self, kind: str, event: str, text: str) -> list[dict[str, Any]]:
        out = [] if self.open and self.open["type"] == kind else self._begin(kind)
        item = self.open
        assert item is not None
        item["content"][0]["text"] += text
        extra = {"logprobs": []} if kind == "message" else {}
        out.append(self.event(event, **self._where(), content_index=0, delta=text, **extra))
        return out

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.doc["output"]) - 1}

    def _begin(self, kind: str) -> list[dict[str, Any]]:
        out = self._close()
        if kind == "reasoning":
            item: dict[str, Any] = {"type": "reasoning", "id": new_id("rs"), "summary": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": new_id("msg"), "role": "assistant"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item.update(status="in_progress", content=[])
        self.doc["output"].append(item)
        self.open = item
        out.append(self.event("response.output_item.added", **self._index(), item=copy(item)))
        item["content"].append(dict(part))
        out.append(
            self.event(
                "response.content_part.added", **self._where(), content_index=0, part=dict(part)
            )
        )
        return out

    def _index(self) -> dict[str, int]:
        return {"output_index": len(self.doc["output"]) - 1}

    def _call(self, index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        fn = call.get("function") or {}
        if index not in self.calls:
            out += self._close()
            item = {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": call.get("id") or f"functions.{fn.get('name') or 'call'}:{index}",
                "name": fn.get("name") or "",
                "arguments": "",
                "status": "in_progress",
            }
            if space := self.namespaced.get(item["name"]):
                item["namespace"], item["name"] = space
            self.doc["output"].append(item)
            self.calls[index] = self.open = item
            out.append(self.event("response.output_item.added", **self._index(), item=copy(item)))
        item = self.calls[index]
        if (args := fn.get("arguments")) and item is self.open:
            item["arguments"] += args
            out.append(
                self.event("response.function_call_arguments.delta", **self._where(), delta=args)
            )
        return out

    def _close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        where = self._where_of(item)
        out = []
        if item["type"] == "function_call":
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                out.append(
                    self.event(
                        "response.reasoning_text.done", **where, content_index=0, text=part["text"]
                    )
                )
                if self.encrypt:
                    item["encrypted_content"] = self.sealer.seal(part["text"])
            else:
                out.append(
                    self.event(
                        "response.output_text.done",
                        **where,
                        content_index=0,
                        text=part["text"],
                        logprobs=[],
                    )
                )
            out.append(
                self.event("response.content_part.done", **where, content_index=0, part=dict(part))
            )
        item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
        out.append(
            self.event(
                "response.output_item.done", output_index=where["output_index"], item=copy(item)
            )
        )
        return out

    def _where_of(self, item: dict[str, Any]) -> dict[str, Any]:
        index = next(i for i, o in enumerate(self.doc["output"]) if o is item)
        return {"item_id": item["id"], "output_index": index}

    # ---- the end ----

    def finish(self) -> list[dict[str, Any]]:
        """The response's end: completed, or incomplete where the output ran out."""
        if self.ended:
            return []
        self.ended = True
        out = self._close()
        self.doc["usage"] = usage(self.usage)
        self.doc["completed_at"] = int(time.time())
        if self.finish_reason == "length":
            self.doc["status"] = "incomplete"
            self.doc["incomplete_details"] = {"reason": "max_output_tokens"}
            return [*out, self.snapshot("response.incomplete")]
        self.doc["status"] = "completed"
        return [*out, self.snapshot("response.completed")]

    def cancel(self) -> None:
        """The response's end by its cancellation: what came so far is kept."""
        if not self.ended:
            self.ended = True
            self._close()
            self.doc["status"] = "cancelled"
            if self.usage is not None:
                self.doc["usage"] = usage(self.usage)

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        """The response's end by an error: what came so far is kept."""
        if self.ended:
            return []
        self.ended = True
        out = self._close()
        self.doc["status"] = "failed"
        self.doc["error"] = {"code": code, "message": message}
        if self.usage is not None:
            self.doc["usage"] = usage(self.usage)
        return [*out, self.snapshot("response.failed")]


def copy(item: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in item.items()}
