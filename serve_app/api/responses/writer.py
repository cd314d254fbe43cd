"""The Response object and its typed event stream, written from the chat answer or its
chunks (`ResponseWriter`): output items, usage, reasoning (sealed when asked), status."""

from __future__ import annotations

import time
from typing import Any

from serve_app.api.responses.protocol import (
    ResponsesRequest,
)
from serve_app.api.responses.to_chat import new_id
from serve_app.reasoning.sealing import Sealer

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

    def served(self, headers: dict[str, str]) -> None:
        """What the pipeline's answer says of how it was served, into the Response: the
        band (`service_tier`: what was served, not what was asked)."""
        if band := headers.get("x-kimi-service-tier"):
            self.doc["service_tier"] = band

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
