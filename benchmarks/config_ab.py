"""A/B of app configurations on ours-premium, interleaved, one app at a time:

    .venv/bin/python -m benchmarks.config_ab REPEATS 'NAME=JSON' ['NAME=JSON' ...]

Each JSON is merged into `serve_config.yaml`'s app args (e.g. `r1={"router":
{"num_replicas": 1}}`, `base={}`), but for its `ray_env`, which replaces what the
variant's Ray starts with (cluster/ray.env: e.g. `off={"ray_env":
{"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}}`). Each run of
a variant is a fresh process (nothing of an earlier run's Ray or load generator left in
it) that runs the compare benchmark's quick levels (`compare.measure`: c=1, 8, 32;
streaming, 64 tokens) and prints output tokens/s and CPU ms per 1,000 tokens of every
process together.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

from benchmarks.compare import measure, our_app, serve_args
from benchmarks.loadgen import LoadSpec

LEVELS = [(1, 8), (8, 16), (32, 32)]  # compare's --quick levels
ROW = "config_ab row: "


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merged(base[k], v)
        else:
            base[k] = v
    return base


def one(args: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with our_app(args, env) as url:
        spec = LoadSpec(base_url=url, model="kimi-k2.5:premium", max_tokens=64)
        levels = measure("ours-premium", spec, LEVELS)
    return [
        f"c={c} {s['output_throughput']:.0f} tok/s, "
        f"cpu/1k {sum(s['cpu_ms_per_1k_tokens'].values()):.0f} ms"
        for c, s in levels.items()
    ]


def run_variant(over: str) -> None:
    """One variant's run, in this (fresh) process; its row on stdout."""
    changes = json.loads(over)
    env = changes.pop("ray_env", None)
    print(ROW + " | ".join(one(merged(copy.deepcopy(serve_args()), changes), env)), flush=True)


def main() -> None:
    if sys.argv[1] == "--variant":
        run_variant(sys.argv[2])
        return
    repeats = int(sys.argv[1])
    variants = [arg.split("=", 1) for arg in sys.argv[2:]]
    for r in range(repeats):
        for name, over in variants:
            argv = [sys.executable, "-m", "benchmarks.config_ab", "--variant", over]
            done = subprocess.run(argv, capture_output=True, text=True)
            rows = [line[len(ROW) :] for line in done.stdout.splitlines() if line.startswith(ROW)]
            row = rows[0] if rows else f"failed: {done.stderr[-1000:]}"
            print(f"run {r + 1} {name}: {row}", flush=True)


if __name__ == "__main__":
    main()
