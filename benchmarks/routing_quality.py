"""Routing quality under mixed-plan overload: our load-aware tier choice vs plan-only
static routing vs random tier choice, on one deployment and the same offered load.

    .venv/bin/python -m benchmarks.routing_quality [--quick]

The app is the embedded default with the premium tier cut to 4 sequences at a time (a
stand-in for a cluster whose premium capacity is short of demand) and a 2 s TTFT
objective on it. Four plans send open-loop (Poisson) streaming load at once, each with its
own key (limits lifted, so the gateway refuses nothing and the tier choice alone differs):

  premium     may use premium or standard, never degraded   (priority 2)
  enterprise  premium, standard, budget; may degrade        (priority 3)
  standard    standard, budget; may degrade                 (priority 1)
  free        budget only                                   (priority 0: shed first)

Each strategy is chosen per request with the `x-kimi-routing-strategy` header (the
benchmark config allows it), runs for the same time with the same seed, and the tiers
drain between runs. Reported per strategy and plan: SLO attainment (share of requests
answered with TTFT within the objective), TTFT p50/p90, shed (503), tiers served, spills
and cost billed. Writes benchmarks/results/routing_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx

from benchmarks.compare import RESULTS, ROOT, our_app, serve_args
from benchmarks.loadgen import LoadSpec, RequestResult, percentile, run_load

STRATEGIES = ("load", "plan_only", "random")
ADMIN = "routing-bench-admin"
NO_LIMITS = {
    "requests_per_minute": 10**6,
    "tokens_per_minute": 10**9,
    "max_concurrent": 10**4,
    "monthly_token_budget": 10**12,
    "monthly_spend_usd": 10**6,
}


def bench_args() -> dict[str, Any]:
    args = copy.deepcopy(serve_args())
    args["router"]["allow_strategy_header"] = True
    for tier in args["tiers"]:
        if tier["name"] == "premium":
            tier["engine_args"]["max-num-seqs"] = 4
            tier["slo"] = {"ttft_ms": 2000}
        tier["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}  # no cold starts here
    return args


def plan_report(results: list[RequestResult], slo_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    met = [r for r in ok if r.ttft_s <= slo_s]
    return {
        "requests": len(results),
        "ok": len(ok),
        "shed_503": sum(r.status == 503 for r in results),
        "other_errors": sum(not r.ok and r.status != 503 for r in results),
        "slo_attainment": round(len(met) / len(results), 3) if results else None,
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000),
        "ttft_p90_ms": round(percentile(ttft, 90) * 1000),
        "tiers": dict(Counter(r.tier for r in ok)),
        "degraded": sum(r.degraded for r in ok),
        "cost_usd": round(sum(r.cost_usd for r in ok), 6),
    }


def drain(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tiers = httpx.get(f"{url}/status", timeout=30).json()["tiers"]
        if all(not t or t["running"] + t["waiting"] == 0 for t in tiers.values()):
            return
        time.sleep(1)


async def mixed_load(
    base: str,
    keys: dict[str, str],
    rates: dict[str, float],
    strategy: str,
    duration_s: float,
    max_tokens: int,
) -> dict[str, list[RequestResult]]:
    async def one_plan(plan: str) -> tuple[str, list[RequestResult]]:
        spec = LoadSpec(
            base_url=base,
            model="kimi-k2.5",
            max_tokens=max_tokens,
            api_key=keys[plan],
            headers={"x-kimi-routing-strategy": strategy},
        )
        n = max(1, round(rates[plan] * duration_s))
        results, _ = await run_load(spec, n, rate=rates[plan], seed=sorted(rates).index(plan))
        return plan, results

    done = await asyncio.gather(*(one_plan(p) for p in rates))
    return dict(done)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Routing quality under mixed-plan overload ({report['date']})",
        "",
        f"Machine: {report['machine']}. Commit `{report['commit']}`. "
        f"Command: `{report['command']}`. {report['duration_s_per_strategy']} s of open-loop "
        f"load per strategy; rates (req/s): {report['rates']}; {report['max_tokens']} output "
        f"tokens a request; TTFT objective {report['slo_ms']} ms.",
        "",
        "| strategy | plan | requests | SLO met | TTFT p50 ms | TTFT p90 ms | shed | tiers "
        "served | spilled | cost USD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, plans in report["strategies"].items():
        for plan, r in plans.items():
            tiers = ", ".join(f"{t} {n}" for t, n in sorted(r["tiers"].items()))
            lines.append(
                f"| {strategy} | {plan} | {r['requests']} | {r['slo_attainment']:.0%} | "
                f"{r['ttft_p50_ms']} | {r['ttft_p90_ms']} | {r['shed_503']} | {tiers} | "
                f"{r['degraded']} | {r['cost_usd']:.6f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="45 s per strategy (else 90 s)")
    parser.add_argument("--slo-ms", type=float, default=2000)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--rates",
        default="premium=0.5,enterprise=3,standard=1,free=1",
        help="req/s per plan",
    )
    args = parser.parse_args()
    rates = {k: float(v) for k, v in (kv.split("=") for kv in args.rates.split(","))}
    duration = 45 if args.quick else 90
    os.environ["KIMI_SERVE_STATE"] = tempfile.mkdtemp(prefix="kimi-routing-bench-")
    os.environ["KIMI_SERVE_ADMIN_TOKEN"] = ADMIN
    report: dict[str, Any] = {"strategies": {}}
    with our_app(bench_args()) as base:
        url = base.removesuffix("/v1")
        admin = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"})
        keys = {
            plan: admin.post("/admin/keys", json={"plan": plan, "overrides": NO_LIMITS}).json()[
                "key"
            ]
            for plan in rates
        }
        for strategy in STRATEGIES:
            drain(url)
            print(f"{strategy}: {duration} s of mixed load", flush=True)
            results = asyncio.run(
                mixed_load(base, keys, rates, strategy, duration, args.max_tokens)
            )
            report["strategies"][strategy] = {
                plan: plan_report(res, args.slo_ms / 1000) for plan, res in results.items()
            }
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    report.update(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        commit=commit,
        command="python -m benchmarks.routing_quality " + " ".join(sys.argv[1:]),
        max_tokens=args.max_tokens,
        rates=rates,
        slo_ms=args.slo_ms,
        duration_s_per_strategy=duration,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "routing_quality.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "routing_quality.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
