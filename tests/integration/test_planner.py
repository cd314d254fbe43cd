"""The planner's memory figures for the embedded default against what the running
engines report: vLLM's KV cache size (its own log line, from the app's premium replica)
and llama-server's model and KV buffers (the standard and budget tiers' own binary,
artifacts and flags, started at log verbosity 4 so it prints them)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from deployments.artifacts.gguf import read_gguf_header
from deployments.artifacts.resolve import resolve_artifact
from deployments.engines.llama_cpp.engine import LlamaCppEngine
from deployments.ports import free_port
from serve_app.cli import app_args
from serve_app.config import load_config
from serve_app.planner.inputs import node_types
from serve_app.planner.plan import plan_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = load_config(app_args(ROOT / "serve_config.yaml"))
PLANS = {p.tier: p for p in plan_config(CONFIG, node_types(), {})}
MIB = 2**20


def test_vllm_holds_the_kv_tokens_the_planner_expects(serve_url):
    """Within 1 % (vLLM rounds the cache down to whole blocks)."""
    logs = Path("/tmp/ray/session_latest/logs")
    found = set()
    for path in logs.glob("worker-*"):
        for line in path.read_text(errors="replace").splitlines():
            if m := re.search(r"CPU KV cache size: ([\d,]+) tokens", line):
                found.add(int(m.group(1).replace(",", "")))
    assert found, f"no vLLM KV cache line in {logs}"
    planned = PLANS["premium"].kv_tokens
    for reported in found:
        assert reported == pytest.approx(planned, rel=0.01), (reported, planned)


def buffers(tier: str) -> dict[str, float]:
    """The MiB llama-server reports for its model and KV buffers with this tier's flags."""
    engine = LlamaCppEngine(CONFIG.tier(tier))
    engine.port = free_port()
    proc = subprocess.Popen(
        [*engine._argv(), "--log-verbosity", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(out) < 2 and proc.stdout is not None:
            line = proc.stdout.readline()
            if m := re.search(r"model buffer size =\s+([\d.]+) MiB", line):
                out["model"] = out.get("model", 0) + float(m.group(1))
            elif m := re.search(r"KV buffer size =\s+([\d.]+) MiB", line):
                out["kv"] = float(m.group(1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(out) == 2, f"llama-server printed no buffer sizes for {tier}: {out}"
    return out


@pytest.mark.parametrize("tier", ["standard", "budget"])
def test_llama_server_buffers_match_the_plan(tier):
    """KV within 1 % (the cache is ctx-size x 576 x 2 B a layer); the model's buffer is
    the GGUF's tensors, and the plan, which counts the whole file (the vocabulary and
    metadata too: ~1.25 MiB with the tiny model's 32K tokens), is never below it."""
    plan, reported = PLANS[tier], buffers(tier)
    kv = plan.kv_tokens * plan.kv_bytes_per_token / MIB
    assert reported["kv"] == pytest.approx(kv, rel=0.01), (reported, kv)
    artifact = resolve_artifact(CONFIG.tier(tier).artifact)
    tensors = read_gguf_header(Path(artifact))["tensor_bytes"] / MIB
    assert reported["model"] == pytest.approx(tensors, rel=0.01), (reported, tensors)
    assert plan.artifact_gb * 1e9 / MIB >= reported["model"], (reported, plan.artifact_gb)
