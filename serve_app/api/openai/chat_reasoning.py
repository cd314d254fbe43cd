"""Chat completions in thinking mode with tools: the reasoning a client dropped from its
history comes back from the gateway's per-key memory, and the reasoning of each answer
that calls tools is remembered for the turn that sends the results back.
(`serve_app/reasoning/memory.py` says how turns are recognised and bounded.)"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from deployments.engines.openai_shape import thinking_on
from serve_app.actors import ActorUnavailable
from serve_app.gateway.protocol import ReasoningKeeper
from serve_app.pipeline.relay import DONE
from serve_app.pipeline.request import Completed, Inbound, Result
from serve_app.reasoning.memory import fingerprint, history, unreasoned_turns

log = logging.getLogger("serve_app.api.openai.chat_reasoning")

# How long an answer's end waits for its reasoning to be kept. A client may send its next
# turn as soon as it reads the answer, so the reasoning is kept before the answer ends; a
# gateway that is restarting gets the call later, without holding the answer longer.
REMEMBER_WAIT_S = 2.0


class ChatReasoning:
    def __init__(self, memory: ReasoningKeeper) -> None:
        self.memory = memory

    async def restore(self, inbound: Inbound, key_id: str) -> int:
        """Fill in the reasoning of the history's tool-call turns that came without it;
        how many were found."""
        if not thinking_on(inbound.body):
            return 0
        messages = inbound.body["messages"]
        wanted = unreasoned_turns(messages)
        if not wanted:
            return 0
        try:
            found = await self.memory.recall(key_id, list(wanted))
        except ActorUnavailable as exc:  # the answer goes on without it, as it would have
            log.warning("reasoning not recalled: %s", exc)
            return 0
        for turn, reasoning in found.items():
            messages[wanted[turn]]["reasoning_content"] = reasoning
        return len(found)

    @staticmethod
    def remembers(inbound: Inbound) -> bool:
        """Only answers that may call tools in thinking mode have reasoning to keep."""
        return thinking_on(inbound.body) and bool(inbound.body.get("tools"))

    def prefix(self, inbound: Inbound) -> list[list[Any]]:
        """The history an answer will be remembered under, read before the pipeline runs."""
        return history(inbound.body["messages"]) if self.remembers(inbound) else []

    async def remembering(
        self, inbound: Inbound, prefix: list[list[Any]], key_id: str, result: Result
    ) -> Result:
        """The answer, its reasoning remembered under `prefix` if it calls tools in
        thinking mode: a plain answer's before it is returned, a stream's before its
        `[DONE]`."""
        if not self.remembers(inbound):
            return result
        if isinstance(result, Completed):
            choices = result.body.get("choices") or [{}]
            answer = choices[0].get("message") or {}
            calls, reasoning = answer.get("tool_calls"), answer.get("reasoning_content")
            await self._remember(key_id, prefix, calls, reasoning)
            return result
        result.events = self._watched(result.events, prefix, key_id)
        return result

    async def _watched(
        self, events: AsyncIterator[str], prefix: list[list[Any]], key_id: str
    ) -> AsyncIterator[str]:
        answer, kept = StreamedAnswer(), False
        async for event in events:
            answer.add(event)
            if answer.done and not kept:
                kept = True
                await self._remember(key_id, prefix, answer.tool_calls(), answer.reasoning)
            yield event
        if not kept:  # a stream that ended without its `[DONE]`
            await self._remember(key_id, prefix, answer.tool_calls(), answer.reasoning)

    async def _remember(
        self,
        key_id: str,
        prefix: list[list[Any]],
        calls: list[dict[str, Any]] | None,
        reasoning: str | None,
    ) -> None:
        """Keep the reasoning of a turn that called tools, waiting `REMEMBER_WAIT_S` at
        most; a call still running then finishes (or logs its failure) on its own."""
        if not (calls and reasoning):
            return
        turn = fingerprint(prefix, calls)
        task = asyncio.get_running_loop().create_task(self.memory.remember(key_id, turn, reasoning))
        task.add_done_callback(_logged)
        await asyncio.wait({task}, timeout=REMEMBER_WAIT_S)


def _logged(task: Any) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("reasoning not remembered: %r", exc)


class StreamedAnswer:
    """The reasoning and tool calls of a chat-completion chunk stream, as they pass."""

    def __init__(self) -> None:
        self.reasoning = ""
        self.calls: dict[int, dict[str, Any]] = {}
        self.done = False  # its `[DONE]` has passed

    def add(self, event: str) -> None:
        for line in event.splitlines():
            self.done = self.done or line == DONE
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices") or ():
                self._delta(choice.get("delta") or {})

    def _delta(self, delta: dict[str, Any]) -> None:
        self.reasoning += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls") or ():
            slot = self.calls.setdefault(
                call.get("index", 0), {"id": None, "function": {"name": "", "arguments": ""}}
            )
            slot["id"] = call.get("id") or slot["id"]
            fn = call.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""

    def tool_calls(self) -> list[dict[str, Any]]:
        return [self.calls[i] for i in sorted(self.calls)]
