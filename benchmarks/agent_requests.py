"""Real coding-agent sessions on every tier, beside the engines' own servers.

    .venv/bin/python -m benchmarks.agent_requests

The first request of Claude Code 2.1.328 (`/v1/messages`) and of Codex 0.169.0
(`/v1/responses`) is recorded from the pinned CLIs themselves (scripts/agent_clis) by a
local endpoint that answers nothing; two tool round trips (a command and its ~2 KB of
output each) make turns 2 and 3, as the agents would send them. Each turn goes, in
order, to each of our tiers (pinned), to `vllm serve` of the same checkpoint with the
premium tier's flags, and to `llama-server` alone with the standard tier's GGUF and flags,
with one output token, so the latency is the prefill (and the relay). Reported per system
and turn: prompt tokens (the server's own count), seconds, and the peak resident memory
of all the system's processes. Writes benchmarks/results/agent_requests.{json,md}.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.compare import (
    RESULTS,
    ROOT,
    MemorySampler,
    llama_server_alone,
    our_app,
    run_facts,
    vllm_serve,
)

CLIS = ROOT / "scripts" / "agent_clis" / "node_modules" / ".bin"
TOOL_OUTPUT = "\n".join(
    f"-rw-r--r-- 1 dev dev {4096 + 37 * n:6d} src/module_{n:02d}.py" for n in range(40)
)
TIERS = ("premium", "standard", "budget")


# ---- the agents' own first requests ------------------------------------------------------


@contextlib.contextmanager
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An endpoint that keeps each request it gets and answers 500 (so the CLI stops)."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            seen.append({"path": self.path, "body": json.loads(self.rfile.read(size) or b"{}")})
            self.send_response(500)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"type":"error","error":{"type":"api_error","message":"recorded"}}')

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()


def record_first_requests(work: Path) -> dict[str, dict[str, Any]]:
    home = work / "home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex")}
    with recorder() as (url, seen):
        claude_env = {**env, "ANTHROPIC_BASE_URL": url, "ANTHROPIC_AUTH_TOKEN": "x"}
        claude_env |= {
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",
        }
        run_cli(
            [str(CLIS / "claude"), "-p", "List the files here.", "--model", "kimi-k2.5"],
            work,
            claude_env,
        )
        (home / ".codex" / "config.toml").write_text(
            f'model = "kimi-k2.5"\nmodel_provider = "kimi"\n[model_providers.kimi]\nname = "k"\n'
            f'base_url = "{url}/v1"\nenv_key = "KIMI_API_KEY"\nwire_api = "responses"\n'
            "request_max_retries = 0\nstream_max_retries = 0\n"
        )
        codex = [str(CLIS / "codex"), "exec", "--skip-git-repo-check", "List the files here."]
        run_cli(codex, work, {**env, "KIMI_API_KEY": "x"})
    first = {}
    for api, path in (("anthropic", "/v1/messages"), ("responses", "/v1/responses")):
        first[api] = next(r["body"] for r in seen if r["path"].startswith(path))
    return first


def run_cli(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL
    )


def anthropic_turns(first: dict[str, Any]) -> list[dict[str, Any]]:
    turns, body = [], copy.deepcopy(first)
    for n in range(3):
        if n:
            call = {
                "type": "tool_use",
                "id": f"toolu_bench{n}",
                "name": "Bash",
                "input": {"command": f"ls -l src/ # {n}", "description": "List sources"},
            }
            result = {
                "type": "tool_result",
                "tool_use_id": f"toolu_bench{n}",
                "content": TOOL_OUTPUT,
            }
            body["messages"] += [{"role": "assistant", "content": [call]},
                                 {"role": "user", "content": [result]}]  # fmt: skip
        turns.append({**copy.deepcopy(body), "max_tokens": 1, "stream": False})
    return turns


def responses_turns(first: dict[str, Any]) -> list[dict[str, Any]]:
    turns, body = [], copy.deepcopy(first)
    for n in range(3):
        if n:
            call = {"type": "function_call", "name": "exec_command", "call_id": f"call_{n}"}
            call["arguments"] = json.dumps({"cmd": f"ls -l src/ # {n}"})
            output = {"type": "function_call_output", "call_id": f"call_{n}", "output": TOOL_OUTPUT}
            body["input"] += [call, output]
        turns.append({**copy.deepcopy(body), "max_output_tokens": 1, "stream": False})
    return turns


# ---- measuring -----------------------------------------------------------------------------


def prompt_tokens(api: str, answer: dict[str, Any]) -> int | None:
    usage = answer.get("usage") or {}
    if api == "anthropic":
        parts = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        return sum(usage.get(k) or 0 for k in parts) or None
    return usage.get("input_tokens")


def send_turns(
    base: str, model: str, api: str, turns: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    path = "/v1/messages" if api == "anthropic" else "/v1/responses"
    rows = []
    for n, body in enumerate(turns, 1):
        started = time.monotonic()
        try:
            r = httpx.post(f"{base}{path}", json={**body, "model": model}, timeout=900)
        except httpx.HTTPError as exc:
            rows.append({"turn": n, "status": type(exc).__name__})
            continue
        seconds = round(time.monotonic() - started, 2)
        row: dict[str, Any] = {"turn": n, "status": r.status_code, "seconds": seconds}
        if r.status_code == 200:
            row["prompt_tokens"] = prompt_tokens(api, r.json())
        else:
            row["error"] = r.text[:200]
        rows.append(row)
        print(f"    {api:9s} turn {n}: {row}", flush=True)
    return rows


def measure(
    name: str, system: Callable[[], Any], model_of: Callable[[str], str], tiers: tuple[str, ...],
    sessions: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:  # fmt: skip
    print(f"{name}: starting", flush=True)
    out: dict[str, Any] = {}
    with MemorySampler() as mem, system() as url:
        base = url.removesuffix("/v1")
        for tier in tiers:
            for api, turns in sessions.items():
                out[f"{tier}/{api}"] = send_turns(base, model_of(tier), api, turns)
    return {"runs": out, "memory": mem.report()}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Agent requests: Claude Code and Codex sessions, prefill on each system",
        "",
        f"{report['date']}, {report['machine']}, commit {report['commit']}.",
        f"Command: `{report['command']}`. First requests as recorded from the pinned CLIs:"
        f" Claude Code {report['sizes']['anthropic']:,} bytes, Codex"
        f" {report['sizes']['responses']:,} bytes; turns 2 and 3 add a tool round trip each.",
        "One output token per request: the seconds are prefill plus the relay.",
        "",
        "| system | tier | agent | turn | status | prompt tokens | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, result in report["systems"].items():
        for run, rows in result["runs"].items():
            tier, api = run.split("/")
            for row in rows:
                lines.append(
                    f"| {system} | {tier} | {api} | {row['turn']} | {row['status']} |"
                    f" {row.get('prompt_tokens', '')} | {row.get('seconds', '')} |"
                )
    lines += ["", "Peak resident memory while each system ran (MiB, all its processes):", ""]
    for system, result in report["systems"].items():
        mem = result["memory"]
        top = ", ".join(f"{k} {v}" for k, v in list(mem["peak_by_process_mib"].items())[:4])
        lines.append(f"- {system}: {mem['peak_total_mib']:,} total ({top})")
    return "\n".join(lines) + "\n"


def stale_engines() -> list[str]:
    """Engine processes already running (another app, a crashed run): the memory
    sampler would count them as this run's."""
    names = ("VLLM::", "llama-server", "raylet")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names):
            found.append(f"{p.info['pid']} {cmd[:60]}")
    return found


def main() -> None:
    if stale := stale_engines():
        raise SystemExit("stop these first (their memory would be counted):\n" + "\n".join(stale))
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = RESULTS / "raw" / "agent-cli-work"
    work.mkdir(parents=True, exist_ok=True)
    first = record_first_requests(work)
    sessions = {"anthropic": anthropic_turns(first["anthropic"]),
                "responses": responses_turns(first["responses"])}  # fmt: skip
    systems = {
        "ours": measure("ours", our_app, lambda t: f"kimi-k2.5:{t}", TIERS, sessions),
        "vllm-serve": measure(
            "vllm serve", vllm_serve, lambda t: "kimi-k2.5", ("premium",), sessions
        ),
        "llama-server": measure(
            "llama-server", llama_server_alone, lambda t: "kimi-k2.5", ("standard",), sessions
        ),
    }
    report = {
        **run_facts("benchmarks.agent_requests"),
        "sizes": {api: len(json.dumps(body)) for api, body in first.items()},
        "systems": systems,
        "duration_s": round(time.monotonic() - started),
    }
    (RESULTS / "agent_requests.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "agent_requests.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
