"""OpenAI's Responses and Conversations APIs through the real app, with the official
`openai` SDK and the OpenAI Agents SDK: plain and streamed responses, a function-tool
round trip, `previous_response_id` chains (prefix cache and cached tokens), conversations,
isolation between keys, and stored state that outlives the router replicas, the gateway
and the session store actor. On every tier: premium (vLLM), standard and budget
(llama.cpp)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import httpx
import jsonschema
import openai
import pyarrow.compute as pc
import pytest
import ray
from openai.types.shared import Reasoning
from pydantic import Field

from tests.integration.conftest import flushed_usage, new_key, wait_for

pytestmark = pytest.mark.integration

TIERS = ["premium", "standard", "budget"]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Forecast for a city",
    "parameters": CITY,
    "strict": True,
}
INSTANT = {"effort": "none"}  # K2.5's instant mode: a random model's thinking never ends


@pytest.fixture(scope="module")
def keyed(admin: httpx.Client) -> tuple[str, str]:
    return new_key(admin, "enterprise")


@pytest.fixture(scope="module")
def oai(serve_url: str, keyed: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=keyed[0], max_retries=0, timeout=300)


def records(admin: httpx.Client, state_dir, key_id: str) -> list[dict]:
    table = flushed_usage(admin, state_dir)
    return table.filter(pc.equal(table["key_id"], key_id)).to_pylist()


@pytest.mark.parametrize("tier", TIERS)
def test_a_plain_response_is_stored_and_retrievable(oai, tier):
    r = oai.responses.create(
        model=f"kimi-k2.5:{tier}", input="hello", max_output_tokens=8, reasoning=INSTANT
    )
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete") and r.model == f"kimi-k2.5:{tier}"
    assert [item.type for item in r.output] == ["message"]
    assert r.usage.input_tokens > 0 and 1 <= r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    again = oai.responses.retrieve(r.id)
    assert again.model_dump() == r.model_dump()
    [item] = oai.responses.input_items.list(r.id).data
    assert item.type == "message" and item.content[0].text == "hello"


@pytest.mark.parametrize("tier", TIERS)
def test_a_streamed_response_parses_with_the_sdks_typed_stream(oai, tier):
    events = []
    with oai.responses.stream(
        model=f"kimi-k2.5:{tier}", input="hi", max_output_tokens=10, reasoning=INSTANT
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    # the SDK's get_final_response() wants `completed`; a random model may run out first
    final = events[-1].response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    text = final.output[0].content[0].text
    assert text and final.output_text == text
    assert 1 <= final.usage.output_tokens <= 10 and final.usage.input_tokens > 0
    assert oai.responses.retrieve(final.id).output[0].content[0].text == text


@pytest.mark.parametrize("tier", TIERS)
def test_a_function_tool_round_trip(oai, tier):
    first = oai.responses.create(
        model=f"kimi-k2.5:{tier}",
        input="What's the weather in Paris this week?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=300,
        reasoning=INSTANT,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), CITY)
    second = oai.responses.create(
        model=f"kimi-k2.5:{tier}",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=8,
        reasoning=INSTANT,
    )
    # tool_choice none: no call, only text (which a random model may end at once)
    assert all(item.type == "message" for item in second.output), second.output
    assert second.status in ("completed", "incomplete")
    # the tool's answer and the call before it reached the model: the prompt grew by them
    assert second.usage.input_tokens > first.usage.input_tokens


@pytest.mark.parametrize("tier", TIERS)
def test_a_chain_of_three_turns_reuses_the_prefix(oai, admin, state_dir, keyed, tier):
    turns = []
    previous = None
    rules = "Answer briefly, in plain words, and say when you are unsure. " * 12
    for text in ("first question", "second question", "third question"):
        r = oai.responses.create(
            model=f"kimi-k2.5:{tier}",
            instructions=rules,  # a prefix longer than the engines' cache blocks
            input=text,
            previous_response_id=previous,
            max_output_tokens=6,
            reasoning=INSTANT,
        )
        turns.append(r)
        previous = r.id
    sizes = [t.usage.input_tokens for t in turns]
    assert sizes[0] < sizes[1] < sizes[2]  # each turn carries the ones before
    # the replica that served the chain kept its prefix: later turns read it from cache
    assert all(t.usage.input_tokens_details.cached_tokens > 0 for t in turns[1:])
    rows = [r for r in records(admin, state_dir, keyed[1]) if r["api"] == "responses"]
    chain = [r for r in rows if r["session_id"] == turns[0].id]
    assert len(chain) == 3  # one session, named by the chain's first response


def test_a_conversation_keeps_the_session_server_side(oai):
    conv = oai.conversations.create(
        items=[{"type": "message", "role": "user", "content": "my name is Ada"}],
        metadata={"project": "kimi"},
    )
    assert conv.id.startswith("conv_") and conv.metadata == {"project": "kimi"}
    r = oai.responses.create(
        model="kimi-k2.5:premium",
        conversation=conv.id,
        input="what is my name?",
        max_output_tokens=6,
        reasoning=INSTANT,
    )
    assert r.conversation.id == conv.id
    items = oai.conversations.items.list(conv.id, order="asc").data
    assert [i.type for i in items] == ["message", "message", "message"]
    assert [i.role for i in items] == ["user", "user", "assistant"]
    assert items[-1].id == r.output[0].id
    one = oai.conversations.items.retrieve(items[1].id, conversation_id=conv.id)
    assert one.content[0].text == "what is my name?"
    updated = oai.conversations.update(conv.id, metadata={"project": "k2"})
    assert updated.metadata == {"project": "k2"}
    oai.conversations.items.delete(items[0].id, conversation_id=conv.id)
    assert len(oai.conversations.items.list(conv.id).data) == 2
    assert oai.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.conversations.retrieve(conv.id)


def test_item_ids_are_unique_in_a_conversation_or_the_request_is_refused(oai):
    """Clients may name their items; a name used twice is their error (400), not a store
    failure (it was a 503 until the fuzzer sent one)."""
    said = {"type": "message", "role": "user", "content": "hi", "id": "msg_mine"}
    with pytest.raises(openai.BadRequestError) as twice:
        oai.conversations.create(items=[said, said])
    assert twice.value.body["param"] == "items", twice.value.body
    conv = oai.conversations.create(items=[said])
    with pytest.raises(openai.BadRequestError) as again:
        oai.conversations.items.create(conv.id, items=[said])
    assert again.value.body["code"] == "duplicate_item_id", again.value.body
    assert [i.id for i in oai.conversations.items.list(conv.id).data] == ["msg_mine"]


def test_another_key_finds_nothing_of_the_first(oai, serve_url, admin):
    r = oai.responses.create(
        model="kimi-k2.5:standard", input="mine", max_output_tokens=4, reasoning=INSTANT
    )
    conv = oai.conversations.create()
    other = openai.OpenAI(
        base_url=f"{serve_url}/v1", api_key=new_key(admin, "enterprise")[0], max_retries=0
    )
    attempts = [
        lambda: other.responses.retrieve(r.id),
        lambda: other.responses.input_items.list(r.id),
        lambda: other.responses.delete(r.id),
        lambda: other.responses.create(
            model="kimi-k2.5:standard", input="x", previous_response_id=r.id
        ),
        lambda: other.conversations.retrieve(conv.id),
        lambda: other.conversations.items.list(conv.id),
        lambda: other.responses.create(model="kimi-k2.5:standard", input="x", conversation=conv.id),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert oai.responses.retrieve(r.id).id == r.id  # still there for its owner


def test_store_false_and_delete_leave_nothing(oai):
    r = oai.responses.create(
        model="kimi-k2.5:standard", input="x", max_output_tokens=4, store=False, reasoning=INSTANT
    )
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    kept = oai.responses.create(
        model="kimi-k2.5:standard", input="x", max_output_tokens=4, reasoning=INSTANT
    )
    assert oai.responses.delete(kept.id) is None
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(kept.id)


def test_bad_requests_get_openai_errors(oai, serve_url, keyed):
    with pytest.raises(openai.BadRequestError, match="together"):
        oai.responses.create(
            model="kimi-k2.5", input="x", previous_response_id="resp_1", conversation="conv_1"
        )
    with pytest.raises(openai.BadRequestError, match="hosted tool 'web_search'"):
        oai.responses.create(
            model="kimi-k2.5",
            input="x",
            tools=[{"type": "web_search"}],
            tool_choice={"type": "web_search"},
        )
    r = httpx.post(
        f"{serve_url}/v1/responses",
        json={"model": "kimi-k2.5", "input": [{"type": "computer_call"}]},
        headers={"authorization": f"Bearer {keyed[0]}"},
    )
    assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_nothing")


def test_a_chain_outlives_routers_gateway_and_store_restarts(oai, serve_url):
    first = oai.responses.create(
        model="kimi-k2.5:standard", input="remember this", max_output_tokens=4, reasoning=INSTANT
    )
    conv = oai.conversations.create(items=[{"role": "user", "content": "hello"}])
    for name, namespace in [
        ("kimi-sessions", "kimi-serve"),
        ("kimi-gateway", "kimi-serve"),
        *[
            (a["name"], "serve")
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "Ingress" in a["name"] and a["namespace"] == "serve"
        ],
    ]:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
    time.sleep(1)
    errors: list[Exception] = []

    def next_turn() -> object:
        try:
            return oai.responses.create(
                model="kimi-k2.5:standard",
                input="and now?",
                previous_response_id=first.id,
                max_output_tokens=4,
                reasoning=INSTANT,
            )
        except (openai.APIConnectionError, openai.InternalServerError) as exc:
            errors.append(exc)
            return None  # the routers are still coming back

    try:
        second = wait_for("a turn served after the restarts", next_turn, 120, every_s=2)
    except AssertionError:
        raise AssertionError(f"still failing: {errors[-3:]!r}") from None
    assert second.usage.input_tokens > first.usage.input_tokens
    assert [i.id for i in oai.conversations.items.list(conv.id).data]


def test_revoking_a_key_deletes_what_it_stored(serve_url, admin):
    key, key_id = new_key(admin, "enterprise")
    mine = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0)
    r = mine.responses.create(
        model="kimi-k2.5:standard", input="x", max_output_tokens=4, reasoning=INSTANT
    )
    store = ray.get_actor("kimi-sessions", namespace="kimi-serve")
    assert ray.get(store.get_response.remote(key_id, r.id)) is not None
    body = admin.delete(f"/admin/keys/{key_id}").json()
    assert body["revoked"] and body["stored_items_deleted"] >= 1
    assert ray.get(store.get_response.remote(key_id, r.id)) is None


def test_an_agents_sdk_agent_runs_a_tool_through_the_responses_api(serve_url, keyed):
    import agents

    client = openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key=keyed[0], max_retries=0)
    calls: list[dict] = []

    @agents.function_tool
    def get_weather(
        city: Annotated[str, Field(max_length=24)], days: Annotated[int, Field(ge=1, le=14)]
    ) -> str:
        """Forecast for a city."""
        calls.append({"city": city, "days": days})
        return f"sunny in {city} for {days} days"

    agent = agents.Agent(
        name="forecaster",
        instructions="Answer with the weather tool.",
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model=agents.OpenAIResponsesModel(model="kimi-k2.5:premium", openai_client=client),
        model_settings=agents.ModelSettings(
            tool_choice="get_weather",
            max_tokens=300,
            reasoning=Reasoning(effort="none"),
        ),
    )
    agents.set_tracing_disabled(True)
    result = agents.Runner.run_sync(agent, "What's the weather in Oslo this week?")
    assert len(calls) == 1
    assert result.final_output == f"sunny in {calls[0]['city']} for {calls[0]['days']} days"


def test_a_session_cap_refuses_the_request_after_it_on_every_router(serve_url, admin, state_dir):
    from ray import serve

    def routers_running() -> bool:  # (a test before may have replaced them)
        ingress = serve.status().applications["kimi"].deployments["Ingress"]
        return ingress.replica_states.get("RUNNING", 0) == 2

    wait_for("both router replicas running", routers_running, 180, every_s=1)
    key, key_id = new_key(admin, "enterprise", max_session_tokens=600)
    headers = {"authorization": f"Bearer {key}", "x-session-id": "capped"}
    body = {"model": "kimi-k2.5:standard", "input": "hello there", "max_output_tokens": 8}
    body["reasoning"] = INSTANT
    used, served = 0, 0
    while True:  # served until what the session has left cannot hold another request
        r = httpx.post(f"{serve_url}/v1/responses", json=body, headers=headers, timeout=120)
        if r.status_code == 402:
            break
        assert r.status_code == 200, r.text
        used, served = used + r.json()["usage"]["total_tokens"], served + 1
        assert served < 100, "the cap never refused"
    assert served >= 2 and used <= 600  # never past the cap
    routers: set[str] = set()

    def refused(_: int) -> None:
        r = httpx.post(f"{serve_url}/v1/responses", json=body, headers=headers, timeout=120)
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "session_budget_exceeded"
        routers.add(r.headers["x-kimi-router"])

    with ThreadPoolExecutor(6) as pool:  # at once, so the proxy may spread them
        list(pool.map(refused, range(6)))
    if len(routers) == 1:
        # the proxy kept to one router: that one is stopped (Serve replaces it), so the
        # next requests meet another router replica, which must refuse them as well
        [first] = routers
        [name] = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].endswith(f"Ingress#{first}")
        ]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)

        def another_refuses() -> bool:
            try:
                r = httpx.post(f"{serve_url}/v1/responses", json=body, headers=headers, timeout=120)
            except httpx.RemoteProtocolError:
                # HAProxy sent it to the router just killed (it has not marked it down
                # yet) and the connection closed with no answer: that router's last word
                return False
            if r.status_code != 402:  # only the stopped router's last words may differ
                assert r.status_code in (500, 502, 503), r.text
                return False
            assert r.json()["error"]["code"] == "session_budget_exceeded"
            routers.add(r.headers["x-kimi-router"])
            return r.headers["x-kimi-router"] != first

        wait_for("another router refusing the session", another_refuses, 90, every_s=0.5)
    assert len(routers) == 2  # two router replicas refuse it: the cap is the gateway's
    other = httpx.post(
        f"{serve_url}/v1/responses",
        json=body,
        headers={**headers, "x-session-id": "another"},
        timeout=120,
    )
    assert other.status_code == 200  # the key itself is not capped, only that session
    # the key's own usage by session, over HTTP and from the CLI
    mine = httpx.get(
        f"{serve_url}/v1/usage",
        params={"group_by": "session"},
        headers={"authorization": f"Bearer {key}"},
    ).json()
    rows = {row["session"]: row for row in mine["data"]}
    assert set(rows) == {"capped", "another"}
    assert rows["capped"]["prompt_tokens"] + rows["capped"]["completion_tokens"] == used
    from serve_app.cli import usage_report

    flushed_usage(admin, state_dir)
    report = usage_report(state_dir / "usage", ["key_id", "session"])
    assert any(
        line.startswith(f"{key_id} | capped | {len(rows) and rows['capped']['requests']} |")
        for line in report.splitlines()
    )


def test_the_usage_root_reads_as_one_parquet_dataset_while_serving(oai, admin, state_dir):
    import pyarrow.dataset as ds

    oai.responses.create(
        model="kimi-k2.5:budget", input="x", max_output_tokens=2, reasoning=INSTANT
    )
    settled = flushed_usage(admin, state_dir)
    table = ds.dataset(state_dir / "usage", format="parquet", partitioning="hive").to_table()
    assert sorted(table["request_id"].to_pylist()) == sorted(settled["request_id"].to_pylist())


def test_a_background_response_runs_without_its_client_and_is_polled(oai):
    queued = oai.responses.create(
        model="kimi-k2.5:standard",
        input="take your time",
        max_output_tokens=12,
        reasoning=INSTANT,
        background=True,
    )
    assert queued.status == "queued" and queued.background is True and not queued.output

    def finished() -> object:
        r = oai.responses.retrieve(queued.id)
        return r if r.status not in ("queued", "in_progress") else None

    done = wait_for("the background response done", finished, 120)
    assert done.status in ("completed", "incomplete")
    assert done.output[0].content[0].text and 1 <= done.usage.output_tokens <= 12
    with pytest.raises(openai.BadRequestError, match="background"):
        oai.responses.cancel(
            oai.responses.create(
                model="kimi-k2.5:standard", input="x", max_output_tokens=2, reasoning=INSTANT
            ).id
        )


def test_a_background_response_over_its_keys_limits_is_refused_at_creation(
    serve_url, admin, state_dir
):
    key, key_id = new_key(admin, "enterprise", requests_per_minute=1)
    limited = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0, timeout=300)
    first = limited.responses.create(
        model="kimi-k2.5:standard", input="x", max_output_tokens=2, reasoning=INSTANT
    )
    with pytest.raises(openai.RateLimitError) as refused:
        limited.responses.create(
            model="kimi-k2.5:standard", input="x", max_output_tokens=2, background=True
        )
    assert int(refused.value.response.headers["retry-after"]) > 0
    # nothing was queued to fail later: the key's one record is the first response's
    assert [r["status"] for r in records(admin, state_dir, key_id)] == [200]
    assert limited.responses.retrieve(first.id).status in ("completed", "incomplete")


def test_a_cancelled_background_response_stops_and_is_metered(oai, admin, state_dir, keyed):
    queued = oai.responses.create(
        model="kimi-k2.5:premium",
        input="a long answer please",
        max_output_tokens=2000,
        background=True,
    )
    cancelled = oai.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    time.sleep(3)  # the run hears it within a second and closes its engine stream
    assert oai.responses.retrieve(queued.id).status == "cancelled"

    def metered() -> list[dict]:
        rows = records(admin, state_dir, keyed[1])
        return [r for r in rows if r["session_id"] == queued.id]

    [record] = wait_for("the cancelled run metered", metered, 30)
    assert record["completion_tokens"] < 2000


class Receiver:
    """A webhook endpoint on this machine that fails each event's first `failures`
    deliveries (HTTP 500) and records everything it gets."""

    def __init__(self, failures: int) -> None:
        self.got: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                seen = sum(
                    1 for h, _, _ in receiver.got if h["webhook-id"] == self.headers["webhook-id"]
                )
                status = 500 if seen < failures else 200
                receiver.got.append((dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"


def test_a_webhook_gets_the_signed_event_on_its_third_try(oai, serve_url):
    receiver = Receiver(failures=2)
    endpoint = oai.webhooks.create(
        url=receiver.url, name="ci", event_types=["response.completed", "response.incomplete"]
    )
    assert endpoint.signing_secret.startswith("whsec_")
    assert [e.id for e in oai.webhooks.list().data] == [endpoint.id]
    queued = oai.responses.create(
        model="kimi-k2.5:standard",
        input="tell me when done",
        max_output_tokens=6,
        reasoning=INSTANT,
        background=True,
    )
    wait_for("three deliveries", lambda: len(receiver.got) >= 3, 60)
    time.sleep(1)  # nothing more comes once one was taken
    assert [status for _, _, status in receiver.got] == [500, 500, 200]
    assert len({h["webhook-id"] for h, _, _ in receiver.got}) == 1  # one event, one id
    headers, body, _ = receiver.got[-1]
    event = oai.webhooks.unwrap(body, headers, secret=endpoint.signing_secret)
    assert event.type in ("response.completed", "response.incomplete")
    assert event.data.id == queued.id
    assert oai.responses.retrieve(queued.id).status == event.type.split(".")[1]
    oai.webhooks.delete(endpoint.id)
    receiver.server.shutdown()


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.8/hooks", "https://169.254.169.254/latest/meta-data", "file:///etc/passwd"],
)
def test_a_webhook_url_outside_the_allow_list_is_refused(oai, url):
    with pytest.raises(openai.BadRequestError, match="url"):
        oai.webhooks.create(url=url, name="x", event_types=["response.completed"])


def test_operators_register_a_keys_webhook_from_the_cli(serve_url, admin, monkeypatch, capsys):
    from serve_app.cli import main

    key, key_id = new_key(admin, "enterprise")
    monkeypatch.setenv("KIMI_SERVE_URL", serve_url)
    main(["webhooks", "add", key_id, "http://127.0.0.1:9/hooks", "--events", "response.failed"])
    made = json.loads(capsys.readouterr().out)
    assert made["signing_secret"].startswith("whsec_") and made["event_types"] == [
        "response.failed"
    ]
    main(["webhooks", "list", key_id])
    assert [e["id"] for e in json.loads(capsys.readouterr().out)["data"]] == [made["id"]]
    # the key holder sees it too, without its secret
    mine = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0)
    [endpoint] = mine.webhooks.list().data
    assert endpoint.id == made["id"] and "signing_secret" not in endpoint.model_dump()
    main(["webhooks", "delete", key_id, made["id"]])
    assert json.loads(capsys.readouterr().out)["deleted"] is True
    assert mine.webhooks.list().data == []


def test_webhook_endpoints_belong_to_live_keys_only(serve_url, admin, monkeypatch):
    from serve_app.cli import main

    spec = {"url": "http://127.0.0.1:9/hooks", "event_types": ["response.failed"]}
    assert admin.post("/admin/keys/nosuchkey000/webhook_endpoints", json=spec).status_code == 404
    assert admin.get("/admin/keys/nosuchkey000/webhook_endpoints").status_code == 404
    _, key_id = new_key(admin, "enterprise")
    made = admin.post(f"/admin/keys/{key_id}/webhook_endpoints", json=spec).json()
    gone = admin.delete(f"/admin/keys/{key_id}/webhook_endpoints/we_nosuchendpoint")
    assert gone.status_code == 404
    admin.delete(f"/admin/keys/{key_id}")  # revoked: its endpoints go with it
    refused = admin.post(f"/admin/keys/{key_id}/webhook_endpoints", json=spec)
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "key_id"
    assert admin.get(f"/admin/keys/{key_id}/webhook_endpoints").status_code == 404
    monkeypatch.setenv("KIMI_SERVE_URL", serve_url)
    with pytest.raises(SystemExit, match="No live key"):  # the CLI exits non-zero, saying why
        main(["webhooks", "add", "nosuchkey000", "http://127.0.0.1:9/hooks"])
    assert made["id"].startswith("we_")


@pytest.mark.parametrize("tier", ["premium", "standard"])
def test_a_hosted_tool_offered_beside_functions_is_named_not_shown(oai, tier):
    """Codex offers `web_search` with its functions: the model sees the functions only,
    and the answer says which tools were not run."""
    shell = {
        "type": "function",
        "name": "shell",
        "parameters": {
            "type": "object",
            "properties": {"cmd": {"type": "string", "maxLength": 16}},
            "required": ["cmd"],
        },
        "strict": True,
    }
    raw = oai.responses.with_raw_response.create(
        model=f"kimi-k2.5:{tier}",
        input="list the files",
        tools=[shell, {"type": "web_search"}],
        tool_choice="required",
        max_output_tokens=200,
    )
    assert raw.headers["x-kimi-tools-not-run"] == "web_search"
    calls = [item for item in raw.parse().output if item.type == "function_call"]
    assert calls and all(c.name == "shell" for c in calls)
