"""Every tier keeps one contract: forced tool calls and JSON schemas, through the real
router and the real engines (vLLM premium, llama.cpp standard and budget), with the
official `openai` SDK. Schemas are bounded: a random-weight model never closes an
unbounded string."""

from __future__ import annotations

import json

import jsonschema
import pytest

from serve_app.api.openai.measured import RESULTS
from tests.integration.tiny_vocab import half_character_token

pytestmark = pytest.mark.integration

TIERS = ["premium", "standard", "budget"]
MEASURED = json.loads(RESULTS.read_text())  # benchmarks/results/tool_calls.json, committed
USER = [{"role": "user", "content": "What's the weather in Paris this week?"}]


def tool(name: str, properties: dict, description: str | None = None) -> dict:
    """A function tool whose every property is required and nothing else allowed."""
    parameters = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    function = {"name": name, "parameters": parameters}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


WEATHER = tool(
    "get_weather",
    {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "Forecast for a city",
)
# Small enough that its whole call fits in 64 tokens of this model's byte-level tokens.
DIGIT = tool("f", {"n": {"type": "integer", "minimum": 0, "maximum": 9}})
SIDE = tool("g", {"s": {"type": "string", "enum": ["a", "b"]}})
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, DIGIT, SIDE)}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
    },
    "required": ["name", "population"],
    "additionalProperties": False,
}


def thinking(on: bool) -> dict:
    return {"chat_template_kwargs": {"thinking": on}}


def streamed(stream) -> tuple[list[dict], str | None, str]:
    """Calls assembled from a stream as clients do (by index), its finish reason, and
    checks of the delta shape: id and name once per call, then argument fragments."""
    calls: dict[int, dict] = {}
    reason, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        reason = choice.finish_reason or reason
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name, "a call's first delta names it"
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert not d.id and not d.function.name, "id and name come once"
            calls[d.index]["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], reason, content


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def plain(message) -> list[dict]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]


def assert_valid(calls: list[dict], names: set[str]) -> None:
    assert calls, "a forced call must come"
    for call in calls:
        assert call["name"] in names
        assert call["id"].startswith(f"functions.{call['name']}:")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("think", [True, False])
@pytest.mark.parametrize("choice", ["named", "required"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_matches_schema(client, tier, think, choice, stream):
    tool_choice = NAMED if choice == "named" else "required"
    kwargs = dict(
        model=f"kimi-k2.5:{tier}",
        messages=USER,
        tools=[WEATHER, SIDE],
        tool_choice=tool_choice,
        max_tokens=400,
        extra_body=thinking(think),
    )
    if stream:
        chunks = list(
            client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs
            )
        )
        calls, reason, _ = streamed(chunks)
        used = chunks[-1].usage.completion_tokens
        if reason == "length" and calls and not parses(calls[-1]["arguments"]):
            calls = calls[:-1]  # OpenAI's deltas mark no call's end: `length` cut the last
    else:
        r = client.chat.completions.create(**kwargs)
        calls, reason = plain(r.choices[0].message), r.choices[0].finish_reason
        used = r.usage.completion_tokens
    assert_valid(calls, {"get_weather"} if choice == "named" else {"get_weather", "g"})
    if choice == "named":
        assert len(calls) == 1 and reason == "stop"  # one call, and `stop` as OpenAI says it
    else:  # several calls may come; `length` only when they used every token
        assert reason == "tool_calls" or (reason == "length" and used == 400), (reason, used)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("think", [True, False])
def test_json_schema_response_format(client, tier, think):
    r = client.chat.completions.create(
        model=f"kimi-k2.5:{tier}",
        messages=[{"role": "user", "content": "The largest city of France, as JSON."}],
        max_tokens=120,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, "strict": True},
        },
        extra_body=thinking(think),
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("tier", TIERS)
def test_json_object_response_format(client, tier):
    """Any JSON object; the schema-less grammar lets strings run on, so this only asks
    that what comes is a JSON object prefix or a whole object."""
    r = client.chat.completions.create(
        model=f"kimi-k2.5:{tier}",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=60,
        response_format={"type": "json_object"},
        extra_body=thinking(False),
    )
    content = r.choices[0].message.content
    assert content.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("tier", TIERS)
def test_forced_call_with_thinking_fits_in_64_tokens(client, tier):
    """The thinking budget is fitted inside max_tokens: reasoning, then the call."""
    r = client.chat.completions.create(
        model=f"kimi-k2.5:{tier}",
        messages=USER,
        tools=[DIGIT],
        tool_choice={"type": "function", "function": {"name": "f"}},
        max_tokens=64,
        extra_body=thinking(True),
    )
    msg = r.choices[0].message
    assert (msg.model_extra or {}).get("reasoning_content"), "it reasoned first"
    assert_valid(plain(msg), {"f"})
    assert r.choices[0].finish_reason == "stop"  # a named call, as OpenAI says it
    assert r.usage.completion_tokens <= 64


def forced_runs(client, tier: str, parallel: bool | None, seeds: range):
    for seed in seeds:
        extra = {**thinking(False), "temperature": 1.0}
        if parallel is not None:
            extra["parallel_tool_calls"] = parallel
        r = client.chat.completions.create(
            model=f"kimi-k2.5:{tier}",
            messages=USER,
            tools=[DIGIT, SIDE],
            tool_choice="required",
            max_tokens=300,
            seed=seed,
            extra_body=extra,
        )
        yield r


@pytest.mark.parametrize("tier", TIERS)
def test_several_calls_in_one_turn(client, tier):
    """parallel_tool_calls (the default) lets a turn make several calls, each parsed and
    with its own id. Sampled with seeds until one turn holds two calls."""
    for r in forced_runs(client, tier, None, range(40)):
        calls = plain(r.choices[0].message)
        assert_valid(calls, {"f", "g"})
        if len(calls) >= 2:
            assert len({c["id"] for c in calls}) == len(calls)
            assert r.choices[0].finish_reason == "tool_calls"
            return
    pytest.fail("no turn made two calls in 40 seeded tries")


@pytest.mark.parametrize("tier", TIERS)
def test_parallel_tool_calls_false_gives_one_call(client, tier):
    for r in forced_runs(client, tier, False, range(8)):
        calls = plain(r.choices[0].message)
        assert_valid(calls, {"f", "g"})
        assert len(calls) == 1


@pytest.mark.parametrize("tier", TIERS)
def test_call_cut_off_by_max_tokens(client, tier):
    """A call that max_tokens cuts off is not returned as a call, and the answer says
    `length`, streamed and not alike."""
    kwargs = dict(
        model=f"kimi-k2.5:{tier}",
        messages=USER,
        tools=[WEATHER],
        tool_choice=NAMED,
        max_tokens=12,  # less than `functions.get_weather:0` in this model's tokens
        temperature=0,
        extra_body=thinking(False),
    )
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "length"
    assert not r.choices[0].message.tool_calls
    calls, reason, _ = streamed(client.chat.completions.create(stream=True, **kwargs))
    assert reason == "length"
    for call in calls:  # at most the start of the cut call, under its real name
        assert call["name"] == "get_weather" and not call["arguments"].endswith("}")


@pytest.mark.parametrize("tier", TIERS)
def test_streamed_and_plain_answers_agree(client, tier):
    """The same greedy answer, as JSON and as a stream. A warm-up first, so both start
    from the engine's cached prompt: a prompt computed afresh or from the cache differs in
    the last bits, enough to flip a near-tie of the random model's flat logits."""
    kwargs = dict(
        model=f"kimi-k2.5:{tier}",
        messages=USER,
        tools=[WEATHER, SIDE],
        tool_choice="required",
        max_tokens=300,
        temperature=0,
        extra_body=thinking(False),
    )
    client.chat.completions.create(**kwargs)
    r = client.chat.completions.create(**kwargs)
    stream = list(client.chat.completions.create(stream=True, **kwargs))
    calls, reason, _ = streamed(stream)
    whole = plain(r.choices[0].message)
    if reason == "length" and len(calls) == len(whole) + 1:
        # OpenAI's deltas mark no call's end: `length` cut the last before its end token
        # (its arguments may be cut too, or be complete JSON), and the plain answer keeps
        # ended calls only
        calls = calls[:-1]
    assert calls == whole
    assert reason == r.choices[0].finish_reason
    # several calls may come; `length` only when they used every token
    assert reason == "tool_calls" or r.usage.completion_tokens == 300, (reason, r.usage)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_spent_mid_character_still_ends_and_calls(client, tier, stream):
    """A one-token thinking budget spent on half a character (`logit_bias` steers the
    sampler at such a token): the reasoning still ends where the budget says, the held
    byte comes back as reasoning text, and the forced call follows."""
    kwargs = dict(
        model=f"kimi-k2.5:{tier}",
        messages=USER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # the steered model would call again and again
        max_tokens=200,
        logit_bias={str(half_character_token()): 100},
        extra_body={**thinking(True), "thinking_token_budget": 1},
    )
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        calls, reason, _ = streamed(chunks)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    else:
        r = client.chat.completions.create(**kwargs)
        calls, reason = plain(r.choices[0].message), r.choices[0].finish_reason
        reasoning = (r.choices[0].message.model_extra or {}).get("reasoning_content")
    assert reasoning == " \ufffd", reasoning
    assert_valid(calls, {"get_weather"})
    assert reason == "tool_calls"


def test_models_show_quantization_and_measured_accuracy(client):
    """/v1/models lists what each tier delivers, and the committed benchmark's figures
    (benchmarks/results/tool_calls.json) for the artifact it serves."""
    models = {m.id: m.model_extra for m in client.models.list()}
    for tier, quant in {"premium": "bfloat16", "standard": "Q4_K_M", "budget": "Q2_K"}.items():
        entry = models[f"kimi-k2.5:{tier}"]
        assert entry["quantization"] == quant
        assert entry["capabilities"]["tools"] and entry["capabilities"]["json_schema"]
        committed = next(t for t in MEASURED["tiers"] if t["tier"] == tier)
        for figure in ("forced_call_schema_valid", "json_schema_valid"):
            assert entry["measured"][figure] == committed[figure]["rate"], entry["measured"]
        assert entry["measured"]["forced_call_schema_valid"] == 1.0, entry["measured"]


@pytest.mark.parametrize("tier", TIERS)
def test_langchain_forced_tools_and_structured_output(serve_url, tier):
    """LangChain (langchain-openai), a client nobody here wrote: a forced tool through
    bind_tools and structured output by json_schema and by function calling."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=f"kimi-k2.5:{tier}",
        base_url=f"{serve_url}/v1",
        api_key="unused",
        max_tokens=300,
        max_retries=0,
        extra_body=thinking(False),
    )
    question = "What's the weather in Paris this week?"
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(question)
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(msg.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    city_schema = {"title": "city", "description": "A city", **CITY}
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(city_schema, method=method).invoke("France's largest city")
        jsonschema.validate(out, CITY)
