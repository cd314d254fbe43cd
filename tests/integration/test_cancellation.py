"""A client that hangs up mid-stream cancels the engine request (engine's own counter)."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def _premium(serve_url: str) -> dict:
    return httpx.get(f"{serve_url}/status", timeout=30).json()["tiers"]["premium"]


def test_disconnect_aborts_vllm_request(serve_url):
    before = _premium(serve_url)
    body = {
        "model": "kimi-k2.5:premium",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 8000,
        "stream": True,
    }
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=60) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i >= 5:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # figures reach /status within the replicas' 0.5 s report interval
        now = _premium(serve_url)
        if now["running"] == 0 and now["aborted_total"] > before["aborted_total"]:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"engine request not aborted: {now}")
    assert now["aborted_total"] == before["aborted_total"] + 1
    # The engine's own token counter: it stopped far short of the 8,000 tokens asked for.
    generated = now["generated_tokens_total"] - before["generated_tokens_total"]
    assert 1 <= generated < 4000, generated
