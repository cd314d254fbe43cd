"""GGUF tiers on llama.cpp: artifacts, template parity with vLLM's rendering, and a
llama-server that dies mid-request."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from deployments.artifacts.gguf import ensure_tiny_gguf, read_gguf_header
from deployments.artifacts.tiny_model import TEMPLATE_PATH, ensure_tiny_model
from tests.integration.tiny_vocab import half_character_token, token_bytes, vocab

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("quant", "ftype"), [("Q4_K_M", "MOSTLY_Q4_K_M"), ("Q2_K", "MOSTLY_Q2_K")])
def test_gguf_artifact_header(quant, ftype):
    path = ensure_tiny_gguf(quant)
    assert path.exists() and path.stat().st_size > 100_000
    header = read_gguf_header(path)
    assert header["file_type_name"] == ftype
    assert header["architecture"] == "deepseek2"
    assert header["tokens"] == 32768
    assert header["chat_template"] == TEMPLATE_PATH.read_text()


def test_llama_cpp_renders_the_same_prompt_as_vllm(tmp_path):
    """llama.cpp's Jinja engine and transformers' render Kimi's template identically."""
    from transformers import AutoTokenizer

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Forecast",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "functions.get_weather:0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model())
    with llama_server("Q4_K_M") as url:
        for thinking in (True, False):
            kwargs = {"thinking": thinking}
            body = {"messages": messages, "tools": tools, "chat_template_kwargs": kwargs}
            prompt = httpx.post(f"{url}/apply-template", json=body).json()["prompt"]
            expected = tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
            assert prompt == expected


@contextlib.contextmanager
def llama_server(quant: str) -> Iterator[str]:
    """A llama-server of our build on the tiny GGUF, outside the app."""
    from deployments.artifacts.llama_cpp import llama_binary
    from deployments.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            str(llama_binary("llama-server")),
            "-m",
            str(ensure_tiny_gguf(quant)),
            "--port",
            str(port),
            "--jinja",
            "--fit",
            "off",
            "--no-repack",
            "--no-webui",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def steered_completion(quant: str, grammar: str, n_predict: int, bias: dict[int, float]) -> dict:
    """One `/completion` under `grammar` with the sampler pushed at the `bias` tokens."""
    with llama_server(quant) as url:
        body = {
            "prompt": "x",
            "grammar": grammar,
            "n_predict": n_predict,
            "logit_bias": [[i, b] for i, b in bias.items()],
            "return_tokens": True,
        }
        return httpx.post(f"{url}/completion", json=body, timeout=60).json()


def test_grammar_lets_no_invalid_utf8_through():
    """Our patch to llama.cpp's grammar (scripts/llama_cpp/patches/grammar-strict-utf8.patch):
    tokens holding bytes that no UTF-8 text holds are no characters to a grammar, however
    much the model wants them. Unpatched, they passed as characters and came out as U+FFFD
    each, past a JSON string's maxLength."""
    impossible = [
        i for i, b in token_bytes().items() if any(x in (0xC0, 0xC1) or x >= 0xF5 for x in b)
    ]
    assert impossible, "the byte-level vocabulary holds every byte"
    r = steered_completion(
        "Q2_K", 'root ::= [^"\\\\\\x00-\\x1F]{8}', 16, {i: 50.0 for i in impossible}
    )
    assert not set(r["tokens"]) & set(impossible)
    assert "\ufffd" not in r["content"] and len(r["content"]) == 8, r["content"]


def test_a_marker_ends_reasoning_that_stopped_mid_character():
    """Our patch grammar-token-after-partial-utf8.patch: where the grammar wants a named
    token next (`</think>` once the reasoning budget is spent) and the token before left
    a character half-written, the named token still comes. Unpatched, the grammar
    refused every token there (the marker's text cannot complete the character), the
    sampler drew one anyway and the request failed: "Unexpected empty grammar stack"."""
    half, think_end = half_character_token(), vocab()["</think>"]
    # the half character, wherever it may come
    r = steered_completion("Q4_K_M", 'root ::= (!</think>){0,1} </think> "ok"', 8, {half: 100.0})
    assert r.get("tokens", [])[:2] == [half, think_end], r
    assert r["content"].endswith("ok") and r["stop_type"] == "eos", r


def _llama_server_pid(quant: str) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"llama-server.*tiny-kimi-{quant}"], capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 1, f"expected one llama-server for {quant}, found {out}"
    return int(out[0])


def _wait_healthy(serve_url: str, tier: str, timeout: float = 120, restarts: int = 0) -> dict:
    """The tier's figures once it is healthy with at least `restarts` engine restarts
    (they reach /status within the replicas' 0.5 s report interval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{serve_url}/status", timeout=30).json()["tiers"][tier]
        if status and status["healthy"] and status["restarts"] >= restarts:
            return status
        if not status:  # scaled to zero (budget does when idle): a request wakes it
            httpx.post(
                f"{serve_url}/v1/chat/completions",
                timeout=120,
                json={
                    "model": f"kimi-k2.5:{tier}",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1,
                },
            )
        time.sleep(0.5)
    raise AssertionError(f"{tier} never became healthy again")


def test_killed_llama_server_fails_cleanly_and_restarts(serve_url):
    tier, quant = "budget", "Q2_K"
    body = {
        "model": f"kimi-k2.5:{tier}",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1900,
        "stream": True,
    }
    interrupted = 0
    for _attempt in range(5):
        before = _wait_healthy(serve_url, tier)["restarts"]
        pid = _llama_server_pid(quant)
        events, replaced = [], False
        with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 2:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        # budget scales to zero: the replica whose llama-server was read
                        # had just been stopped, and the request woke a new one
                        replaced = True
                        break
        if replaced or events[-1] == "[DONE]":
            continue  # the engine finished before the kill landed; try again
        interrupted += 1
        err = json.loads(events[-1])["error"]
        assert err["type"] == "server_error" and "retry" in err["message"]
        after = _wait_healthy(serve_url, tier, restarts=before + 1)
        assert after["restarts"] == before + 1
        assert _llama_server_pid(quant) != pid
        ok = httpx.post(
            f"{serve_url}/v1/chat/completions",
            timeout=60,
            json={**body, "stream": False, "max_tokens": 8},
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        break
    assert interrupted, "never managed to kill llama-server mid-stream"


def test_killed_llama_server_non_streaming_gets_503(serve_url):
    tier, quant = "standard", "Q4_K_M"
    _wait_healthy(serve_url, tier)
    pid = _llama_server_pid(quant)
    before = _wait_healthy(serve_url, tier)["restarts"]
    os.kill(pid, signal.SIGKILL)
    body = {
        "model": f"kimi-k2.5:{tier}",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 4,
    }
    r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60)
    if r.status_code != 200:  # raced the restart: a clean, retryable error
        assert r.status_code == 503 and r.json()["error"]["message"]
    _wait_healthy(serve_url, tier, restarts=before + 1)
    r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
