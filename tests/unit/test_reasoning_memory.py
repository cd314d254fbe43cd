"""The per-key reasoning memory for chat-completions histories that drop reasoning."""

from __future__ import annotations

import asyncio
import json

from serve_app.api.openai.chat_reasoning import ChatReasoning, StreamedAnswer
from serve_app.reasoning.memory import ReasoningMemory, fingerprint, history, unreasoned_turns
from tests.fakes.gateway import InMemoryReasoning

CALL = {
    "id": "functions.get_weather:0",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Weather?"}]


def next_request(ask: list[dict], call: dict = CALL) -> list[dict]:
    """The next request of a client that dropped `reasoning_content`."""
    turn = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": call["id"], "content": "12 C"}
    return [*ask, turn, result]


def test_a_dropped_turn_is_found_by_its_conversation_and_calls():
    memory = ReasoningMemory()
    memory.remember("k1", fingerprint(history(ASK), [CALL]), "check Oslo first", now=0)
    # the client re-serialized the arguments and sent its text as parts: still the same turn
    resent = {**CALL, "function": {**CALL["function"], "arguments": '{"city":"Oslo"}'}}
    parts = [ASK[0], {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]
    wanted = unreasoned_turns(next_request(parts, resent))
    assert list(wanted.values()) == [2]
    assert memory.recall("k1", list(wanted), now=10) == {next(iter(wanted)): "check Oslo first"}
    # Kimi's call ids repeat: the same id in another conversation is another turn
    other = unreasoned_turns(next_request([{"role": "user", "content": "Weather in Rome?"}]))
    assert memory.recall("k1", list(other), now=10) == {}
    assert memory.recall("k2", list(wanted), now=10) == {}  # another key's: never
    assert memory.recall("k1", list(wanted), now=3601) == {}  # past the TTL


def test_the_memory_is_bounded_per_key_oldest_out_first():
    memory = ReasoningMemory(max_turns_per_key=3, max_chars_per_key=100)
    for n in range(5):
        memory.remember("k", f"t{n}", "x" * 10, now=n)
    assert set(memory.recall("k", [f"t{n}" for n in range(5)], now=5)) == {"t2", "t3", "t4"}
    memory.remember("k", "big", "y" * 95, now=6)  # the size cap pushes the rest out
    assert set(memory.recall("k", ["t2", "t3", "t4", "big"], now=6)) == {"big"}
    memory.remember("k", "huge", "z" * 101, now=7)  # larger than a key may hold: not kept
    assert memory.recall("k", ["huge"], now=7) == {}
    memory.forget("k")
    assert memory.recall("k", ["big"], now=7) == {}


def test_a_streamed_answer_gives_its_reasoning_and_calls():
    answer = StreamedAnswer()
    deltas = [
        {"reasoning_content": "check "},
        {"reasoning_content": "Oslo"},
        {"tool_calls": [{"index": 0, "id": CALL["id"], "function": {"name": "get_weather"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
    ]
    events = "".join(f"data: {json.dumps({'choices': [{'delta': d}]})}\n\n" for d in deltas)
    answer.add(events + "data: [DONE]\n\n")
    assert answer.reasoning == "check Oslo"
    assert fingerprint(history(ASK), answer.tool_calls()) == fingerprint(history(ASK), [CALL])


def test_restore_fills_the_turn_in_thinking_mode_only():
    from deployments.protocol import Endpoint
    from serve_app.canonical import ChatRequest
    from serve_app.pipeline.request import Inbound

    backend = InMemoryReasoning()
    backend.memory.remember("k", fingerprint(history(ASK), [CALL]), "check Oslo first")
    chat = ChatReasoning(backend)

    def inbound(**extra: object) -> Inbound:
        body = {"model": "kimi-k2.5", "messages": next_request(ASK), **extra}
        request = ChatRequest.model_validate(body)
        return Inbound(Endpoint.CHAT, request, body, 100, None, "r1")

    thinking = inbound()
    assert asyncio.run(chat.restore(thinking, "k")) == 1
    assert thinking.body["messages"][2]["reasoning_content"] == "check Oslo first"
    instant = inbound(chat_template_kwargs={"thinking": False})
    assert asyncio.run(chat.restore(instant, "k")) == 0
    assert "reasoning_content" not in instant.body["messages"][2]


def test_a_gateway_away_leaves_the_history_as_it_came():
    from deployments.protocol import Endpoint
    from serve_app.actors import ActorUnavailable
    from serve_app.canonical import ChatRequest
    from serve_app.pipeline.request import Inbound

    class Away(InMemoryReasoning):
        async def recall(self, key_id: str, turns: list[str]) -> dict[str, str]:
            raise ActorUnavailable("the gateway did not answer in 10 s")

    body = {"model": "kimi-k2.5", "messages": next_request(ASK)}
    inbound = Inbound(Endpoint.CHAT, ChatRequest.model_validate(body), body, 100, None, "r2")
    assert asyncio.run(ChatReasoning(Away()).restore(inbound, "k")) == 0
    assert "reasoning_content" not in inbound.body["messages"][2]


def thinking_call(stream: bool):
    """A thinking-mode request with tools (its answer's reasoning is kept)."""
    from deployments.protocol import Endpoint
    from serve_app.canonical import ChatRequest
    from serve_app.pipeline.request import Inbound

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    body = {"model": "kimi-k2.5", "messages": ASK, "tools": [tool], "stream": stream}
    return Inbound(Endpoint.CHAT, ChatRequest.model_validate(body), body, 100, None, "r3")


STREAM = [
    f"data: {json.dumps({'choices': [{'delta': {'reasoning_content': 'check Oslo'}}]})}\n\n",
    f"data: {json.dumps({'choices': [{'delta': {'tool_calls': [{'index': 0, **CALL}]}}]})}\n\n",
    "data: [DONE]\n\n",
]


def test_a_streamed_turns_reasoning_is_kept_before_its_done_goes_out():
    """A client sends its next turn as soon as it reads `[DONE]`: the reasoning must be
    there by then."""
    from serve_app.pipeline.request import Streamed

    async def events():
        for event in STREAM:
            yield event

    async def read() -> list[bool]:
        backend = InMemoryReasoning()
        chat, inbound = ChatReasoning(backend), thinking_call(stream=True)
        result = Streamed(events=events(), settlement=None, headers={})  # not read here
        result = await chat.remembering(inbound, chat.prefix(inbound), "k", result)
        turn = fingerprint(history(ASK), [CALL])
        kept_as_each_came = []
        async for _ in result.events:
            kept_as_each_came.append(bool(backend.memory.recall("k", [turn])))
        return kept_as_each_came

    assert asyncio.run(read()) == [False, False, True]


def test_a_plain_answers_reasoning_is_kept_before_it_is_returned():
    from serve_app.pipeline.request import Completed

    message = {"role": "assistant", "reasoning_content": "check Oslo", "tool_calls": [CALL]}

    async def answer() -> dict[str, str]:
        backend = InMemoryReasoning()
        chat, inbound = ChatReasoning(backend), thinking_call(stream=False)
        result = Completed(body={"choices": [{"message": message}]}, headers={})
        await chat.remembering(inbound, chat.prefix(inbound), "k", result)
        return backend.memory.recall("k", [fingerprint(history(ASK), [CALL])])

    assert list(asyncio.run(answer()).values()) == ["check Oslo"]


def test_a_slow_gateway_holds_the_answer_for_the_bound_only(monkeypatch):
    from serve_app.api.openai import chat_reasoning
    from serve_app.pipeline.request import Completed

    monkeypatch.setattr(chat_reasoning, "REMEMBER_WAIT_S", 0.05)
    message = {"role": "assistant", "reasoning_content": "check Oslo", "tool_calls": [CALL]}

    class Slow(InMemoryReasoning):
        async def remember(self, key_id: str, turn: str, reasoning: str) -> None:
            await asyncio.sleep(0.3)
            await super().remember(key_id, turn, reasoning)

    async def answer() -> tuple[dict[str, str], dict[str, str]]:
        backend = Slow()
        chat, inbound = ChatReasoning(backend), thinking_call(stream=False)
        turn = fingerprint(history(ASK), [CALL])
        result = Completed(body={"choices": [{"message": message}]}, headers={})
        await chat.remembering(inbound, chat.prefix(inbound), "k", result)
        returned = backend.memory.recall("k", [turn])  # returned before the call ended
        await asyncio.sleep(0.5)
        return returned, backend.memory.recall("k", [turn])  # which then kept it

    returned, later = asyncio.run(answer())
    assert returned == {} and list(later.values()) == ["check Oslo"]
