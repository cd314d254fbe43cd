"""The real coding-agent CLIs against the real app: Claude Code (`claude -p`, Anthropic
Messages API) and OpenAI's Codex (`codex exec`, Responses API), pinned in
scripts/agent_clis and installed by `make install`.

Each first turn is the agent's real request (~12,800 prompt tokens of system prompt and
tool schemas from Claude Code, ~10,300 from Codex), on premium and on budget. The
multi-turn case resumes a session whose stored transcript already holds a tool call, its
result and K2.5's reasoning sealed by this deployment (the random model never picks a
tool by itself); the same transcript with the seal altered is the control, so the prompt
tokens the app metered show the reasoning went back into the prompt.

The embedded model is random except for one instruction wired into it at build time
(deployments/artifacts/instruction.py): asked `PROMPT` ("Reply with OK." said often
enough to be 0.2 % of 12,000 tokens of agent prompt), it answers `REPLY` and ends its
turn. Every prompt here is that one, so each session must end as a real one does: the
CLI exits 0 with the model's answer and no error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.holdback import metrics_ports
from deployments.artifacts.instruction import PROMPT, REPLY
from serve_app.reasoning.sealing import Sealer
from tests.integration.conftest import ROOT, flushed_usage, new_key

CLIS = ROOT / "scripts" / "agent_clis" / "node_modules" / ".bin"
OUTPUT_CAP = 64  # the plan's output cap: the wired answer is three tokens
REASONING = (
    "The user wants to know which files are here, so I ran ls first. It printed one file, "
    "notes.txt, and nothing else, so the directory holds a single text file; I will say "
    "that plainly and offer to open it, because the user may want its contents next."
)
CODEX_LOCAL_WARNINGS = ("Model metadata for", "Codex could not find bubblewrap")
TIERS = ["premium", "budget"]
pytestmark = pytest.mark.timeout(600)


@dataclass
class Agent:
    """One CLI's home, working directory and the app's address and key."""

    home: Path
    cwd: Path
    url: str
    key: str

    def env(self, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TERM")}
        return {**keep, "HOME": str(self.home), **extra}


@pytest.fixture
def agent(tmp_path: Path, serve_url: str, admin: httpx.Client) -> Agent:
    assert (CLIS / "claude").exists() and (CLIS / "codex").exists(), "run `make install`"
    key, _ = new_key(admin, "enterprise", max_output_tokens=OUTPUT_CAP)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("a note\n")
    return Agent(tmp_path / "home", tmp_path / "work", serve_url, key)


def sealer(state_dir: Path) -> Sealer:
    return Sealer([(state_dir / "reasoning.key").read_bytes()])


def altered(seal: str) -> str:
    """The seal with one character changed: it no longer opens."""
    return seal[:-8] + ("A" if seal[-8] != "A" else "B") + seal[-7:]


def session_records(admin: httpx.Client, state_dir: Path, session: str) -> list[dict[str, Any]]:
    rows = flushed_usage(admin, state_dir).to_pylist()
    return sorted((r for r in rows if r["session_id"] == session), key=lambda r: r["time"])


def agent_turns(records: list[dict[str, Any]], tier: str, api: str) -> list[dict[str, Any]]:
    """The CLI's requests: each answered 200 on the pinned tier, the agent's full prompt."""
    assert records, "no usage record under the CLI's session id"
    for r in records:
        assert (r["status"], r["tier"], r["api"]) == (200, tier, api), r
    turns = [r for r in records if r["prompt_tokens"] > 5000]
    assert turns, [r["prompt_tokens"] for r in records]
    return turns


def reasoning_back(api: str, how: str) -> float:
    """The router replicas' `kimi_reasoning_back` count for `api` and `how`, summed."""
    total = 0.0
    for port in metrics_ports():
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("ray_kimi_reasoning_back_total{") and all(
                tag in line for tag in (f'api="{api}"', f'how="{how}"')
            ):
                total += float(line.rsplit(" ", 1)[1])
    return total


def counted(api: str, how: str, above: float) -> float:
    """Wait for Ray's metrics agent (it exports every few seconds) to show more than `above`."""
    deadline = time.monotonic() + 90
    while (now := reasoning_back(api, how)) <= above and time.monotonic() < deadline:
        time.sleep(2)
    return now


# ---- Claude Code -------------------------------------------------------------------------


def claude(agent: Agent, *args: str) -> dict[str, Any]:
    env = agent.env(
        ANTHROPIC_BASE_URL=agent.url,
        ANTHROPIC_AUTH_TOKEN=agent.key,
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(OUTPUT_CAP),
    )
    run = subprocess.run(
        [str(CLIS / "claude"), "-p", *args, "--output-format", "json"],
        cwd=agent.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    result = json.loads(lines[-1])
    assert (run.returncode, result["is_error"], result["api_error_status"]) == (0, False, None), (
        result,
        run.stderr[-2000:],
    )
    assert result["result"].strip() == REPLY, result
    return result


def claude_project(agent: Agent) -> Path:
    """Claude Code's folder of the working directory's sessions (its path, every other
    character a dash)."""
    return agent.home / ".claude" / "projects" / re.sub(r"[^A-Za-z0-9]", "-", str(agent.cwd))


def write_transcript(
    agent: Agent, session: str, model: str, turns: list[tuple[str, list[dict], str]]
) -> None:
    """A stored Claude Code session of tool-call turns, each the user's ask, the
    assistant's content (ending in one `tool_use`, of `model`) and the tool's output."""
    project = claude_project(agent)
    project.mkdir(parents=True, exist_ok=True)
    common = {
        "isSidechain": False,
        "userType": "external",
        "cwd": str(agent.cwd),
        "sessionId": session,
        "version": "2.1.328",
        "timestamp": "2026-11-27T12:00:00.000Z",
    }
    entries, parent = [], None
    for n, (ask_text, content, output_text) in enumerate(turns):
        ask, answer, result = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"{n}{x}")) for x in "abc")
        message = {
            "id": f"msg_01KimiServeAgentTest{n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
            "content": content,
        }
        output = {"type": "tool_result", "tool_use_id": content[-1]["id"], "content": output_text}
        entries += [
            {**common, "parentUuid": parent, "type": "user", "uuid": ask,
             "message": {"role": "user", "content": ask_text}},
            {**common, "parentUuid": ask, "type": "assistant", "uuid": answer, "message": message},
            {**common, "parentUuid": answer, "type": "user", "uuid": result,
             "message": {"role": "user", "content": [output]},
             "toolUseResult": {"stdout": output_text, "stderr": "", "interrupted": False}},
        ]  # fmt: skip
        parent = result
    (project / f"{session}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def bash(n: int, command: str) -> dict:
    return {"type": "tool_use", "id": f"toolu_01KimiServe{n:04d}", "name": "Bash",
            "input": {"command": command}}  # fmt: skip


def claude_transcript(agent: Agent, session: str, model: str, signature: str) -> None:
    """A stored Claude Code session: the user asked, the model thought (its reasoning
    sealed in the signature, shown as nothing: `display: "omitted"`) and ran Bash, and
    the tool's result came back. Claude Code sends thinking back only to the model that
    wrote it, so the transcript names the model the test resumes with."""
    thinking = {"type": "thinking", "thinking": "", "signature": signature}
    turn = ("Which files are here?", [thinking, bash(0, "ls")], "notes.txt")
    write_transcript(agent, session, model, [turn])


@pytest.mark.parametrize("tier", TIERS)
def test_claude_code_first_turn(tier, agent, admin, state_dir):
    session = str(uuid.uuid4())
    result = claude(agent, PROMPT, "--model", f"kimi-k2.5:{tier}", "--session-id", session)
    assert result["session_id"] == session
    turns = agent_turns(session_records(admin, state_dir, session), tier, "anthropic")
    # the whole agent prompt (system prompt, 12 tools) fit the tier's context
    assert min(t["prompt_tokens"] for t in turns) > 10000


@pytest.mark.parametrize("tier", TIERS)
def test_claude_code_resume_brings_the_sealed_reasoning_back(tier, agent, admin, state_dir):
    """Claude Code sends the thinking block back with its signature; the app opens it
    into the turn's reasoning (the metric counts it). K2.5's template then keeps it only
    for tool-call turns after the last plain answer, and a resumed Claude Code session
    closes the stored turn with one ("No response requested."), so the prompt's size is
    no witness here (the Codex test below has one)."""
    seal = sealer(state_dir).seal(REASONING)
    tampered = altered(seal)
    for signature, how in ((seal, "sealed"), (tampered, "dropped")):
        before = reasoning_back("anthropic", how)
        session = str(uuid.uuid4())
        claude_transcript(agent, session, f"kimi-k2.5:{tier}", signature)
        claude(agent, PROMPT, "--resume", session, "--model", f"kimi-k2.5:{tier}")
        agent_turns(session_records(admin, state_dir, session), tier, "anthropic")
        assert counted("anthropic", how, above=before) > before, how


def test_claude_code_compacts_a_resumed_session_longer_than_the_tier(agent, admin, state_dir):
    """A resumed session whose history (four long tool outputs) with Claude Code's own
    prompt passes budget's context. The router's estimate is deliberately low, so
    llama-server is the one to count it past the context; its refusal reaches Claude Code
    in Anthropic's words ("prompt is too long: N tokens > M maximum"), and Claude Code,
    which thinks the model has a 1M-token window, compacts on exactly those words: it
    summarises the oldest turns in requests that fit and carries on from the summary. The
    records show the refusal (metered at no charge) and then requests served on budget;
    the transcript holds Claude Code's compact boundary; the session ends with the
    model's answer."""
    context = budget_context(agent)
    session = str(uuid.uuid4())
    log = " ".join(f"step {i} of the build compiled one more module" for i in range(150))
    # each turn asked with the wired prompt, as every prompt here: so the model's
    # summary of a turn ends, as its answer does, within the output cap
    turns = [(PROMPT, [bash(n, f"cat part{n}.log")], log) for n in range(4)]
    write_transcript(agent, session, "kimi-k2.5:budget", turns)
    claude(agent, PROMPT, "--resume", session, "--model", "kimi-k2.5:budget")
    records = session_records(admin, state_dir, session)
    assert records and records[0]["status"] == 400, records  # the resumed history
    for r in records:
        assert (r["tier"], r["api"]) == ("budget", "anthropic"), r
        if r["status"] == 400:  # refused by the engine, in its own counts
            m = re.fullmatch(r"the prompt has (\d+) tokens; the context holds (\d+)", r["error"])
            assert m and int(m[1]) >= int(m[2]) == context and r["cost_usd"] == 0, r
        else:
            assert r["status"] == 200 and r["prompt_tokens"] < context, r
    served = [r for r in records if r["status"] == 200]
    assert len(served) >= 2, records  # a summary of the oldest turns, then the agent's turn
    stored = [json.loads(line) for line in (claude_project(agent) / f"{session}.jsonl").open()]
    boundaries = [e for e in stored if e.get("subtype") == "compact_boundary"]
    assert boundaries, [e.get("type") for e in stored]


def budget_context(agent: Agent) -> int:
    """The context budget serves, as `/v1/models` says."""
    models = httpx.get(f"{agent.url}/v1/models", headers={"authorization": f"Bearer {agent.key}"})
    [card] = [m for m in models.json()["data"] if m["id"] == "kimi-k2.5:budget"]
    return card["max_model_len"]


# ---- Codex -------------------------------------------------------------------------------


def codex_home(agent: Agent) -> Path:
    home = agent.home / ".codex"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "\n".join(
            [
                'model_provider = "kimi"',
                "[model_providers.kimi]",
                'name = "Kimi K2.5"',
                f'base_url = "{agent.url}/v1"',
                'env_key = "KIMI_API_KEY"',
                'wire_api = "responses"',
                "request_max_retries = 0",
                "stream_max_retries = 0",
                "",
            ]
        )
    )
    return home


def codex(agent: Agent, tier: str, *args: str) -> list[dict[str, Any]]:
    env = agent.env(CODEX_HOME=str(codex_home(agent)), KIMI_API_KEY=agent.key)
    command = [str(CLIS / "codex"), "exec", "--json", "--skip-git-repo-check"]
    run = subprocess.run(
        [*command, "-m", f"kimi-k2.5:{tier}", *args],
        cwd=agent.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and events, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    errors = [e for e in events if (m := error_of(e)) and not m.startswith(CODEX_LOCAL_WARNINGS)]
    assert not errors, errors
    answers = [e["item"]["text"].strip() for e in events if answer_of(e)]
    assert answers == [REPLY], events
    return events


def answer_of(event: dict[str, Any]) -> bool:
    return event["type"] == "item.completed" and event["item"].get("type") == "agent_message"


def error_of(event: dict[str, Any]) -> str | None:
    if event["type"] in ("error", "turn.failed"):
        return event.get("message") or event["error"]["message"]
    item = event.get("item") or {}
    return item.get("message") if item.get("type") == "error" else None


def thread_of(events: list[dict[str, Any]]) -> str:
    return next(e["thread_id"] for e in events if e["type"] == "thread.started")


def add_tool_round_trip(agent: Agent, thread: str, sealed: str) -> None:
    """Codex's stored rollout with the first turn's answer replaced: K2.5's reasoning
    (sealed, as `encrypted_content`), an `exec_command` call and its output, as a turn of
    Codex's own would leave them. (The random first answer goes, so that two sessions
    differ only in the seal.)"""
    (rollout,) = (agent.home / ".codex" / "sessions").rglob(f"rollout-*{thread}.jsonl")
    lines = [json.loads(line) for line in rollout.read_text().splitlines()]
    lines = [line for line in lines if not answered(line)]
    ordinal = max(line.get("ordinal", 0) for line in lines)
    seq = max((line.get("metadata") or {}).get("history_sequence", 0) for line in lines)
    items = [
        {"type": "reasoning", "id": "rs_agent_test", "summary": [], "encrypted_content": sealed},
        {"type": "function_call", "id": "fc_agent_test", "name": "exec_command",
         "call_id": "call_agent_test", "arguments": json.dumps({"cmd": "ls"})},
        {"type": "function_call_output", "call_id": "call_agent_test", "output": "notes.txt"},
    ]  # fmt: skip
    with rollout.open("w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        for n, item in enumerate(items, 1):
            meta = {"history_sequence": seq + n, "sampled_through_sequence": seq + n - 1}
            line = {
                "timestamp": "2026-11-27T12:00:00.000Z",
                "ordinal": ordinal + n,
                "type": "response_item",
                "payload": item,
                "metadata": {**meta, "client_authored": False},
            }
            f.write(json.dumps(line) + "\n")


def answered(line: dict[str, Any]) -> bool:
    """A rollout line holding the model's answer (not the client's own messages)."""
    item = line.get("payload") or {}
    if line.get("type") != "response_item":
        return False
    return item.get("type") != "message" or item.get("role") == "assistant"


@pytest.mark.parametrize("tier", TIERS)
def test_codex_first_turn(tier, agent, admin, state_dir):
    thread = thread_of(codex(agent, tier, PROMPT))
    turns = agent_turns(session_records(admin, state_dir, thread), tier, "responses")
    assert min(t["prompt_tokens"] for t in turns) > 8000  # instructions, tools, namespaces


@pytest.mark.parametrize("tier", TIERS)
def test_codex_resume_brings_the_sealed_reasoning_back(tier, agent, admin, state_dir):
    seal = sealer(state_dir).seal(REASONING)
    tampered = altered(seal)
    prompts = {}
    for name, sealed in (("sealed", seal), ("tampered", tampered)):
        thread = thread_of(codex(agent, tier, PROMPT))
        add_tool_round_trip(agent, thread, sealed)
        codex(agent, tier, "resume", thread, PROMPT)
        turns = agent_turns(session_records(admin, state_dir, thread), tier, "responses")
        prompts[name] = turns[-1]["prompt_tokens"]
    # the same history; only the sealed reasoning opened and went into the prompt
    assert prompts["sealed"] - prompts["tampered"] >= 30, prompts
    assert counted("responses", "sealed", above=0) > 0
