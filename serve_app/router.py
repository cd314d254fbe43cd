"""The ingress deployment: OpenAI-compatible HTTP API in front of the tier deployments.

Per request: read and validate the body, authenticate the caller (API key -> plan),
pick a tier the plan allows, admit against the caller's limits and budgets (the
cluster-wide gateway actor), call the tier's replica through its Ray Serve handle, relay
the answer (JSON, or SSE chunks as they come) with its cost, and settle the usage record.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments import tracing
from deployments.engine import Endpoint, EngineError
from deployments.loadboard import TierLoad, board
from deployments.tier import Served
from serve_app.config import BASE_MODEL, AppConfig, Plan, Strategy, TierEntry
from serve_app.detached import DetachedCalls
from serve_app.errors import APIError
from serve_app.gateway import ANONYMOUS, Caller, gateway_handle, state_dir
from serve_app.keys import KeyOverrides, hash_key, split_key
from serve_app.limits import Denial
from serve_app.measured import measured_accuracy
from serve_app.metering import RequestLabels
from serve_app.openapi import with_bodies
from serve_app.relay import (
    MeteredStreamingResponse,
    RequestMeter,
    StreamSettlement,
    UndeliveredStreams,
    add_cost,
    relay_stream,
    timeout_error,
)
from serve_app.routing import (
    LatencyWindow,
    Live,
    LoadPolicy,
    Needs,
    candidate_tiers,
    choose_tier,
    estimate_tokens,
)
from serve_app.schemas import UNION_TAGS, ChatRequest, CompletionRequest, canonical_body
from serve_app.telemetry import RouterMetrics

log = logging.getLogger("serve_app.router")

app = FastAPI(title="Kimi K2.5 tiered serving", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return APIError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")  # the trace goes to the log, never to the client
    return APIError(500, "internal error; the request was not served").response()


# Helpers stand above the deployment class: Ray pickles the class when it is decorated,
# so names defined after it would be missing in the replica.


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    # A union (content: str | parts) reports one error per branch; the deepest says
    # what is wrong, and the branches' type tags ("str", "list[...]") are no field names.
    err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    parts = err.get("loc", ())
    loc = ".".join(
        str(p) for i, p in enumerate(parts) if not is_tag(p, parts[i - 1] if i else None)
    )
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


# Deeper bodies would overflow the recursion of the validators, Ray's serializer or an
# engine's parser downstream; real tool and response schemas stay far below this.
MAX_JSON_DEPTH = 64


def json_depth(value: dict | list) -> int:
    """How many objects and arrays deep `value` nests (1 for a flat object)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def not_json(constant: str) -> None:
    # Python's json takes NaN and Infinity, which JSON does not: an engine would choke on them
    raise ValueError(f"{constant} is not JSON")


def is_tag(part: object, before: object) -> bool:
    """Whether a location part names a union's branch, not a field: a type ("str",
    "list[...]"), or the tag of a tagged union's item (a message's role)."""
    if not isinstance(part, str):
        return False
    return (
        "[" in part
        or part in ("str", "int", "float", "bool")
        or (isinstance(before, int) and part in UNION_TAGS)
    )


def needs_of(parsed: Any, body_bytes: int) -> Needs:
    # The whole body stands for the prompt: messages, tools and schema all reach it.
    context = estimate_tokens(body_bytes) + (parsed.output_limit or 0)
    if not isinstance(parsed, ChatRequest):
        return Needs(context_tokens=context)
    fmt = parsed.response_format.type if parsed.response_format else None
    return Needs(
        tools=bool(parsed.tools) and parsed.tool_choice != "none",
        thinking=parsed.thinking,
        vision=parsed.wants_vision,
        json_schema=fmt in ("json_schema", "json_object"),
        context_tokens=context,
    )


def affinity_key(request: Request, body: dict[str, Any]) -> str:
    """Which conversation a request continues, so its tier sends it to the replica that
    holds the conversation's prefix: the client's session id if it sends one, else a
    digest of the conversation's opening (system prompt and first user turn), which
    every later turn repeats."""
    session = request.headers.get("x-session-id")
    if session:
        return f"s:{session[:200]}"
    opening = body.get("messages", [])[:2] if "messages" in body else body.get("prompt")
    raw = json.dumps(opening, sort_keys=True, default=str)[:4096]
    return "p:" + hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def denial_error(denial: Denial) -> APIError:
    headers = {}
    if denial.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(denial.retry_after_s)))
    return APIError(denial.status, denial.message, code=denial.code, headers=headers)


class NewKey(BaseModel):
    model_config = ConfigDict(strict=True)  # `"expires_at": false` is no time

    plan: str = Field(min_length=1)
    name: str = Field("", max_length=200)
    overrides: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    expires_at: float | None = Field(None, description="Unix time; in the future")

    @field_validator("expires_at")
    @classmethod
    def _future(cls, v: float | None) -> float | None:
        if v is not None and v <= time.time():
            raise ValueError("expires_at is not in the future")
        return v


app.openapi = with_bodies(  # type: ignore[method-assign]
    app,
    {
        ("/v1/chat/completions", "post"): ChatRequest,
        ("/v1/completions", "post"): CompletionRequest,
        ("/admin/keys", "post"): NewKey,
    },
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Router:
    async def __init__(self, config: dict[str, Any], tiers: dict[str, DeploymentHandle]) -> None:
        self.config = AppConfig.model_validate(config)
        self.tiers = tiers
        gw = self.config.gateway
        plans = {name: p.model_dump(mode="json") for name, p in self.config.plans.items()}
        self.gateway = gateway_handle(
            state_dir(gw.state_dir), plans, gw.meter_batch_size, gw.meter_flush_interval_s
        )
        token = os.environ.get(gw.admin_token_env)
        self._admin_hash = hash_key(token) if token else None
        self.replica = serve.get_replica_context().replica_id.unique_id
        r = self.config.router
        self.policy = LoadPolicy(
            r.overload_pressure, r.shed_pressure, r.shed_below_priority, r.strategy
        )
        self.board = board()
        self.loads: dict[str, TierLoad] = {}
        self.sent: collections.Counter[str] = collections.Counter()
        self.ttft = LatencyWindow()
        self.ttft_p90: dict[str, float] = {}  # read with the loads, not sorted per request
        self.undelivered = UndeliveredStreams()
        self.calls = DetachedCalls()
        self.metrics = RouterMetrics()
        self.tracer = tracing.tracer("kimi-router")
        self.accuracy = measured_accuracy(self.config.tiers)
        self._refresher = asyncio.create_task(self._refresh_loads())

    async def _refresh_loads(self) -> None:
        """Keep the tiers' engine figures fresh for routing, off the request path."""
        while True:
            try:
                self.loads = await self._snapshot()
                self.sent = collections.Counter()
                self.ttft_p90 = self.ttft.p90_ms()
                self.metrics.observe_loads(self.loads)
                if reaped := await self.undelivered.reap():
                    log.warning("settled %d streams whose response never started", reaped)
            except Exception:
                log.exception("reading tier loads failed")
            await asyncio.sleep(self.config.router.load_refresh_s)

    async def _give_back(self, admission: Any) -> None:
        if not isinstance(admission, Denial):
            await self.gateway.settle.remote(admission.ticket, None)

    async def _snapshot(self) -> dict[str, TierLoad]:
        return await asyncio.wait_for(self.board.snapshot.remote(), timeout=5)

    def _policy(self, request: Request) -> LoadPolicy:
        asked = request.headers.get("x-kimi-routing-strategy")
        if not asked or not self.config.router.allow_strategy_header:
            return self.policy
        if asked not in get_args(Strategy):
            raise APIError(
                400, f"unknown routing strategy {asked!r}", param="x-kimi-routing-strategy"
            )
        return dataclasses.replace(self.policy, strategy=asked)

    # ---- request plumbing ------------------------------------------------------------

    async def _body(self, request: Request, model_cls: type[BaseModel]) -> tuple[dict, Any, int]:
        limit = self.config.router.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes")
        try:
            body = json.loads(raw, parse_constant=not_json)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        if json_depth(body) > MAX_JSON_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            parsed = model_cls.model_validate(body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise APIError(400, message, param=param) from None
        return canonical_body(parsed), parsed, len(raw)

    async def _caller(self, request: Request) -> Caller:
        key = bearer(request)
        anon = self.config.router.anonymous_plan
        if key is not None and anon is not None and split_key(key) is None:
            # Where key-less use is allowed, a placeholder that is not one of our keys
            # (SDKs insist on some api_key) is served as anonymous; a wrong sk-kimi- key
            # is still refused.
            key = None
        if key is None:
            if anon is None:
                raise APIError(
                    401,
                    "an API key is required: Authorization: Bearer <key>",
                    code="invalid_api_key",
                )
            return Caller(ANONYMOUS, anon, KeyOverrides())
        result = await self.gateway.authenticate.remote(key)
        if isinstance(result, Denial):
            raise denial_error(result)
        return result

    def _output_limit(self, body: dict, parsed: Any, plan: Plan, caller: Caller) -> int:
        """Enforce the plan's max output; fill it in when the request sets none."""
        cap = caller.overrides.max_output_tokens or plan.max_output_tokens
        asked = parsed.output_limit
        if cap is not None and asked is not None and asked > cap:
            raise APIError(400, f"max_tokens exceeds the plan's limit of {cap}", param="max_tokens")
        if cap is not None and asked is None:
            body["max_tokens"] = asked = cap
        floor = parsed.min_tokens
        if floor is not None and asked is not None and floor > asked:
            raise APIError(400, f"min_tokens exceeds max_tokens ({asked})", param="min_tokens")
        return asked or self.config.gateway.default_output_estimate

    async def _dispatch(
        self, request: Request, kind: Endpoint, model_cls: type[BaseModel]
    ) -> Response:
        with self.tracer.start_as_current_span("router.request") as span:
            try:
                response = await self._dispatch_traced(request, kind, model_cls, span)
            except APIError as exc:
                span.set_attribute("http.status_code", exc.status)
                exc.headers.setdefault("x-kimi-router", self.replica)
                raise
            span.set_attribute("http.status_code", response.status_code)
            return response

    async def _dispatch_traced(
        self, request: Request, kind: Endpoint, model_cls: type[BaseModel], span: Any
    ) -> Response:
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        body, parsed, size = await self._body(request, model_cls)
        caller = await self._caller(request)
        plan = self.config.plans[caller.plan]
        needs = needs_of(parsed, size)
        candidates = candidate_tiers(parsed.model, plan, caller.plan, self.config, needs)
        live = Live(self.loads, self.ttft_p90, self.sent)
        decision = choose_tier(candidates, live, plan, self._policy(request))
        if decision.shed:
            self.metrics.shed.inc(1, {"plan": caller.plan})
            raise APIError(
                503,
                "the service is saturated; lower-priority plans are shed first",
                code="overloaded",
                headers={"retry-after": "2"},
            )
        tier = decision.tier
        self.sent[tier.name] += 1
        span.set_attributes(
            {
                "kimi.plan": caller.plan,
                "kimi.tier": tier.name,
                "kimi.degraded": decision.degraded,
                "kimi.request_id": request_id,
            }
        )
        out_est = self._output_limit(body, parsed, plan, caller)
        prompt_est = size // 4  # ~4 bytes a token; settled with the real count later
        cost_est = tier.price.cost(prompt_est, out_est)
        admission = await self.calls.call(
            lambda: self.gateway.admit.remote(caller, prompt_est + out_est, cost_est),
            on_abandon=self._give_back,
        )
        if isinstance(admission, Denial):
            raise denial_error(admission)
        labels = RequestLabels(
            request_id=request_id,
            key_id=caller.key_id,
            plan=caller.plan,
            tier=tier.name,
            model=parsed.model,
            endpoint=kind.value,
            stream=bool(body.get("stream")),
            degraded=decision.degraded,
        )
        meter = RequestMeter(labels=labels, price=tier.price)
        # Ray Serve's proxy echoes x-request-id (ours comes from it), so it is not repeated.
        headers = {
            "x-kimi-tier": tier.name,
            "x-kimi-router": self.replica,
            **admission.headers,
        }
        if decision.degraded:
            headers["x-kimi-degraded"] = f"{candidates[0].name}->{tier.name}"

        async def settle(record: Any) -> None:
            self.metrics.observe(record)
            if record.ttft_ms is not None:
                self.ttft.observe(record.tier, record.ttft_ms)
            await self.calls.call(lambda: self.gateway.settle.remote(admission.ticket, record))

        timeout_s = caller.overrides.request_timeout_s or plan.request_timeout_s
        affinity = affinity_key(request, body)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        others = [c for c in candidates if c is not tier]
        try:
            while True:
                outcome = await self._call_tier(
                    tier,
                    kind,
                    body,
                    meter,
                    settle,
                    headers,
                    affinity,
                    timeout_s,
                    wants_usage,
                    may_move=bool(others),
                )
                if isinstance(outcome, Response):
                    return outcome
                # The tier's engine failed before producing anything: the client has seen
                # nothing, so the next tier the plan allows serves it (health first).
                failed = tier.name
                live = Live(self.loads, self.ttft_p90, self.sent)
                tier = choose_tier(others, live, plan, self._policy(request)).tier
                others = [c for c in others if c is not tier]
                log.warning("tier %s down for %s; moved to %s", failed, request_id, tier.name)
                self.sent[tier.name] += 1
                labels = labels.model_copy(update={"tier": tier.name, "degraded": True})
                meter = RequestMeter(labels=labels, price=tier.price, started=meter.started)
                headers.update(
                    {
                        "x-kimi-tier": tier.name,
                        "x-kimi-retried": "1",
                        "x-kimi-degraded": f"{candidates[0].name}->{tier.name}",
                    }
                )
        except BaseException:
            await asyncio.shield(settle(meter.record(500, "router error")))
            raise

    async def _call_tier(
        self,
        tier: TierEntry,
        kind: Endpoint,
        body: dict,
        meter: RequestMeter,
        settle: Any,
        headers: dict[str, str],
        affinity: str,
        timeout_s: float | None,
        wants_usage: bool,
        may_move: bool,
    ) -> Response | EngineError:
        """The tier's answer, settled; or, where `may_move`, the engine's 503 for a request
        it failed before producing anything, unsettled, for the caller to send elsewhere."""
        if meter.labels.stream:  # the engine always reports usage so the stream can be metered
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        handle = self.tiers[tier.name].options(stream=True)
        deadline = None if timeout_s is None else meter.started + timeout_s
        for attempt in (1, 2):
            gen = getattr(handle, kind.value).remote(
                body, meter.labels.request_id, tracing.inject(), affinity=affinity
            )
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                first = await asyncio.wait_for(gen.__anext__(), left)
                break
            except TimeoutError:
                gen.cancel()
                err = timeout_error(timeout_s or 0)
                await settle(meter.record(504, err.message))
                return JSONResponse(err.body(), 504, headers=headers)
            except RayActorError as exc:
                if attempt == 1:
                    # The replica died before answering: the client has seen nothing, so
                    # once more (Serve routes to a live replica, or waits for its restart).
                    log.warning(
                        "tier %s replica lost, retrying %s: %r",
                        tier.name,
                        meter.labels.request_id,
                        exc,
                    )
                    headers["x-kimi-retried"] = "1"
                    continue
                return await self._unavailable(tier, meter, settle, headers, exc)
            except RayTaskError as exc:  # the tier's code raised: a defect, not an outage
                log.error("tier %s failed on %s: %r", tier.name, meter.labels.request_id, exc)
                await settle(meter.record(500, "tier error"))
                err = APIError(500, "internal error; the request was not served")
                return err.response(headers)
            except Exception as exc:
                return await self._unavailable(tier, meter, settle, headers, exc)
        if isinstance(first, Served):
            headers["x-kimi-replica"] = first.replica
            first = first.output
        if isinstance(first, EngineError):
            if may_move and first.status_code == 503:
                return first
            await settle(meter.record(first.status_code, first.message))
            return JSONResponse(first.body(), first.status_code, headers=headers)
        if isinstance(first, dict):
            meter.first_at = time.monotonic()
            cost = add_cost(first, meter)
            await settle(meter.record(200))
            return JSONResponse(first, headers={**headers, "x-kimi-cost-usd": f"{cost:.9f}"})
        state = StreamSettlement(meter, settle, gen)
        self.undelivered.add(state)
        return MeteredStreamingResponse(
            relay_stream(first, state, wants_usage, timeout_s),
            state,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )

    async def _unavailable(
        self, tier: TierEntry, meter: RequestMeter, settle: Any, headers: dict, exc: Exception
    ) -> Response:
        log.error("tier %s call failed: %r", tier.name, exc)
        await settle(meter.record(503, repr(exc)))
        return APIError(
            503, "the tier is unavailable; retry shortly", headers={"retry-after": "5"}
        ).response(headers)

    # ---- public routes ---------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._dispatch(request, Endpoint.CHAT, ChatRequest)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._dispatch(request, Endpoint.COMPLETIONS, CompletionRequest)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        created = int(time.time())
        data: list[dict[str, Any]] = [
            {"id": BASE_MODEL, "object": "model", "created": created, "owned_by": "kimi-serve"}
        ]
        for tier in self.config.tiers:
            data.append(
                {
                    "id": tier.model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "kimi-serve",
                    "max_model_len": tier.max_context,
                    "engine": tier.engine,
                    "quantization": tier.quantization_label,
                    "capabilities": tier.capabilities.model_dump(),
                    "measured": self.accuracy.get(tier.name),
                    "pricing": tier.price.model_dump(),
                }
            )
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Ready while some tier has a healthy replica. A tier at zero replicas whose
        catalogue allows zero is `"idle"`: ready, it starts on the next request."""
        loads = await self._snapshot()
        tiers: dict[str, bool | str] = {}
        for entry in self.config.tiers:
            load = loads.get(entry.name)
            if load is not None and load.replicas > 0:
                tiers[entry.name] = load.healthy
            else:
                tiers[entry.name] = "idle" if entry.autoscaling.min_replicas == 0 else False
        ok = any(v is True for v in tiers.values())
        return JSONResponse({"ready": ok, "tiers": tiers}, 200 if ok else 503)

    @app.get("/status")
    async def status(self) -> dict[str, Any]:
        """Live engine figures per tier, summed over its replicas (each listed under
        `members`), as the replicas last reported them (every 0.5 s)."""
        loads = await self._snapshot()
        return {
            "tiers": {
                name: (loads[name].model_dump() if name in loads else None) for name in self.tiers
            }
        }

    # ---- admin routes (separate credential) ------------------------------------------

    def _admin(self, request: Request) -> None:
        if self._admin_hash is None:
            raise APIError(
                403, f"the admin API is disabled: set {self.config.gateway.admin_token_env}"
            )
        token = bearer(request) or ""
        if not hmac.compare_digest(hash_key(token), self._admin_hash):
            raise APIError(401, "invalid admin credential", code="invalid_admin_key")

    @app.post("/admin/keys", status_code=201)
    async def create_key(self, request: Request) -> JSONResponse:
        self._admin(request)
        _, spec, _ = await self._body(request, NewKey)
        try:
            key, info = await self.gateway.create_key.remote(
                spec.plan, spec.name, spec.overrides, spec.metadata, spec.expires_at
            )
        except Exception as exc:  # ray wraps the actor's ValueError
            cause = getattr(exc, "cause", exc)
            raise APIError(400, str(cause), param="plan") from None
        return JSONResponse({"key": key, **info.model_dump()}, 201)

    @app.get("/admin/keys")
    async def list_keys(self, request: Request) -> dict[str, Any]:
        self._admin(request)
        keys = await self.gateway.list_keys.remote()
        return {"object": "list", "data": [k.model_dump() for k in keys]}

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(self, key_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        if not await self.gateway.revoke_key.remote(key_id):
            raise APIError(404, f"no active key {key_id!r}", param="key_id")
        return {"key_id": key_id, "revoked": True}

    @app.post("/admin/usage/flush")
    async def flush_usage(self, request: Request) -> dict[str, bool]:
        self._admin(request)
        await self.gateway.flush.remote()
        return {"flushed": True}
