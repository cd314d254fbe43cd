"""llama.cpp's `llama-server` in the tier replica, supervised as a child process.

The replica starts `llama-server` on a free loopback port, waits for `/health`, proxies
OpenAI requests to it with streaming, restarts it if it dies (the in-flight requests end
with a clean error), and stops it with the replica. Load comes from its `/metrics` and
`/slots` endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from deployments.artifacts.llama_cpp import llama_binary
from deployments.artifacts.resolve import resolve_artifact, resolve_mmproj
from deployments.engines.base import Engine
from deployments.engines.llama_cpp.constrained import (
    Constraint,
    TurnWriter,
    completion_body,
    constraint_for,
    schema_error,
    turn_outputs,
    unsupported,
)
from deployments.engines.llama_cpp.schema_grammar import SchemaGrammar, SchemaNotSupported
from deployments.engines.openai_shape import PROMPT_FIELDS, normalize_response, normalize_sse
from deployments.ports import free_port
from deployments.protocol import (
    EngineError,
    EngineLoad,
    EngineOutput,
    context_overflow,
    engine_down,
    token_count,
)
from deployments.spec import TierSpec, flags_to_argv

log = logging.getLogger(__name__)

DEFAULT_FLAGS: dict[str, Any] = {
    "jinja": True,
    "metrics": True,
    "slots": True,
    "no-webui": True,
    "parallel": 4,
    "reasoning-format": "deepseek",  # reasoning into `reasoning_content`, as Kimi's API
}


def die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills llama-server when the replica's
    process dies, however it dies (a replica killed hard runs no shutdown hook)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class LlamaCppEngine(Engine):
    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.parallel = int(spec.engine_args.get("parallel", DEFAULT_FLAGS["parallel"]))
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        # Requests this replica has open at llama-server. Its own `requests_deferred`
        # misses those still waiting for one of its few HTTP threads, so under load the
        # queue is the larger of the two.
        self.in_flight = 0
        # Idle connections are dropped before llama-server's own keep-alive timeout (5 s),
        # so a request rarely lands on one the server is closing at that moment.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(keepalive_expiry=2.0)
        )
        self._schemas = SchemaGrammar()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{spec.name}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        flags = {
            **DEFAULT_FLAGS,
            "model": str(resolve_artifact(self.spec.artifact)),
            "mmproj": resolve_mmproj(self.spec),
            "alias": self.spec.model_id,
            # llama-server splits the context across its slots; each slot gets max_context.
            "ctx-size": self.spec.max_context * self.parallel,
            **self.spec.engine_args,
            "host": "127.0.0.1",
            "port": self.port,
        }
        return [str(llama_binary("llama-server")), *flags_to_argv(flags)]

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self.port = free_port()
        argv = self._argv()
        log.info("starting %s", " ".join(argv))
        logfile = open(self._log_path, "ab")  # noqa: SIM115  owned by the child process
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=logfile,
            stderr=logfile,
            env={**os.environ, **self.spec.env},
            start_new_session=True,  # a signal to the replica's group does not hit it twice
            preexec_fn=die_with_parent,
        )
        logfile.close()
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                tail = self._log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                r = await self._client.get(f"{self.base_url}/health", timeout=2.0)
                if r.status_code == 200:
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"llama-server not ready after {self.spec.startup_timeout_s}s")

    async def _supervise(self) -> None:
        """Restart llama-server whenever it exits unexpectedly, with a short backoff."""
        backoff = 0.5
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.error("llama-server for %s exited with %s; restarting", self.spec.name, code)
            try:
                await self._spawn()
                backoff = 0.5
            except Exception:
                log.exception("llama-server restart failed")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def shutdown(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await self._client.aclose()

    async def check_health(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            raise RuntimeError("llama-server is not running")
        r = await self._client.get(f"{self.base_url}/health", timeout=5.0)
        if r.status_code != 200:
            raise RuntimeError(f"llama-server health: {r.status_code}")

    async def load(self) -> EngineLoad:
        try:
            text = (await self._client.get(f"{self.base_url}/metrics", timeout=2.0)).text
            slots = (await self._client.get(f"{self.base_url}/slots", timeout=2.0)).json()
        except (httpx.HTTPError, ValueError):
            return EngineLoad(healthy=False, capacity=self.parallel, restarts=self.restarts)
        metrics = parse_prometheus(text)
        busy = sum(1 for s in slots if s.get("is_processing"))
        running = int(metrics.get("llamacpp:requests_processing", busy))
        deferred = int(metrics.get("llamacpp:requests_deferred", 0))
        return EngineLoad(
            running=running,
            waiting=max(deferred, self.in_flight - running),
            kv_cache_usage=busy / max(len(slots), 1),
            capacity=self.parallel,
            restarts=self.restarts,
            generated_tokens_total=int(metrics.get("llamacpp:tokens_predicted_total", 0)),
        )

    # ---- requests --------------------------------------------------------------------

    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        body = adapt_chat_request(body)
        constraint = constraint_for(body, self.spec)
        if constraint is None:

            def relay(resp: httpx.Response) -> AsyncIterator[EngineOutput]:
                return self._relay_chat(resp, request_id)

            return self._proxy("/v1/chat/completions", body, request_id, relay)
        return self._constrained_chat(body, constraint, request_id)

    async def _relay_chat(
        self, resp: httpx.Response, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        """llama-server's chat answer, with its reasoning tokens counted (it reports
        none): streamed, one per chunk of reasoning (one token each); whole, by
        tokenizing the reasoning it returned (at most its output tokens)."""
        if not is_stream(resp):
            answer = normalize_response(json.loads(await resp.aread()))
            thought = "".join(
                (c.get("message") or {}).get("reasoning_content") or ""
                for c in answer.get("choices") or ()
            )
            tokens = await self._count(thought, request_id) if thought else 0
            # its text tokenized again may take more tokens than generating it did
            output = (answer.get("usage") or {}).get("completion_tokens")
            yield with_reasoning_tokens(answer, tokens if output is None else min(tokens, output))
            return
        reasoning = 0
        async for event in relay_stream(resp):
            if '"reasoning_content"' in event:
                reasoning += thinks(event)
            elif '"usage"' in event and event.startswith("data: {"):
                payload = json.loads(event[6:])
                if isinstance(payload.get("usage"), dict):
                    event = f"data: {json.dumps(with_reasoning_tokens(payload, reasoning))}\n\n"
            yield event

    async def _count(self, text: str, request_id: str) -> int:
        answer = await self._post(
            "/tokenize", {"content": text, "add_special": False, "parse_special": True}, request_id
        )
        return 0 if isinstance(answer, EngineError) else len(answer["tokens"])

    def completions(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        return self._proxy("/v1/completions", body, request_id, relay_openai)

    async def _constrained_chat(
        self, body: dict[str, Any], constraint: Constraint, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        """A forced call or JSON answer under our grammar (llama_cpp_constrained.py)."""
        refused = unsupported(body)
        if refused is not None:
            yield refused
            return
        try:
            grammar = await constraint.grammar(self._schemas)
        except SchemaNotSupported as exc:
            yield schema_error(exc, constraint)
            return
        prompt = await self._render(body, request_id)
        if isinstance(prompt, EngineError):
            yield prompt
            return
        writer = TurnWriter(
            model=self.spec.model_id,
            stream=bool(body.get("stream")),
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        )

        def relay(resp: httpx.Response) -> AsyncIterator[EngineOutput]:
            return turn_outputs(completion_events(resp), writer, constraint)

        payload = completion_body(body, prompt, grammar)
        async for item in self._proxy("/completion", payload, request_id, relay):
            yield item

    async def tokenize(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        prompt = await self._render(body, request_id)
        if isinstance(prompt, EngineError):
            yield prompt
            return
        ask = {"content": prompt, "add_special": False, "parse_special": True}
        answer = await self._post("/tokenize", ask, request_id)
        yield answer if isinstance(answer, EngineError) else token_count(len(answer["tokens"]))

    async def _render(self, body: dict[str, Any], request_id: str) -> str | EngineError:
        """The chat's prompt as llama-server's template renders it."""
        template = {k: body[k] for k in PROMPT_FIELDS if k in body}
        answer = await self._post("/apply-template", template, request_id)
        return answer if isinstance(answer, EngineError) else answer["prompt"]

    async def _post(
        self, path: str, body: dict[str, Any], request_id: str
    ) -> dict[str, Any] | EngineError:
        """One small JSON exchange with llama-server."""
        try:
            async with self._exchange(path, body, request_id) as r:
                raw = await r.aread()
        except httpx.HTTPError as exc:
            log.warning("request %s lost its engine: %r", request_id, exc)
            return engine_down()
        if r.status_code != 200:
            return engine_error_from(r.status_code, raw)
        return json.loads(raw)

    async def _proxy(
        self, path: str, body: dict[str, Any], request_id: str, relay: Relay
    ) -> AsyncIterator[EngineOutput]:
        body = {**body, "model": self.spec.model_id}
        self.in_flight += 1
        try:
            async with self._exchange(path, body, request_id) as resp:
                if resp.status_code != 200:
                    yield engine_error_from(resp.status_code, await resp.aread())
                    return
                async for item in relay(resp):
                    yield item
        except httpx.HTTPError as exc:
            log.warning("request %s lost its engine: %r", request_id, exc)
            # before any token the router may send the request to another tier; after,
            # the relay ends the stream with this as its error event
            yield engine_down()
        finally:
            self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def _exchange(
        self, path: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[httpx.Response]:
        """One POST to llama-server, its answer read by the caller. A pooled connection
        that the server closed as it was reused gives no answer: the request then goes
        once more on a fresh connection (never once an answer has begun)."""
        url, headers = f"{self.base_url}{path}", {"x-request-id": request_id}
        answered = False
        for attempt in (1, 2):
            try:
                async with self._client.stream("POST", url, json=body, headers=headers) as resp:
                    answered = True
                    yield resp
                    return
            except httpx.RemoteProtocolError:
                if answered or attempt == 2:
                    raise
                log.info("request %s: stale connection to llama-server, resent", request_id)


Relay = Callable[[httpx.Response], AsyncIterator[EngineOutput]]


def is_stream(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


async def relay_stream(resp: httpx.Response) -> AsyncIterator[str]:
    async for event in sse_events(resp):
        if event.strip() == "data: null":  # how it opens a stream of several prompts
            continue
        yield normalize_sse(event)


async def relay_openai(resp: httpx.Response) -> AsyncIterator[EngineOutput]:
    """llama-server's own OpenAI answer, in our response shape."""
    if is_stream(resp):
        async for event in relay_stream(resp):
            yield event
    else:
        yield normalize_response(json.loads(await resp.aread()))


def thinks(event: str) -> int:
    """1 if this chunk carries reasoning (llama-server streams a token a chunk)."""
    try:
        chunk = json.loads(event[6:])
    except ValueError:
        return 0
    return int(
        any((c.get("delta") or {}).get("reasoning_content") for c in chunk.get("choices") or ())
    )


def with_reasoning_tokens(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    """`body`'s usage (if any) with its reasoning tokens, as OpenAI and vLLM report them."""
    usage = body.get("usage")
    if isinstance(usage, dict):
        details = usage.get("completion_tokens_details") or {}
        usage["completion_tokens_details"] = {**details, "reasoning_tokens": tokens}
    return body


async def completion_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a streamed `/completion` answer."""
    async for event in sse_events(resp):
        payload = event[6:].strip() if event.startswith("data: ") else ""
        if payload.startswith("{"):
            yield json.loads(payload)


def adapt_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """Text parts only, as llama-server's parser needs: an assistant's earlier refusal
    part becomes the text it was."""
    messages = [{k: as_text_parts(v) for k, v in m.items()} for m in body.get("messages", ())]
    return {**body, "messages": messages}


def as_text_parts(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return [
        {"type": "text", "text": p["refusal"]}
        if isinstance(p, dict) and p.get("type") == "refusal"
        else p
        for p in value
    ]


async def sse_events(resp: httpx.Response) -> AsyncIterator[str]:
    """Yield whole SSE events (`data: ...\\n\\n`) from a streaming response."""
    buf = ""
    async for text in resp.aiter_text():
        buf += text
        while "\n\n" in buf:
            event, buf = buf.split("\n\n", 1)
            if event.strip():
                yield event + "\n\n"
    if buf.strip():
        yield buf.rstrip("\n") + "\n\n"


def engine_error_from(status: int, raw: bytes) -> EngineError:
    try:
        err = json.loads(raw).get("error", {})
        message = err.get("message") or raw.decode(errors="replace")
        etype = err.get("type") or "invalid_request_error"
    except (ValueError, AttributeError):
        message, etype = raw.decode(errors="replace")[:500], "server_error"
        err = {}
    counts = err.get("n_prompt_tokens"), err.get("n_ctx")  # n_ctx: one slot's, the tier's
    if etype == "exceed_context_size_error" and all(isinstance(n, int) for n in counts):
        return context_overflow(*counts)
    return EngineError(status_code=status, message=message, type=etype)


def parse_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name.split("{")[0]] = float(value)
    return out
