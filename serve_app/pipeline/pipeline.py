"""The request pipeline, the same for every wire format.

From a canonical, validated request to a result: the caller and plan, the tier by plan
and live load, admission against the caller's limits and budgets, the tier call (one
retry if the replica was lost, the plan's next tier if the engine failed before any
token), and settlement: every request admitted leaves exactly one usage record, however
it ends. Results are typed values (`Completed`, `Streamed`); refusals are `APIError`s.
Adapters (`serve_app/api/`) turn wire requests into `Inbound` and results back into
their format; this module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn, get_args

from opentelemetry.trace import Span

from deployments import tracing
from deployments.engines.openai_shape import output_limit
from deployments.protocol import Endpoint, EngineError
from deployments.scheduling.loadboard import STALE_AFTER_S, RouterReport, TierLoad
from deployments.streaming import Served
from serve_app.actors import DetachedCalls
from serve_app.canonical import ChatRequest
from serve_app.config import AppConfig, Strategy
from serve_app.errors import APIError
from serve_app.gateway.protocol import (
    ANONYMOUS,
    Admission,
    Ask,
    Caller,
    Denial,
    Gateway,
    GatewayUnavailable,
    KeyOverrides,
    Lease,
    RequestLabels,
    UsageRecord,
    ours,
)
from serve_app.pipeline.bands import served_band
from serve_app.pipeline.media import prepare_images
from serve_app.pipeline.open_requests import OpenRequests
from serve_app.pipeline.output_limits import (
    clamp_output,
    fill_output_limit,
    lower_output_limit,
    refuse_past_cap,
)
from serve_app.pipeline.relay import (
    RequestMeter,
    SilentReplicas,
    StreamRelay,
    StreamSettlement,
    UndeliveredStreams,
    add_cost,
    timeout_error,
)
from serve_app.pipeline.request import (
    Completed,
    Inbound,
    RequestContext,
    Result,
    Route,
    Streamed,
    price_of,
    session_of,
)
from serve_app.pipeline.telemetry import IngressMetrics
from serve_app.routing.fair_queue import QueueFull, QueueTimeout, TierGates
from serve_app.routing.tier_calls import ReplicaLost, TierCall, TierFault, TierRequest, Tiers
from serve_app.routing.tier_choice import (
    LatencyWindow,
    Live,
    LoadPolicy,
    candidate_tiers,
    choose_tier,
    lacking_tiers,
    needs_of,
)

log = logging.getLogger("serve_app.pipeline.pipeline")


class NothingServed(Exception):
    """The engine failed before producing anything (its 503): the request may move."""

    def __init__(self, error: EngineError) -> None:
        super().__init__(error.message)
        self.error = error


def affinity_key(session: str | None, body: dict[str, Any]) -> str:
    """Which conversation a request continues, so its tier sends it to the replica that
    holds the conversation's prefix: the client's session id if it sends one, else a
    digest of the conversation's opening (system prompt and first user turn), which
    every later turn repeats."""
    if session:
        return f"s:{session[:200]}"
    opening = body.get("messages", [])[:2] if "messages" in body else body.get("prompt")
    raw = json.dumps(opening, sort_keys=True, default=str)[:4096]
    return "p:" + hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def gateway_error() -> APIError:
    return APIError(
        503,
        "the gateway (keys, limits, metering) is restarting; retry shortly",
        code="gateway_unavailable",
        headers={"retry-after": "2"},
    )


def denial_error(denial: Denial) -> APIError:
    headers = dict(denial.headers)
    if denial.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(denial.retry_after_s)))
    return APIError(denial.status, denial.message, code=denial.code, headers=headers)


class Pipeline:
    def __init__(
        self,
        config: AppConfig,
        tiers: Tiers,
        gateway: Gateway,
        replica: str,
        metrics: IngressMetrics,
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.gateway = gateway
        self.replica = replica
        self.metrics = metrics
        r = config.router
        self.policy = LoadPolicy(
            r.overload_pressure, r.shed_pressure, r.shed_below_priority, r.strategy
        )
        self.loads: dict[str, TierLoad] = {}
        self.sent: collections.Counter[str] = collections.Counter()
        self.ttft = LatencyWindow()
        self.ttft_p90: dict[str, float] = {}  # read with the loads, not sorted per request
        self.undelivered = UndeliveredStreams()
        self.silent = SilentReplicas(r.stream_stall_s)
        self.refreshed_at = time.monotonic()  # when the load board last answered
        self.calls = DetachedCalls()
        # records the gateway could not take yet (it was restarting), oldest first
        self.unsettled: collections.deque[tuple[str, UsageRecord]] = collections.deque()
        self._resettling: asyncio.Task[None] | None = None
        self.open = OpenRequests(replica)  # leased to the gateway until settled
        self._renewing: asyncio.Task[None] | None = None
        self.tracer = tracing.tracer("kimi-router")
        order = config.router.fair_queue
        self.gates = None if order == "off" else TierGates(order, r.num_replicas)

    async def refresh(self, loads: dict[str, TierLoad]) -> None:
        """New tier figures (the ingress reads them every `load_refresh_s`)."""
        self.loads = loads
        self.refreshed_at = time.monotonic()
        self.sent = collections.Counter()
        self.ttft_p90 = self.ttft.p90_ms()
        self.metrics.observe_loads(loads)
        if self.gates is not None:
            for name, load in loads.items():
                share = self.config.tier(name).fair_share
                self.gates.resize(
                    name, load.capacity, load.replicas, share.shared_in_flight, share.max_queued
                )
                gate = self.gates.gate(name)
                gate.elsewhere = frozenset(load.active_keys)
                gate.sessions_elsewhere = {
                    key: frozenset(named) for key, named in load.active_sessions.items()
                }
                for band, waiting in gate.queued_by_band().items():
                    self.metrics.queues.waiting.set(waiting, {"tier": name, "band": band})
                fairness = gate.fairness()
                self.metrics.queues.fairness.set(
                    1.0 if fairness is None else fairness, {"tier": name}
                )
        self._sweep_silent({m.replica for load in loads.values() for m in load.members})
        if reaped := await self.undelivered.reap():
            log.warning("settled %d streams whose response never started", reaped)
        if self.unsettled and (self._resettling is None or self._resettling.done()):
            self._resettling = asyncio.create_task(self._resettle())
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self.open.renew(self.gateway))

    def board_unanswered(self) -> None:
        """The load board did not answer. Past its own staleness no replica counts as
        reporting, so streams silent past the stall bound still end: the board's node
        may be the one gone silent."""
        if time.monotonic() - self.refreshed_at > STALE_AFTER_S:
            self._sweep_silent(set())

    def _sweep_silent(self, reporting: set[str]) -> None:
        if stalled := self.silent.sweep(reporting):
            log.warning("ended %d streams whose tier replica fell silent", stalled)

    def queue_report(self) -> RouterReport:
        """What this router's fair queues hold, for the load board."""
        if self.gates is None:
            return RouterReport()
        return RouterReport(
            queued=self.gates.queued(),
            active_keys=self.gates.active_keys(),
            active_sessions=self.gates.active_sessions(),
            fairness=self.gates.fairness(),
        )

    def _live(self) -> Live:
        """What tier choice sees: the engines' figures, what waits at the routers for a
        full tier (so a degradable plan spills past it), and what this router sent since."""
        queued = {name: load.queued for name, load in self.loads.items()}
        return Live(self.loads, self.ttft_p90, self.sent, queued)

    # ---- the request -----------------------------------------------------------------

    async def serve(self, inbound: Inbound) -> Result:
        """Admit the request and serve it."""
        with self._request_span() as span:
            return await self._run(await self.admit(inbound), span)

    async def serve_admitted(self, ctx: RequestContext) -> Result:
        """Serve a request `admit` let in earlier (a background response's run)."""
        with self._request_span() as span:
            return await self._run(ctx, span)

    async def admit(self, inbound: Inbound) -> RequestContext:
        """The request identified, checked, routed and admitted, not sent yet: a refusal
        (401, 429, 402...) comes from here. What `admit` returns must be served or
        handed back (`withdraw`)."""
        caller = inbound.caller or await self.identify(inbound.api_key)
        if inbound.endpoint is Endpoint.CHAT:
            self.metrics.observe_reasoning(inbound.api, inbound.body, inbound.opened)
        inbound = await self._prepared(inbound)
        if inbound.clamp_output:
            clamp_output(self.config, inbound, caller)
        else:
            refuse_past_cap(self.config, inbound, caller)
        route = self._route(inbound, caller)
        meter = self._meter(inbound, route)
        admission = await self._admit(inbound, route, self.open.lease(meter))
        self.open.add(admission.ticket, meter)
        return self._context(inbound, route, admission, meter)

    async def withdraw(self, ctx: RequestContext, status: int, reason: str) -> None:
        """Settle an admitted request that will not be served: its record says why,
        nothing is billed."""
        if not ctx.settled:
            await self._settle(ctx, ctx.meter.record(status, reason))

    @contextlib.contextmanager
    def _request_span(self) -> Iterator[Span]:
        with self.tracer.start_as_current_span("router.request") as span:
            try:
                yield span
            except APIError as exc:
                span.set_attribute("http.status_code", exc.status)
                exc.headers.setdefault("x-kimi-router", self.replica)
                raise
            span.set_attribute("http.status_code", 200)

    async def _run(self, ctx: RequestContext, span: Span) -> Result:
        route = ctx.route
        span.set_attributes(
            {
                "kimi.plan": route.caller.plan,
                "kimi.tier": route.tier.name,
                "kimi.degraded": route.degraded,
                "kimi.request_id": ctx.id,
            }
        )
        try:
            return await self._with_failover(ctx)
        except BaseException:
            if not ctx.settled:
                await asyncio.shield(self._settle(ctx, ctx.meter.record(500, "router error")))
            raise

    async def _prepared(self, inbound: Inbound) -> Inbound:
        """The request with its images checked and counted, and the model card's sampling
        where the client set none."""
        if not isinstance(inbound.request, ChatRequest):
            return inbound
        if inbound.endpoint is Endpoint.CHAT:
            defaults = self.config.generation_defaults
            sampling = defaults.thinking if inbound.request.thinking else defaults.instant
            inbound.body.setdefault("temperature", sampling.temperature)
            inbound.body.setdefault("top_p", sampling.top_p)
        if not inbound.request.wants_vision:
            return inbound
        media = await prepare_images(inbound.body, self.config.media)
        return dataclasses.replace(inbound, media=media)

    def _route(self, inbound: Inbound, caller: Caller) -> Route:
        """The tiers the caller's plan allows for this request, and the one to try first;
        a refusal if none can serve it, or if the plan is shed under load."""
        plan = self.config.plans[caller.plan]
        needs = needs_of(inbound.request, inbound.prompt_floor(), output_limit(inbound.body))
        candidates = candidate_tiers(inbound.request.model, plan, caller.plan, self.config, needs)
        policy = self._policy(inbound.strategy)
        decision = choose_tier(candidates, self._live(), plan, policy)
        if decision.shed:
            self.metrics.shed.inc(1, {"plan": caller.plan})
            raise APIError(
                503,
                "the service is saturated; lower-priority plans are shed first",
                code="overloaded",
                headers={"retry-after": "2"},
            )
        self.sent[decision.tier.name] += 1
        lacking = lacking_tiers(inbound.request.model, plan, caller.plan, self.config, needs)
        skipped = tuple(f"{tier.name} (no {what})" for tier, what in lacking)
        band = served_band(inbound.service_tier, plan)
        return Route(
            caller,
            plan,
            policy,
            candidates,
            decision.tier,
            decision.degraded,
            skipped,
            band,
            self.config.service_tiers.band(band),
        )

    async def _admit(self, inbound: Inbound, route: Route, lease: Lease) -> Admission:
        default = self.config.gateway.default_output_estimate
        out_est = fill_output_limit(inbound, route.plan, route.caller, default)
        prompt_est = inbound.prompt_estimate()  # settled with the real count
        ticket = uuid.uuid4().hex  # admission and settlement are idempotent by it
        if inbound.endpoint is Endpoint.TOKENIZE:  # counting a prompt spends no budget
            ask = Ask(0, 0.0)
        else:
            price = price_of(inbound, route.tier, route.terms)
            ask = Ask(
                tokens=prompt_est + out_est,
                cost=price.cost(prompt_est, out_est),
                session=session_of(inbound),
                # the most it can cost, for its session's caps: a token is at least a
                # byte of the body's text
                prompt_bound=inbound.text_bytes + inbound.media.tokens,
                output_bound=output_limit(inbound.body),
                price=price,
            )
        try:
            admission = await self.calls.call(
                lambda: self.gateway.admit(route.caller, ask, ticket, lease),
                on_abandon=self._give_back,
            )
        except GatewayUnavailable:
            raise gateway_error() from None
        if isinstance(admission, Denial):
            raise denial_error(admission)
        if admission.max_output is not None:  # lowered to fit its session's caps
            lower_output_limit(inbound.body, admission.max_output)
        return admission

    def _meter(self, inbound: Inbound, route: Route) -> RequestMeter:
        tier, caller = route.tier, route.caller
        labels = RequestLabels(
            request_id=inbound.request_id,
            key_id=caller.key_id,
            plan=caller.plan,
            tier=tier.name,
            model=inbound.request.model,
            endpoint=inbound.endpoint.value,
            stream=bool(inbound.body.get("stream")),
            degraded=route.degraded,
            api=inbound.api,
            session_id=session_of(inbound),
            service_tier=route.band,
        )
        return RequestMeter(labels=labels, price=price_of(inbound, tier, route.terms))

    def _context(
        self, inbound: Inbound, route: Route, admission: Admission, meter: RequestMeter
    ) -> RequestContext:
        tier, caller = route.tier, route.caller
        # Ray Serve's HTTP ingress echoes x-request-id (ours comes from it): not repeated.
        headers = {
            "x-kimi-tier": tier.name,
            "x-kimi-router": self.replica,
            "x-kimi-service-tier": route.band,
            **admission.headers,
        }
        if route.degraded:
            headers["x-kimi-degraded"] = f"{route.candidates[0].name}->{tier.name}"
        if route.skipped:
            headers["x-kimi-tiers-skipped"] = ", ".join(route.skipped)
        asked, granted = inbound.request.output_limit, output_limit(inbound.body)
        if asked is not None and granted is not None and granted < asked:
            headers["x-kimi-max-tokens-clamped"] = f"{asked}->{granted}"
        return RequestContext(
            inbound=inbound,
            route=route,
            tier=tier,
            meter=meter,
            admission=admission,
            headers=headers,
            timeout_s=caller.overrides.request_timeout_s or route.plan.request_timeout_s,
            wants_usage=bool((inbound.body.get("stream_options") or {}).get("include_usage")),
            others=[c for c in route.candidates if c is not tier],
        )

    async def _with_failover(self, ctx: RequestContext) -> Result:
        while True:
            try:
                return await self._call_tier(ctx)
            except NothingServed:
                # The client has seen nothing, so the next tier the plan allows serves it
                # (health first).
                failed = ctx.tier.name
                route = ctx.route
                ctx.move_to(choose_tier(ctx.others, self._live(), route.plan, route.policy).tier)
                log.warning("tier %s down for %s; moved to %s", failed, ctx.id, ctx.tier.name)
                self.sent[ctx.tier.name] += 1

    async def _call_tier(self, ctx: RequestContext) -> Result:
        """The tier's answer, settled (a stream settles as it ends); `NothingServed`
        where the engine failed before any output and another tier may take it."""
        await self._wait_turn(ctx)
        first, call = await self._first_message(ctx)
        if isinstance(first, Served):
            ctx.headers["x-kimi-replica"] = first.replica
            first = first.output
        if isinstance(first, EngineError):
            if ctx.others and first.status_code == 503:
                ctx.leave_queue()
                raise NothingServed(first)
            await self._refuse(ctx, first)
        if isinstance(first, dict):
            ctx.meter.first_at = time.monotonic()
            cost = add_cost(first, ctx.meter)
            await self._settle(ctx, ctx.meter.record(200))
            return Completed(first, {**ctx.headers, "x-kimi-cost-usd": f"{cost:.9f}"})
        return self._stream(ctx, first, call)

    async def _first_message(self, ctx: RequestContext) -> tuple[Any, TierCall]:
        """Call the tier and wait for its first message, within the plan's time limit;
        once more if the replica was lost before answering (the client has seen nothing;
        Serve routes to a live replica, or waits for its restart)."""
        body = ctx.inbound.body
        if ctx.meter.labels.stream:  # engines always report usage so a stream is metered
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        deadline = None if ctx.timeout_s is None else ctx.meter.started + ctx.timeout_s
        for attempt in (1, 2):
            call = self.tiers.call(self._tier_request(ctx))
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                return await asyncio.wait_for(call.__anext__(), left), call
            except TimeoutError:
                call.cancel()
                await self._refuse(ctx, timeout_error(ctx.timeout_s or 0))
            except ReplicaLost as exc:
                if attempt == 2:
                    await self._unavailable(ctx, exc)
                log.warning("tier %s replica lost, retrying %s: %s", ctx.tier.name, ctx.id, exc)
                ctx.headers["x-kimi-retried"] = "1"
            except TierFault as exc:
                log.error("tier %s failed on %s: %s", ctx.tier.name, ctx.id, exc)
                await self._settle(ctx, ctx.meter.record(500, "tier error"))
                raise APIError(
                    500,
                    "internal error; the request was not served",
                    headers=ctx.headers,
                ) from None
            except Exception as exc:
                await self._unavailable(ctx, exc)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _wait_turn(self, ctx: RequestContext) -> None:
        """Wait at this router while the tier is full, in fair-share order (a 503 with
        `Retry-After` past the wait allowed), and hold the place until settlement. A
        token count generates nothing: it does not queue."""
        if self.gates is None or ctx.inbound.endpoint is Endpoint.TOKENIZE:
            return
        wait = self.config.router.max_queue_wait_s
        if ctx.timeout_s is not None:
            wait = min(wait, max(ctx.meter.started + ctx.timeout_s - time.monotonic(), 0))
        caller, inbound = ctx.route.caller, ctx.inbound
        with self.tracer.start_as_current_span("router.queue") as span:
            try:
                ctx.slot = await self.gates.gate(ctx.tier.name).enter(
                    caller.key_id,
                    session_of(inbound),
                    inbound.prompt_estimate(),
                    ctx.route.plan.weight * ctx.route.terms.weight_factor,
                    wait,
                    ctx.route.band,
                )
            except QueueTimeout as exc:
                await self._waited_too_long(ctx, exc)
            except QueueFull as exc:
                await self._over_share(ctx, exc)
            span.set_attribute("kimi.queue_ms", round(ctx.slot.waited_s * 1000))
        self.metrics.queues.waited.observe(
            ctx.slot.waited_s, {"plan": caller.plan, "tier": ctx.tier.name, "band": ctx.route.band}
        )
        ctx.headers["x-kimi-queue-ms"] = str(round(ctx.slot.waited_s * 1000))

    async def _waited_too_long(self, ctx: RequestContext, exc: QueueTimeout) -> NoReturn:
        self.metrics.queues.queue_timeouts.inc(1, {"tier": ctx.tier.name})
        await self._settle(ctx, ctx.meter.record(503, "queue timeout"))
        waited = {"x-kimi-queue-ms": str(round(exc.waited_s * 1000)), "retry-after": "5"}
        raise APIError(
            503,
            f"the tier is saturated: this request waited {exc.waited_s:.0f} s; retry",
            code="queue_timeout",
            headers={**ctx.headers, **waited},
        ) from None

    async def _over_share(self, ctx: RequestContext, exc: QueueFull) -> NoReturn:
        self.metrics.queues.refused.inc(1, {"tier": ctx.tier.name})
        await self._settle(ctx, ctx.meter.record(429, "over its share of a full queue"))
        raise APIError(
            429,
            f"the tier is saturated and {exc}: retry shortly",
            code="fair_share_exceeded",
            headers={**ctx.headers, "retry-after": "2"},
        ) from None

    def _tier_request(self, ctx: RequestContext) -> TierRequest:
        body = ctx.inbound.body
        return TierRequest(
            tier=ctx.tier.name,
            endpoint=ctx.inbound.endpoint,
            body=body,
            request_id=ctx.id,
            trace=tracing.inject(),
            affinity=affinity_key(ctx.inbound.session, body),
        )

    def _stream(self, ctx: RequestContext, first: Any, call: TierCall) -> Streamed:
        async def settle(record: UsageRecord) -> None:
            await self._settle(ctx, record)

        state = StreamSettlement(ctx.meter, settle, call, stall_s=self.silent.stall_s)
        ctx.settled = True  # from here the stream's settlement owns the record
        self.undelivered.add(state)
        replica = ctx.headers.get("x-kimi-replica")
        relay = StreamRelay(first, state, ctx.wants_usage, ctx.timeout_s, replica)
        self.silent.relays.add(relay)
        return Streamed(relay.run(), state, dict(ctx.headers))

    # ---- refusals and settlement -------------------------------------------------------

    async def _refuse(self, ctx: RequestContext, err: EngineError) -> NoReturn:
        await self._settle(ctx, ctx.meter.record(err.status_code, err.message))
        raise APIError.from_engine(err, ctx.headers)

    async def _unavailable(self, ctx: RequestContext, exc: Exception) -> NoReturn:
        log.error("tier %s call failed: %r", ctx.tier.name, exc)
        await self._settle(ctx, ctx.meter.record(503, repr(exc)))
        raise APIError(
            503,
            "the tier is unavailable; retry shortly",
            headers={**ctx.headers, "retry-after": "5"},
        )

    async def _settle(self, ctx: RequestContext, record: UsageRecord) -> None:
        ctx.settled = True
        self.open.close(ctx.admission.ticket)
        if ctx.slot is not None and (
            service := record.prompt_tokens + 2 * record.completion_tokens
        ):
            self.metrics.queues.service.inc(
                service, {"tier": ctx.tier.name, "key_id": record.key_id}
            )
        ctx.leave_queue(record.completion_tokens)
        self.metrics.observe(record)
        if record.ttft_ms is not None:
            self.ttft.observe(record.tier, record.ttft_ms)
        ticket = ctx.admission.ticket
        try:
            await self.calls.call(lambda: self.gateway.settle(ticket, record))
        except GatewayUnavailable:
            # the answer stands; its record waits here for the gateway to come back
            log.error("gateway unavailable: settlement of %s deferred", record.request_id)
            self.unsettled.append((ticket, record))

    async def _resettle(self) -> None:
        """Settle what waited for the gateway, oldest first, until it fails again."""
        while self.unsettled:
            ticket, record = self.unsettled[0]
            try:
                await self.gateway.settle(ticket, record)
            except GatewayUnavailable:
                return
            self.unsettled.popleft()

    async def _give_back(self, admission: Admission | Denial) -> None:
        if not isinstance(admission, Denial):
            await self.gateway.settle(admission.ticket, None)

    # ---- the caller --------------------------------------------------------------------

    async def identify(self, key: str | None) -> Caller:
        """The caller a key names, or a refusal; for adapters that own per-key state."""
        anon = self.config.router.anonymous_plan
        if key is not None and anon is not None and not ours(key):
            # Where key-less use is allowed, a placeholder that is not of our key format
            # (SDKs insist on some api_key) is served as anonymous; anything in it, a
            # truncated or mistyped key too, is verified and refused when wrong.
            key = None
        if key is None:
            if anon is None:
                raise APIError(
                    401,
                    "an API key is required: Authorization: Bearer <key>",
                    code="invalid_api_key",
                )
            return Caller(ANONYMOUS, anon, KeyOverrides())
        try:
            result = await self.gateway.authenticate(key)
        except GatewayUnavailable:
            raise gateway_error() from None
        if isinstance(result, Denial):
            raise denial_error(result)
        return result

    def _policy(self, asked: str | None) -> LoadPolicy:
        if not asked or not self.config.router.allow_strategy_header:
            return self.policy
        if asked not in get_args(Strategy):
            raise APIError(
                400,
                f"unknown routing strategy {asked!r}",
                param="x-kimi-routing-strategy",
            )
        return dataclasses.replace(self.policy, strategy=asked)
