"""What Ray's task events cost the control plane: GCS's and the actor's resident memory
over many small actor calls (the shape of the gateway's admit/settle/renew and the load
board's reports), with `enable_task_events` on (Ray's default) and off (ours, as Serve
sets for its own actors), side by side in one local cluster:

    .venv/bin/python -m benchmarks.task_events [--calls 40000] [--rounds 2]

Each round runs the calls against a fresh actor of each setting, off first, and samples
the RSS of `gcs_server` and of the actor's process before and after. Writes
benchmarks/results/task_events.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import psutil
import ray
from pydantic import BaseModel

from serve_app.ray_env import LOCAL_AUTH

RESULTS = Path(__file__).parent / "results"
MIB = 1024 * 1024


class Record(BaseModel):
    """About the size of a usage record's draft."""

    request_id: str
    key_id: str = "abcdefabcdef"
    model: str = "kimi-k2.5"
    tokens: int = 0


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def call(self, record: Record) -> int:
        self.n += record.tokens + 1
        return self.n

    def pid(self) -> int:
        return os.getpid()


def gcs_rss() -> int:
    [gcs] = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "gcs_server"]
    return gcs.memory_info().rss


def run(events: bool, calls: int) -> dict[str, float]:
    actor = ray.remote(num_cpus=0, enable_task_events=events)(Counter).remote()
    proc = psutil.Process(ray.get(actor.pid.remote()))
    gcs0, actor0 = gcs_rss(), proc.memory_info().rss
    batch = 200
    for start in range(0, calls, batch):
        ray.get([actor.call.remote(Record(request_id=f"r-{start + i}")) for i in range(batch)])
    ray.get(actor.pid.remote())
    out = {
        "gcs_mib": (gcs_rss() - gcs0) / MIB,
        "actor_mib": (proc.memory_info().rss - actor0) / MIB,
    }
    ray.kill(actor)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(LOCAL_AUTH)  # no token saved in ~/.ray for `make deploy` to trip on
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rounds = []
    for n in range(args.rounds):
        row = {"off": run(False, args.calls), "on": run(True, args.calls)}
        print(f"round {n + 1}: {json.dumps(row)}", flush=True)
        rounds.append(row)
    ray.shutdown()
    RESULTS.mkdir(exist_ok=True)
    meta = {"calls": args.calls, "ray": ray.__version__, "machine": platform.node()}
    (RESULTS / "task_events.json").write_text(json.dumps({**meta, "rounds": rounds}, indent=1))
    lines = [
        "# Ray task events and control-plane memory (`python -m benchmarks.task_events`)",
        "",
        f"{args.calls:,} small actor calls per run, Ray {ray.__version__}; growth of resident",
        "memory over the run (MiB).",
        "",
        "| round | GCS, events off | GCS, events on | actor, off | actor, on |",
        "|---|---|---|---|---|",
    ]
    for n, r in enumerate(rounds, 1):
        cells = [r[s][m] for m in ("gcs_mib", "actor_mib") for s in ("off", "on")]
        lines.append(f"| {n} | " + " | ".join(f"{c:+.1f}" for c in cells) + " |")
    (RESULTS / "task_events.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
