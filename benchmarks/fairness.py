"""Fair share under a swarm: one tenant's 100 in-flight sub-agents against another
tenant's interactive requests, on the embedded default (two ingress replicas), with the
router's queue in each order side by side in one run:

    .venv/bin/python -m benchmarks.fairness [--quick] [--tier premium] [--orders off,fair]

  off         no queue at the router: every request goes to the engines' own first-come
              queues (the code before the fair queue)
  first_come  the router's queue, in arrival order (the same code, fairness switched off)
  fair        the router's queue in weighted fair-share order (router.fair_queue: fair)

Per order, one fresh app: the victim alone (a premium-plan key, one small streamed chat a
second), the swarm alone (an enterprise key keeping 100 streamed requests in flight in
one session, every finished one replaced at once), then both together (the victim at
work 3 s before the swarm lands, its requests counted from then on; and three fresh
premium keys sending one request each into the running swarm: a user arriving into a
tier the swarm fills, whose first request waits for one of the swarm's to end, as no
engine preempts a running sequence for a new one); two swarms of two keys of plans
weighted 1 and 3 (the heavier key's part of the tokens, 0.75 being exact); two equal
swarms of different keys side by side (Jain's index of tokens served per 5 s window),
both pairs three phases long and measured where the router's order shares the tier (see
`steady`), the whole phase beside it;
and within one key: an interactive session of the swarm's own key alone, then at work
3 s before the same key's swarm lands in another session.
Everything is pinned to one tier. Reported: the victim's TTFT p50/p99 alone and under the
swarm (and their ratio), the victim's refusals, the swarm's output tokens/s alone and
with the victim, the queue wait the answers name (`x-kimi-queue-ms`). On each order's app
(reported for the last): 100 requests of one session sent at once against a session
token cap, and what the session used past it (the overshoot: the gateway's, not the
queue's).
Writes benchmarks/results/fairness.{json,md} and two plots: the victim's and the chat
session's TTFT through the swarm phase, per order (`fairness_ttft_under_swarm.png`), and
the two equal swarms' tokens per 5 s window (`fairness_two_swarms.png`).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.compare import RESULTS, ROOT, label, our_app, serve_args
from benchmarks.cpu_cost import CpuMeter
from benchmarks.loadgen import LoadSpec, RequestResult, one_request, percentile
from benchmarks.routing_quality import NO_LIMITS

ADMIN = "fairness-bench-admin"


@dataclass
class Timed:
    result: RequestResult
    ended: float  # monotonic time the answer ended
    sent: float = 0.0  # monotonic time it was sent


@dataclass
class Phase:
    victim: list[Timed] = field(default_factory=list)
    swarm: list[Timed] = field(default_factory=list)
    other: list[Timed] = field(default_factory=list)
    newcomers: list[Timed] = field(default_factory=list)
    wall_s: float = 0.0
    swarm_from: float = 0.0  # when the swarm started (monotonic)


async def send(client: httpx.AsyncClient, spec: LoadSpec, rng: random.Random, out: list) -> None:
    sent = time.monotonic()
    result = await one_request(client, spec, rng)
    out.append(Timed(result, time.monotonic(), sent))


async def closed_loop(spec: LoadSpec, in_flight: int, until: float, out: list) -> None:
    """`in_flight` requests at all times until `until`, each replaced as it ends."""
    rng = random.Random(1)
    limits = httpx.Limits(max_connections=in_flight + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < until:
                await send(client, spec, rng, out)

        await asyncio.gather(*(worker() for _ in range(in_flight)))


async def every(spec: LoadSpec, period_s: float, until: float, out: list) -> None:
    """One request every `period_s` until `until`, each on its own (open loop)."""
    rng = random.Random(2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        tasks = []
        while time.monotonic() < until:
            tasks.append(asyncio.create_task(send(client, spec, rng, out)))
            await asyncio.sleep(period_s)
        await asyncio.gather(*tasks)


async def later(delay_s: float, job: Any) -> None:
    await asyncio.sleep(delay_s)
    await job


async def newcomers(specs: list[LoadSpec], start: float, seconds: float, out: list) -> None:
    """Each spec (a key that has not asked yet) sends one request, spread over the
    phase: a user arriving into a tier the swarm already fills."""
    rng = random.Random(4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        for i, spec in enumerate(specs, 1):
            await asyncio.sleep(max(0.0, start + seconds * i / (len(specs) + 1) - time.monotonic()))
            await send(client, spec, rng, out)


async def phase(
    specs: dict[str, LoadSpec],
    seconds: float,
    swarm: int,
    lead_s: float = 0.0,
    fresh: Sequence[LoadSpec] = (),
) -> Phase:
    """The loads side by side for `seconds`; the swarm `lead_s` after the victim (an
    interactive user already at work when a swarm lands)."""
    out = Phase()
    start = time.monotonic()
    until = start + lead_s + seconds
    out.swarm_from = start + lead_s
    jobs = []
    if "victim" in specs:
        jobs.append(every(specs["victim"], 1.0, until, out.victim))
    if "swarm" in specs:
        jobs.append(later(lead_s, closed_loop(specs["swarm"], swarm, until, out.swarm)))
    if "other" in specs:
        jobs.append(later(lead_s, closed_loop(specs["other"], swarm, until, out.other)))
    if fresh:
        jobs.append(newcomers(list(fresh), out.swarm_from, seconds, out.newcomers))
    await asyncio.gather(*jobs)
    out.wall_s = time.monotonic() - out.swarm_from
    return out


def ttft(rows: list[Timed]) -> dict[str, Any]:
    """TTFT as the client saw it, and the part of it spent in the router's fair queue."""
    ok = [r.result for r in rows if r.result.ok]
    times = [r.ttft_s * 1000 for r in ok]
    queued = [r.queue_ms for r in ok if r.queue_ms is not None]
    return {
        "n": len(rows),
        "ok": len(ok),
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "slowest_ms": sorted(times, reverse=True)[:3],
        "queue_p50_ms": percentile(queued, 50) if queued else None,
        "queue_p99_ms": percentile(queued, 99) if queued else None,
    }


def router_ttft(admin: httpx.Client, key: str | None, under: Phase) -> dict[str, Any]:
    """The victim's TTFT as its router measured it (from admission to the tier's first
    message; the usage records'), for its requests under the swarm: what the client saw
    less the HTTP proxy, the key check and the wire."""
    from serve_app.gateway.usage_log import read_usage

    admin.post("/admin/usage/flush").raise_for_status()
    key_id = (key or "").split("-")[2]
    started = time.time() - (time.monotonic() - under.swarm_from)
    rows = read_usage(Path(os.environ["KIMI_SERVE_STATE"]) / "usage").to_pylist()
    times = [
        r["ttft_ms"]
        for r in rows
        if r["key_id"] == key_id and r["ttft_ms"] is not None and r["time"].timestamp() >= started
    ]
    return {"n": len(times), "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


def tokens_per_s(rows: list[Timed], wall_s: float) -> float:
    return sum(r.result.output_tokens for r in rows) / max(wall_s, 1e-9)


def token_times(row: Timed) -> list[float]:
    """When each of a request's output tokens reached the client: its chunks' arrival
    times (first token, then each inter-chunk gap), its tokens spread over them."""
    r = row.result
    if not r.ok or not r.output_tokens:
        return []
    t = row.sent + r.ttft_s
    chunks = [t]
    for gap in r.itl_s:
        t += gap
        chunks.append(t)
    return [chunks[i * len(chunks) // r.output_tokens] for i in range(r.output_tokens)]


def windows(
    a: list[Timed], b: list[Timed], start: float, end: float, window_s: float = 5.0
) -> list[tuple[int, int]]:
    """The two keys' tokens per full window: counted when they reached the client (not
    when their request ended, which would measure how a batch's requests happen to end
    together)."""
    ta = [t for r in a for t in token_times(r)]
    tb = [t for r in b for t in token_times(r)]
    out = []
    t = start
    while t + window_s <= end:
        x = sum(1 for v in ta if t <= v < t + window_s)
        y = sum(1 for v in tb if t <= v < t + window_s)
        out.append((x, y))
        t += window_s
    return out


def jain(counts: list[tuple[int, int]]) -> float:
    """Jain's index of two keys' tokens served, averaged over the windows with any."""
    indexes = [(x + y) ** 2 / (2 * (x * x + y * y)) for x, y in counts if x + y]
    return sum(indexes) / len(indexes) if indexes else 0.0


def steady(pair: Phase, seconds: float) -> tuple[float, float]:
    """Where two backlogged keys share the tier by the router's order: from the end of
    the last request either sent as the phase began (those went in before the other key
    had asked, and no engine preempts them) to the phase's end (after it, the two
    backlogs drain unevenly)."""
    start = pair.swarm_from
    began = [r.ended for r in pair.swarm + pair.other if r.sent <= start + 1.0]
    return max(began, default=start), start + seconds


def series(rows: list[Timed], start: float) -> list[tuple[float, float | None]]:
    """Each request's send time from `start` (s) and TTFT (ms; None: it failed)."""
    return [
        (round(r.sent - start, 3), round(r.result.ttft_s * 1000, 1) if r.result.ok else None)
        for r in rows
    ]


CAP = 3000  # the session token cap of the burst
LEAD_S = 3.0  # the victim is at work this long before the swarm lands


def key_with(admin: httpx.Client, plan: str = "enterprise", **overrides: int) -> str:
    made = admin.post("/admin/keys", json={"plan": plan, "overrides": NO_LIMITS | overrides})
    return made.json()["key"]


async def session_cap_burst(base: str, key: str, n: int = 100) -> dict[str, Any]:
    """`n` requests of one session at once against its token cap: how many were served
    and refused, the tokens the served ones used (their answers' usage), and the
    overshoot past the cap."""
    spec = LoadSpec(base, "kimi-k2.5:standard", 48, 24, key, headers={"x-session-id": "capped"})
    rng = random.Random(3)
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        results = await asyncio.gather(*(one_request(client, spec, rng) for _ in range(n)))
    served = [r for r in results if r.ok]
    used = sum(r.prompt_tokens + r.output_tokens for r in served)
    return {
        "requests": n,
        "cap_tokens": CAP,
        "served": len(served),
        "refused_402": sum(1 for r in results if r.status == 402),
        "other_errors": sum(1 for r in results if not r.ok and r.status != 402),
        "tokens_used": used,
        "overshoot_tokens": max(0, used - CAP),
    }


def bench_args(order: str, tier: str, shared: int | None) -> dict[str, Any]:
    args = copy.deepcopy(serve_args())
    args["router"]["fair_queue"] = order
    if shared is not None:  # the tier's batch per replica while several keys are active
        [spec] = [t for t in args["tiers"] if t["name"] == tier]
        spec["fair_share"] = {**spec.get("fair_share", {}), "shared_in_flight": shared}
    # the enterprise plan at three times the weight, for the weighted pair
    args["plans"]["weight3"] = {**args["plans"]["enterprise"], "weight": 3.0}
    return args


def share_of(a: list[Timed], b: list[Timed], start: float, end: float) -> float:
    """`b`'s part of the tokens the two were served between `start` and `end`."""
    x = sum(1 for r in a for t in token_times(r) if start <= t < end)
    y = sum(1 for r in b for t in token_times(r) if start <= t < end)
    return y / (x + y) if x + y else 0.0


def run_order(
    order: str,
    tier: str,
    seconds: float,
    swarm: int,
    shared: int | None = None,
    isolation_only: bool = False,
) -> dict[str, Any]:
    with our_app(bench_args(order, tier, shared)) as base:
        url = base.removesuffix("/v1")
        admin = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"})

        def key(plan: str) -> str:
            return key_with(admin, plan)

        model = f"kimi-k2.5:{tier}"
        victim = LoadSpec(base, model, max_tokens=16, prompt_words=24, api_key=key("premium"))
        swarm_key, other_key = key("enterprise"), key("enterprise")
        swarm_spec = LoadSpec(
            base, model, 64, 192, swarm_key, headers={"x-session-id": "swarm-task-1"}
        )
        other_spec = LoadSpec(
            base, model, 64, 192, other_key, headers={"x-session-id": "swarm-task-2"}
        )
        asyncio.run(phase({"victim": victim}, 5, swarm))  # warm-up
        alone = asyncio.run(phase({"victim": victim}, seconds, swarm))
        swarm_alone = asyncio.run(phase({"swarm": swarm_spec}, seconds, swarm))
        fresh = [
            LoadSpec(base, model, max_tokens=16, prompt_words=24, api_key=key("premium"))
            for _ in range(3)
        ]
        with CpuMeter(label) as cpu:
            both = asyncio.run(
                phase({"victim": victim, "swarm": swarm_spec}, seconds, swarm, LEAD_S, fresh)
            )
        under = [r for r in both.victim if r.sent >= both.swarm_from]
        if isolation_only:
            return {
                "victim_alone": ttft(alone.victim),
                "victim_under_swarm": ttft(under),
                "victim_under_swarm_at_router": router_ttft(admin, victim.api_key, both),
                "newcomers_under_swarm": ttft(both.newcomers),
                "swarm_alone_tok_s": tokens_per_s(swarm_alone.swarm, swarm_alone.wall_s),
                "swarm_with_victim_tok_s": tokens_per_s(both.swarm, both.wall_s),
                "cpu_s_under_swarm": {k: round(v, 1) for k, v in cpu.spent.items()},
            }
        # within one key: a chat session of the swarm's own key, alone and beside its swarm
        chat = dataclasses.replace(victim, api_key=swarm_key, headers={"x-session-id": "chat-1"})
        chat_alone = asyncio.run(phase({"victim": chat}, seconds, swarm))
        within = asyncio.run(phase({"victim": chat, "swarm": swarm_spec}, seconds, swarm, LEAD_S))
        chat_under = [r for r in within.victim if r.sent >= within.swarm_from]
        pair_s = 3 * seconds  # the batch in flight when a pair starts takes ~20 s to end
        pair = asyncio.run(phase({"swarm": swarm_spec, "other": other_spec}, pair_s, swarm // 2))
        pair_windows = windows(pair.swarm, pair.other, *steady(pair, pair_s))
        pair_whole = windows(pair.swarm, pair.other, pair.swarm_from, pair.swarm_from + pair_s)
        heavy_spec = dataclasses.replace(other_spec, api_key=key("weight3"))
        weighted = asyncio.run(
            phase({"swarm": swarm_spec, "other": heavy_spec}, pair_s, swarm // 2)
        )
        w_from = weighted.swarm_from
        capped = asyncio.run(session_cap_burst(base, key_with(admin, max_session_tokens=CAP)))
    return {
        "session_cap": capped,
        "victim_alone": ttft(alone.victim),
        "victim_under_swarm": ttft(under),
        "victim_refused": sum(1 for r in under if r.result.status not in (0, 200)),
        "newcomers_under_swarm": ttft(both.newcomers),
        "swarm_alone_tok_s": tokens_per_s(swarm_alone.swarm, swarm_alone.wall_s),
        "swarm_with_victim_tok_s": tokens_per_s(both.swarm, both.wall_s),
        "swarm_errors": sum(1 for r in both.swarm + swarm_alone.swarm if not r.result.ok),
        "session_alone": ttft(chat_alone.victim),
        "session_under_own_swarm": ttft(chat_under),
        "session_refused": sum(1 for r in chat_under if r.result.status not in (0, 200)),
        "jain_two_swarms": jain(pair_windows),
        "jain_two_swarms_whole": jain(pair_whole),
        "two_swarms_windows": pair_whole,
        "victim_series": series(under, both.swarm_from),
        "session_series": series(chat_under, within.swarm_from),
        # weights 1:3: the heavier key's part of the tokens (0.75 is exact)
        "weight3_share": share_of(weighted.swarm, weighted.other, *steady(weighted, pair_s)),
        "weight3_share_whole": share_of(weighted.swarm, weighted.other, w_from, w_from + pair_s),
    }


def alone_and_under(a: dict[str, Any], u: dict[str, Any]) -> str:
    """Three table cells: TTFT p50 / p99 alone, under the swarm, and the p99 ratio."""
    ratio = u["p99_ms"] / a["p99_ms"] if a["p99_ms"] else float("nan")
    return (
        f"{a['p50_ms']:.0f} / {a['p99_ms']:.0f} | {u['p50_ms']:.0f} / {u['p99_ms']:.0f}"
        f" ({u['ok']} of {u['n']}) | {ratio:.1f}x"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Fair share under a swarm ({report['tier']})",
        "",
        f"{report['date']}, {report['machine']}, commit {report['commit']}: `{report['command']}`",
        f"(each phase {report['seconds']:g} s; swarm {report['swarm']} in flight; two ingress"
        " replicas; under the swarm: the victim's requests sent after it landed, the victim"
        f" at work {LEAD_S:g} s before; newcomers: three keys' first requests into the"
        " running swarm, slowest first; the two pairs of swarms run 3x as long, measured"
        " from the end of the batch in flight when they began to the phase's end, the"
        " whole phase in brackets)",
        "",
        "| order | victim TTFT p50 / p99 alone (ms) | under the swarm (ms) | p99 ratio |"
        " victim refused | newcomers' first TTFT (ms) | swarm tok/s alone |"
        " swarm tok/s with victim | Jain, two swarms | weights 1:3, heavier's part |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for order, r in report["orders"].items():
        lines.append(
            f"| {order} | {alone_and_under(r['victim_alone'], r['victim_under_swarm'])} |"
            f" {r['victim_refused']} |"
            f" {', '.join(f'{v:.0f}' for v in r['newcomers_under_swarm']['slowest_ms'])} |"
            f" {r['swarm_alone_tok_s']:.0f} | {r['swarm_with_victim_tok_s']:.0f} |"
            f" {r['jain_two_swarms']:.3f} ({r['jain_two_swarms_whole']:.3f}) |"
            f" {r['weight3_share']:.2f} ({r['weight3_share_whole']:.2f}) |"
        )
    lines += [
        "",
        "Within one key: a chat session of the swarm's own key, alone and while the key's"
        " 100-request swarm runs in another session (the chat at work before it lands).",
        "",
        "| order | chat TTFT p50 / p99 alone (ms) | beside its key's swarm (ms) | p99 ratio |"
        " refused |",
        "|---|---|---|---|---|",
    ]
    for order, r in report["orders"].items():
        lines.append(
            f"| {order} | {alone_and_under(r['session_alone'], r['session_under_own_swarm'])} |"
            f" {r['session_refused']} |"
        )
    orders = report["orders"]
    capped = list(orders.values())[-1].get("session_cap")
    if capped:
        lines += [
            "",
            f"Session cap: {capped['requests']} requests of one session sent at once against"
            f" a {capped['cap_tokens']}-token cap: {capped['served']} served,"
            f" {capped['refused_402']} refused (402), {capped['other_errors']} other errors;"
            f" {capped['tokens_used']} tokens used, {capped['overshoot_tokens']} past the cap.",
        ]
    if "fair" in orders and "off" in orders and orders["off"]["swarm_alone_tok_s"]:
        share = orders["fair"]["swarm_alone_tok_s"] / orders["off"]["swarm_alone_tok_s"]
        lines += ["", f"Work conservation: the swarm alone under `fair` gets {share:.2f}x its"
                  " tokens/s under `off`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], out: str) -> list[str]:
    """TTFT through the swarm phase per order, and the two swarms' tokens per window."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, field_, title in (
        (axes[0], "victim_series", "another key (victim)"),
        (axes[1], "session_series", "the swarm's own key, another session"),
    ):
        for order, r in report["orders"].items():
            points = [(t, v) for t, v in r.get(field_, []) if v is not None]
            ax.plot([t for t, _ in points], [v for _, v in points], marker="o", ms=3, label=order)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since the swarm landed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("TTFT (ms)")
    fig.suptitle(f"Interactive TTFT under a swarm ({report['tier']})")
    fig.tight_layout()
    name = f"{out}_ttft_under_swarm.png"
    fig.savefig(RESULTS / name, dpi=110)
    plt.close(fig)
    made.append(name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for order, r in report["orders"].items():
        shares = [y / (x + y) for x, y in r.get("two_swarms_windows", []) if x + y]
        ax.plot(range(1, len(shares) + 1), shares, marker="o", label=order)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("5 s window")
    ax.set_ylabel("second key's part of the tokens")
    ax.set_title(f"Two equal swarms ({report['tier']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = f"{out}_two_swarms.png"
    fig.savefig(RESULTS / name, dpi=110)
    plt.close(fig)
    made.append(name)
    return made


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 s phases (else 40 s)")
    parser.add_argument("--tier", default="premium")
    parser.add_argument("--orders", default="off,first_come,fair")
    parser.add_argument("--swarm", type=int, default=100, help="the swarm's requests in flight")
    parser.add_argument("--out", default="fairness")
    parser.add_argument(
        "--shared-in-flight", type=int, help="the tier's fair_share.shared_in_flight (per replica)"
    )
    parser.add_argument(
        "--isolation-only",
        action="store_true",
        help="only the victim alone and under the swarm, printed, no results written",
    )
    args = parser.parse_args()
    seconds = 20 if args.quick else 40
    os.environ["KIMI_SERVE_STATE"] = tempfile.mkdtemp(prefix="kimi-fairness-bench-")
    os.environ["KIMI_SERVE_ADMIN_TOKEN"] = ADMIN
    report: dict[str, Any] = {"orders": {}}
    for order in args.orders.split(","):
        print(f"{order}: starting the app", flush=True)
        report["orders"][order] = run_order(
            order, args.tier, seconds, args.swarm, args.shared_in_flight, args.isolation_only
        )
        print(json.dumps(report["orders"][order]), flush=True)
    if args.isolation_only:
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    report.update(
        tier=args.tier,
        seconds=seconds,
        swarm=args.swarm,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        commit=commit,
        command="python -m benchmarks.fairness " + " ".join(sys.argv[1:]),
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    made = plots(report, args.out)
    (RESULTS / f"{args.out}.md").write_text(
        markdown(report) + "".join(f"\n![{name}]({name})\n" for name in made)
    )
    print(markdown(report))


if __name__ == "__main__":
    main()
