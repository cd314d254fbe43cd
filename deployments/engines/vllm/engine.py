"""vLLM in the tier replica: vLLM's async engine plus its own OpenAI serving layer.

The engine runs in-process (its engine core is vLLM's own child process), so chat
rendering, Kimi tool/reasoning parsing, guided decoding and streaming are vLLM's, not a
rewrite. Closing a response generator (client gone) aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from deployments.artifacts.resolve import resolve_artifact
from deployments.engines.base import Engine
from deployments.engines.openai_shape import (
    PROMPT_FIELDS,
    answer_schema,
    calls_offered,
    normalize_response,
    normalize_sse,
    reasoning_budget,
    thinking_on,
)
from deployments.protocol import (
    EngineError,
    EngineLoad,
    EngineOutput,
    context_overflow,
    engine_down,
    mid_answer_error,
    token_count,
)
from deployments.spec import TierSpec, flags_to_argv

log = logging.getLogger(__name__)

# Flags every Kimi tier needs; the catalogue's engine_args may override them.
KIMI_DEFAULT_FLAGS: dict[str, Any] = {
    "trust-remote-code": True,
    "enable-auto-tool-choice": True,
    "tool-call-parser": "kimi_k2_bounded",
    "reasoning-parser": "kimi_k2",
    # Forced, required and auto calls all follow the tool's JSON schema (OpenAI strict mode).
    "tool-strict-level": "parameter",
    "enable-prompt-tokens-details": True,
    "enable-force-include-usage": False,
}


class VLLMEngine(Engine):
    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._tokenization: Any = None
        self.aborted = 0
        self._control_bias: dict[str, float] = {}
        self._json_bias: dict[str, float] = {}

    # ---- lifecycle -------------------------------------------------------------------

    def _argv(self) -> list[str]:
        model = resolve_artifact(self.spec.artifact)
        flags = {
            "model": str(model),
            "served-model-name": self.spec.model_id,
            "max-model-len": self.spec.max_context,
            **KIMI_DEFAULT_FLAGS,
            **self.spec.engine_args,
        }
        return flags_to_argv(flags)

    async def start(self) -> None:
        os.environ.update(self.spec.env)
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        import deployments.engines.vllm.tool_parser  # noqa: F401  registers kimi_k2_bounded

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(self._argv())
        validate_parsed_serve_args(args)
        self._client = await self._stack.enter_async_context(build_async_engine_client(args))
        state = State()
        tasks = await self._client.get_supported_tasks()
        await init_app_state(self._client, state, args, tasks)
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._tokenization = state.serving_tokenization
        from deployments.engines.vllm.tool_parser import control_bias, json_answer_bias

        tokenizer = self._client.get_tokenizer()
        # once, not per request: reading the vocabulary of a 160K-token tokenizer is costly
        vocab = tokenizer.get_vocab()
        self._control_bias = control_bias(tokenizer, vocab)
        self._json_bias = json_answer_bias(vocab)
        log.info("vLLM engine for tier %s is up", self.spec.name)

    async def shutdown(self) -> None:
        await self._stack.aclose()

    async def check_health(self) -> None:
        if self._client is None:
            raise RuntimeError("engine not started")
        await self._client.check_health()

    async def load(self) -> EngineLoad:
        seqs = int(self.spec.engine_args.get("max-num-seqs", 256))
        load = vllm_load_from_registry(self.spec.model_id, seqs)
        load.aborted_total = self.aborted
        # a dead engine core shows at once, not at Serve's next health check: routers
        # send degradable plans elsewhere while Serve replaces this replica
        load.healthy = self._client is not None and not self._client.errored
        return load

    # ---- requests --------------------------------------------------------------------

    # chat and completions return `_serve`'s generator itself: one layer less per token
    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        body = self._prepare_chat(body)
        return self._serve(
            ChatCompletionRequest, body, request_id, self._chat.create_chat_completion
        )

    def completions(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        body = {**body, "model": self.spec.model_id}
        return self._serve(CompletionRequest, body, request_id, self._completion.create_completion)

    async def tokenize(self, body: dict[str, Any], request_id: str) -> AsyncIterator[EngineOutput]:
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest

        prompt = {k: body[k] for k in PROMPT_FIELDS if k in body}
        prompt["messages"] = vllm_history(prompt["messages"])
        async for item in self._serve(
            TokenizeChatRequest,
            {**prompt, "model": self.spec.model_id},
            request_id,
            self._tokenization.create_tokenize,
        ):
            yield token_count(item["count"]) if isinstance(item, dict) else item

    def _prepare_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "model": self.spec.model_id, "messages": vllm_history(body["messages"])}
        json_answer = answer_schema(body) is not None
        budget = reasoning_budget(body, self.spec)
        if budget is not None and thinking_on(body):
            body["thinking_token_budget"] = budget
        if json_answer:
            # xgrammar lets raw control characters into length-bounded JSON strings
            bias = {**self._control_bias, **({} if calls_offered(body) else self._json_bias)}
            body["logit_bias"] = {**bias, **(body.get("logit_bias") or {})}
        return body

    def _failed(self, error: dict[str, Any]) -> EngineError:
        """vLLM's mid-stream error event as ours; a dead engine core is a 503 to retry."""
        if self._client is not None and self._client.errored:
            return engine_down()
        return mid_answer_error(error)

    async def _serve(
        self, model_cls: Any, body: dict[str, Any], request_id: str, handler: Any
    ) -> AsyncIterator[EngineOutput]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError, VLLMServerError

        try:
            request = model_cls.model_validate({**body, "request_id": request_id})
        except ValidationError as exc:
            yield validation_error(exc)
            return
        except VLLMClientError as exc:  # some of vLLM's validators raise this, not ValueError
            yield refusal(400, str(exc), param=getattr(exc, "parameter", None))
            return
        try:
            result = await handler(request, None)
        except VLLMServerError as exc:  # the engine core died (EngineDeadError)
            log.error("engine failed on request %s: %r", request_id, exc)
            yield engine_down()
            return
        except Exception as exc:  # vLLM raises for a few request errors
            log.exception("engine rejected request %s", request_id)
            yield refusal(400, str(exc) or type(exc).__name__)
            return
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The caller went away during a non-streaming request: vLLM aborted it and
            # answered "client disconnected" instead of raising.
            self.aborted += 1
            raise asyncio.CancelledError
        if isinstance(result, ErrorResponse):
            err = result.error
            yield refusal(err.code or 400, err.message, type=err.type, param=err.param)
        elif hasattr(result, "model_dump"):
            yield normalize_response(result.model_dump(mode="json", exclude_none=True))
        else:
            gen = result
            done = False
            try:
                async for chunk in gen:
                    failure = error_event(chunk)
                    yield normalize_sse(chunk) if failure is None else self._failed(failure)
                done = True
            finally:
                if not done:  # the client went away: closing the generator aborts the request
                    self.aborted += 1
                await gen.aclose()


def vllm_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier turns' reasoning as vLLM 0.32's renderer reads it (`reasoning`): its chat
    path maps the `reasoning_content` we (and Kimi's API) answer with, its tokenization
    path does not, so a token count would miss the reasoning the chat prompt holds."""
    return [
        {**m, "reasoning": m["reasoning_content"]}
        if m.get("role") == "assistant" and m.get("reasoning_content") and "reasoning" not in m
        else m
        for m in messages
    ]


def error_event(chunk: str) -> dict[str, Any] | None:
    """The error object of an SSE error event (vLLM's stream reports failures so)."""
    if not chunk.startswith('data: {"error"'):
        return None
    try:
        return json.loads(chunk[6:])["error"]
    except (ValueError, KeyError, TypeError):
        return None


# vLLM's sentences for a prompt past max_model_len: (prompt tokens, context) from each
OVERFLOW = (
    re.compile(r"maximum context length is (?P<ctx>\d+) tokens\. However, your prompt contains "
               r"(?:at least )?(?P<prompt>\d+) input tokens"),
    re.compile(r"prompt \(length (?P<prompt>\d+)\) is longer than the maximum model length of "
               r"(?P<ctx>\d+)"),
)  # fmt: skip


def refusal(status: int, message: str, **fields: Any) -> EngineError:
    """vLLM's refusal of a request as ours; a prompt past the context in the one shape
    every engine gives it (`context_overflow`)."""
    for pattern in OVERFLOW:
        if m := pattern.search(message):
            return context_overflow(int(m["prompt"]), int(m["ctx"]))
    return EngineError(status_code=status, message=message, **fields)


def validation_error(exc: ValidationError) -> EngineError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return EngineError(status_code=400, message=f"{loc}: {first.get('msg')}", param=loc or None)


def vllm_load_from_registry(model_name: str, capacity: int) -> EngineLoad:
    """Read vLLM's own Prometheus gauges for this engine from the process registry."""
    from prometheus_client import REGISTRY

    values: dict[str, float] = {}
    wanted = {
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv",
        "vllm:generation_tokens_total": "generated",
    }
    # only these metrics' collectors: the whole registry's every vLLM histogram, collected
    # twice a second, was 2-3 % of a busy premium replica's profile samples
    for metric in REGISTRY.restricted_registry(list(wanted)).collect():
        for sample in metric.samples:
            key = wanted.get(sample.name)
            if not key or sample.labels.get("model_name", model_name) != model_name:
                continue
            values[key] = values.get(key, 0.0) + sample.value
    return EngineLoad(
        running=int(values.get("running", 0)),
        waiting=int(values.get("waiting", 0)),
        kv_cache_usage=float(values.get("kv", 0.0)),
        capacity=capacity,
        generated_tokens_total=int(values.get("generated", 0)),
    )
