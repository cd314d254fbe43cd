"""A long soak, outside CI: mixed traffic for `--minutes` on all three tiers and all three
wire APIs, with bursts of parallel requests from one session, on the embedded default
(two ingress replicas, the fair queue, the gateway), every process's memory sampled:

    .venv/bin/python -m benchmarks.soak [--minutes 30] [--warmup-minutes 5]

Traffic: `--clients` threads, each sending one request after another, drawn at random:
the API (OpenAI chat, Anthropic messages, Responses, some chained by
`previous_response_id`), streamed or not, the model (each tier pinned, or unpinned), a
prompt of 1-60 words and 8-96 output tokens. Every `--burst-every-s`, 20 requests of one
agent session at once (`x-session-id`). A request fails unless it is a 200 whose body
ends as its API ends (`[DONE]`, `message_stop`, `response.completed`, or the JSON answer).

Memory: every process of the cluster (by role: each tier replica, its engine, the
routers, the gateway, Ray's daemons) sampled every `--sample-s`; reported per role: RSS
at warm-up's end, at the end, the peak, and the slope of a least-squares line through
the samples after warm-up (MiB per hour). A role that keeps growing shows there.
Writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil

from benchmarks.compare import RESULTS, ROOT, label, our_app, serve_args

ADMIN = "soak-bench-admin"
MODELS = ["kimi-k2.5:premium", "kimi-k2.5:standard", "kimi-k2.5:budget", "kimi-k2.5"]
APIS = ["chat", "messages", "responses"]
BURST = 20


@dataclass
class Outcome:
    api: str
    stream: bool
    status: int
    ok: bool
    what: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def request_of(
    api: str, model: str, words: int, max_tokens: int, stream: bool
) -> tuple[str, dict, tuple[str, ...]]:
    """(path, body, the texts one of which a whole answer ends with) for one request."""
    text = "soak " * words
    if api == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        body |= {"max_tokens": max_tokens, "stream": stream}
        return "/v1/chat/completions", body, ("data: [DONE]",) if stream else ('"choices"',)
    if api == "messages":
        body = {"model": model, "max_tokens": max_tokens, "stream": stream}
        body["messages"] = [{"role": "user", "content": text}]
        return "/v1/messages", body, ("message_stop",) if stream else ('"stop_reason"',)
    body = {"model": model, "input": text, "max_output_tokens": max_tokens, "stream": stream}
    # a Response cut by max_output_tokens ends `incomplete`: as whole an answer as any
    if stream:
        return "/v1/responses", body, ("response.completed", "response.incomplete")
    return "/v1/responses", body, ('"status":"completed"', '"status":"incomplete"')


def send(
    client: httpx.Client, api: str, body: dict, path: str, ends: tuple[str, ...]
) -> tuple[Outcome, str]:
    """The outcome, and the answer's text (for a chain's next request)."""
    try:
        if body.get("stream"):
            with client.stream("POST", path, json=body) as r:
                text = "".join(r.iter_text())
        else:
            r = client.post(path, json=body)
            text = r.text.replace(": ", ":")
    except httpx.HTTPError as exc:
        return Outcome(api, bool(body.get("stream")), 0, False, repr(exc)[:200]), ""
    ended = any(end in text for end in ends)
    ok = r.status_code == 200 and ended and '"error"' not in text[-400:]
    what = "" if ok else text[-300:]
    return Outcome(api, bool(body.get("stream")), r.status_code, ok, what), text


def worker(base: str, key: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    previous: str | None = None  # a Responses chain this client continues now and then
    headers = {"authorization": f"Bearer {key}", "x-api-key": key}
    with httpx.Client(base_url=base, timeout=300, headers=headers) as client:
        while not stop.is_set():
            api = rng.choice(APIS)
            stream = rng.random() < 0.6
            path, body, end = request_of(
                api, rng.choice(MODELS), rng.randint(1, 60), rng.randint(8, 96), stream
            )
            if api == "responses" and not stream and previous and rng.random() < 0.5:
                body["previous_response_id"] = previous
            outcome, text = send(client, api, body, path, end)
            tally.add(outcome)
            if api == "responses" and not stream and outcome.ok:
                previous = json.loads(text).get("id") or previous


def burst_request(base: str, key: str, session: str, tally: Tally) -> None:
    path, body, end = request_of("chat", "kimi-k2.5", 12, 32, True)
    headers = {"authorization": f"Bearer {key}", "x-session-id": session}
    with httpx.Client(base_url=base, timeout=300, headers=headers) as client:
        tally.add(send(client, "chat-burst", body, path, end)[0])


def bursts(base: str, key: str, every_s: float, stop: threading.Event, tally: Tally) -> int:
    """Every `every_s`, `BURST` requests of one new session at once; how many bursts."""
    n = 0
    while not stop.wait(every_s):
        n += 1
        threads = [
            threading.Thread(target=burst_request, args=(base, key, f"soak-swarm-{n}", tally))
            for _ in range(BURST)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return n


class RoleSampler(threading.Thread):
    """Every process's RSS by role (`compare.label`), summed per role, every `every_s`."""

    def __init__(self, every_s: float) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.done.is_set():
            roles: collections.Counter[str] = collections.Counter()
            for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
                try:
                    if p.info["pid"] == me or p.info["memory_info"] is None:
                        continue
                    cmd = " ".join(p.info["cmdline"] or [])
                    low = cmd.lower()
                    if not any(k in low for k in ("ray", "vllm", "llama", "serve")):
                        continue
                    roles[label(p.info["name"], cmd)] += p.info["memory_info"].rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            roles["(all)"] = sum(roles.values())
            self.samples.append((time.monotonic(), dict(roles)))
            self.done.wait(self.every_s)


def slope_mib_per_hour(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, bytes) points, in MiB per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if not var:
        return 0.0
    cov = sum((x - mx) * (y - my) for x, y in points)
    return cov / var * 3600 / 2**20


def memory_report(samples: list[tuple[float, dict[str, int]]], warm_from: float) -> list[dict]:
    warm = [(t, roles) for t, roles in samples if t >= warm_from]
    if not warm:
        return []
    names = sorted({name for _, roles in warm for name in roles})
    rows = []
    for name in names:
        points = [(t, roles[name]) for t, roles in warm if name in roles]
        rows.append(
            {
                "role": name,
                "warm_mib": round(points[0][1] / 2**20),
                "end_mib": round(points[-1][1] / 2**20),
                "peak_mib": round(max(v for _, v in points) / 2**20),
                "slope_mib_per_h": round(slope_mib_per_hour(points), 1),
            }
        )
    return sorted(rows, key=lambda r: -r["peak_mib"])


def markdown(report: dict[str, Any]) -> str:
    t = report["traffic"]
    lines = [
        f"# Soak: {report['minutes']:g} minutes of mixed traffic",
        "",
        f"{report['date']}, {report['machine']}, commit {report['commit']}: `{report['command']}`",
        "",
        f"{t['requests']} requests ({t['failures']} failed) from {report['clients']} clients"
        f" and {t['bursts']} bursts of {BURST} parallel requests of one session; by API"
        f" (failed / sent): "
        + ", ".join(f"{api} {v['failed']} / {v['sent']}" for api, v in t["by_api"].items()),
        "",
        f"Memory by role after {report['warmup_minutes']:g} minutes of warm-up (the slope is"
        " a least-squares line through every sample after it):",
        "",
        "| role | at warm-up's end (MiB) | at the end | peak | slope (MiB/h) |",
        "|---|---|---|---|---|",
    ]
    for r in report["memory"]:
        lines.append(
            f"| {r['role']} | {r['warm_mib']} | {r['end_mib']} | {r['peak_mib']} |"
            f" {r['slope_mib_per_h']:+.1f} |"
        )
    if t["failure_examples"]:
        lines += ["", "Failures (first five):", ""]
        lines += [f"- {f}" for f in t["failure_examples"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup-minutes", type=float, default=5)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--burst-every-s", type=float, default=60)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--out", default="soak")
    args = parser.parse_args()
    os.environ["KIMI_SERVE_STATE"] = tempfile.mkdtemp(prefix="kimi-soak-")
    os.environ["KIMI_SERVE_ADMIN_TOKEN"] = ADMIN
    tally, stop = Tally(), threading.Event()
    with our_app(serve_args()) as base:
        url = base.removesuffix("/v1")
        admin = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"})
        key = admin.post("/admin/keys", json={"plan": "enterprise"}).json()["key"]
        sampler = RoleSampler(args.sample_s)
        sampler.start()
        started = time.monotonic()
        clients = [
            threading.Thread(target=worker, args=(url, key, i, stop, tally), daemon=True)
            for i in range(args.clients)
        ]
        for c in clients:
            c.start()
        burst_count: list[int] = []
        burster = threading.Thread(
            target=lambda: burst_count.append(bursts(url, key, args.burst_every_s, stop, tally)),
            daemon=True,
        )
        burster.start()
        stop.wait(args.minutes * 60)
        stop.set()
        for c in [*clients, burster]:
            c.join(timeout=300)
        sampler.done.set()
        sampler.join()
    outcomes = tally.outcomes
    by_api: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"sent": 0, "failed": 0})
    for o in outcomes:
        by_api[o.api]["sent"] += 1
        by_api[o.api]["failed"] += 0 if o.ok else 1
    failed = [o for o in outcomes if not o.ok]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    report = {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "clients": args.clients,
        "traffic": {
            "requests": len(outcomes),
            "failures": len(failed),
            "bursts": burst_count[0] if burst_count else 0,
            "by_api": dict(by_api),
            "failure_examples": [f"{o.api} {o.status}: {o.what[:200]}" for o in failed[:5]],
        },
        "memory": memory_report(sampler.samples, started + args.warmup_minutes * 60),
        # every sample, for the shape of a growth (a slope alone hides a plateau)
        "samples": [
            {"s": round(t - started, 1), **{k: round(v / 2**20) for k, v in roles.items()}}
            for t, roles in sampler.samples
        ],
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "commit": commit,
        "command": "python -m benchmarks.soak " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
