"""Chat completions in thinking mode: a client that drops `reasoning_content` from its
history (most frameworks do) still gets K2.5's reasoning back into the next prompt, from
the gateway's per-key memory, plain or streamed, on vLLM and on llama.cpp."""

from __future__ import annotations

import openai
import pyarrow.compute as pc
import pytest

from tests.integration.conftest import flushed_usage, new_key
from tests.integration.test_agent_clis import counted, reasoning_back
from tests.integration.test_tool_contract import DIGIT, USER, thinking

pytestmark = pytest.mark.integration


def first_turn(client: openai.OpenAI, tier: str, stream: bool) -> tuple[str, dict]:
    """A forced call after some reasoning; its reasoning and the assistant message as a
    client that keeps no reasoning would send it back."""
    forced = {"type": "function", "function": {"name": "f"}}
    kwargs = {"model": f"kimi-k2.5:{tier}", "messages": USER, "tools": [DIGIT]}
    kwargs |= {"tool_choice": forced, "max_tokens": 64, "extra_body": thinking(True)}
    if not stream:
        msg = client.chat.completions.create(**kwargs).choices[0].message
        call = msg.tool_calls[0]
        reasoning = (msg.model_extra or {}).get("reasoning_content") or ""
        ids = (call.id, call.function.name, call.function.arguments)
    else:
        reasoning, ids = "", ["", "", ""]
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                for c in choice.delta.tool_calls or ():
                    ids[0] = c.id or ids[0]
                    ids[1] += (c.function and c.function.name) or ""
                    ids[2] += (c.function and c.function.arguments) or ""
    call_id, name, arguments = ids
    turn = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }
    return reasoning, turn


@pytest.mark.parametrize("tier", ["premium", "budget"])
@pytest.mark.parametrize("stream", [False, True])
def test_dropped_reasoning_comes_back_from_the_keys_memory(serve_url, admin, client, tier, stream):
    key, _ = new_key(admin, "enterprise")
    own = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0)
    reasoning, turn = first_turn(own, tier, stream)
    assert reasoning, "it reasoned before the call"
    history = [
        *USER,
        turn,
        {"role": "tool", "tool_call_id": turn["tool_calls"][0]["id"], "content": "7"},
    ]
    before = reasoning_back("openai", "memory")

    def prompt_tokens(caller: openai.OpenAI) -> int:
        r = caller.chat.completions.create(
            model=f"kimi-k2.5:{tier}",
            messages=history,
            tools=[DIGIT],
            max_tokens=1,
            extra_body=thinking(True),
        )
        return r.usage.prompt_tokens

    other, _ = new_key(admin, "enterprise")  # another key: the memory is not its to read
    without = prompt_tokens(openai.OpenAI(base_url=f"{serve_url}/v1", api_key=other))
    restored = prompt_tokens(own)
    assert restored - without >= 5, (restored, without, reasoning)
    assert counted("openai", "memory", above=before) > before


@pytest.mark.parametrize("tier", ["premium", "standard", "budget"])
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_tokens_are_counted_on_every_tier(serve_url, admin, state_dir, tier, stream):
    """A thinking answer (the random model rarely closes its reasoning: most of what it
    writes is reasoning) reports its reasoning tokens in the answer's usage and in its
    usage record, on vLLM (its own count) and on llama.cpp (ours), plain, streamed and
    under a forced call (llama.cpp's constrained path)."""
    key, key_id = new_key(admin, "enterprise")
    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0, timeout=120)
    plain = {"model": f"kimi-k2.5:{tier}", "messages": USER, "max_tokens": 24}
    forced = {
        **plain,
        "tools": [DIGIT],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    counted_usage = []
    for kwargs in (plain, {**forced, "max_tokens": 64}):
        kwargs = {**kwargs, "extra_body": thinking(True)}
        if stream:
            chunks = list(
                client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs
                )
            )
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(**kwargs).usage
        details = usage.completion_tokens_details
        assert details is not None and 0 < details.reasoning_tokens <= usage.completion_tokens
        counted_usage.append(details.reasoning_tokens)
    table = flushed_usage(admin, state_dir)
    rows = table.filter(pc.equal(table["key_id"], key_id)).to_pylist()
    assert sorted(r["reasoning_tokens"] for r in rows) == sorted(counted_usage)
