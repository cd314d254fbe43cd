"""Async OpenAI-compatible load generator (streaming chat completions).

Closed loop (`concurrency` workers, each sends the next request when its last one ends)
or open loop (Poisson arrivals at `rate` requests/s). Per request it records what
`vllm bench serve` records, with the same definitions:
- TTFT: request sent -> first token (first chunk with content or reasoning);
- ITL: time between successive token-bearing chunks;
- TPOT: (E2E - TTFT) / (output tokens - 1);
- E2E latency; output tokens from the final `usage` chunk.
Goodput counts requests meeting both the TTFT and TPOT objectives.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    tier: str | None = None
    degraded: bool = False
    cost_usd: float = 0.0  # our router's `usage.cost`; 0 from peers
    error: str | None = None
    resent: bool = False  # sent again after a dropped kept-alive connection
    queue_ms: float | None = None  # our router's fair-queue wait (`x-kimi-queue-ms`)

    @property
    def tpot_s(self) -> float:
        return (
            (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0
        )


@dataclass(frozen=True)
class LoadSpec:
    base_url: str  # ends with /v1
    model: str
    max_tokens: int = 64
    prompt_words: int = 48
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(
    client: httpx.AsyncClient, spec: LoadSpec, rng: random.Random
) -> RequestResult:
    words = " ".join(
        rng.choice(["weather", "city", "plan", "tool", "kimi", "days"])
        for _ in range(spec.prompt_words)
    )
    body = {
        "model": spec.model,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": spec.max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        # the same sampling on every system: where a request sets none, our router fills
        # in the model card's (top_p 0.95), a sort of the 32K vocabulary per token on a CPU
        "temperature": 1.0,
        "top_p": 1.0,
        **spec.extra_body,
    }
    headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    headers.update(spec.headers)
    request = client.build_request(
        "POST", f"{spec.base_url}/chat/completions", json=body, headers=headers
    )
    start = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        for attempt in (1, 2):
            try:
                await stream_answer(client, request, result, start)
                break
            except httpx.RemoteProtocolError:
                # a kept-alive connection the server closed without answering (llama-server
                # does under more connections than its fixed HTTP threads): sent again
                # once, as the official SDKs do; the time it cost stays in the latency
                if result.status or attempt == 2:
                    raise
                result.resent = True
    except httpx.HTTPError as exc:
        result.error = repr(exc)[:200]
    return result


async def stream_answer(
    client: httpx.AsyncClient, request: httpx.Request, result: RequestResult, start: float
) -> None:
    """One streamed answer into `result` (times from `start`)."""
    last = None
    r = await client.send(request, stream=True)
    try:
        result.status = r.status_code
        result.tier = r.headers.get("x-kimi-tier")
        if (queued := r.headers.get("x-kimi-queue-ms")) is not None:
            result.queue_ms = float(queued)
        result.degraded = "x-kimi-degraded" in r.headers
        if r.status_code != 200:
            result.error = (await r.aread()).decode(errors="replace")[:200]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = str(event["error"])[:200]
                return
            if event.get("usage"):
                result.output_tokens = event["usage"].get("completion_tokens", 0)
                result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                result.cost_usd = float(event["usage"].get("cost") or 0.0)
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
    finally:
        await r.aclose()
    result.e2e_s = time.perf_counter() - start
    result.ok = result.output_tokens > 0


async def run_load(
    spec: LoadSpec,
    num_requests: int,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """Closed loop with `concurrency`, or open loop at `rate` req/s. Returns results and
    the wall time of the whole run."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        if rate is not None:
            tasks = []
            for _ in range(num_requests):
                tasks.append(asyncio.create_task(one_request(client, spec, rng)))
                await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
        else:
            queue = list(range(num_requests))
            results = []

            async def worker() -> None:
                while queue:
                    queue.pop()
                    results.append(await one_request(client, spec, rng))

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        return list(results), time.perf_counter() - start


def summarize(
    results: list[RequestResult], wall_s: float, ttft_slo_s: float = 1.0, tpot_slo_s: float = 0.1
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    itl = [x for r in ok for x in r.itl_s]
    tpot = [r.tpot_s for r in ok]
    e2e = [r.e2e_s for r in ok]
    good = [r for r in ok if r.ttft_s <= ttft_slo_s and r.tpot_s <= tpot_slo_s]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": round(wall_s, 3),
        "request_throughput": round(len(ok) / wall_s, 3) if wall_s else 0.0,
        "output_throughput": round(out_tokens / wall_s, 1) if wall_s else 0.0,
        "goodput": round(len(good) / wall_s, 3) if wall_s else 0.0,
        **{f"ttft_p{p}_ms": round(percentile(ttft, p) * 1000, 2) for p in (50, 95, 99)},
        **{f"itl_p{p}_ms": round(percentile(itl, p) * 1000, 3) for p in (50, 95)},
        "tpot_mean_ms": round(statistics.fmean(tpot) * 1000, 3) if tpot else 0.0,
        "e2e_p50_ms": round(percentile(e2e, 50) * 1000, 2),
        "e2e_p95_ms": round(percentile(e2e, 95) * 1000, 2),
        "resent": sum(r.resent for r in results),
        "sample_errors": [r.error for r in results if not r.ok][:3],
    }
