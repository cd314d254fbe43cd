"""A/B of app configurations on ours-premium, interleaved, one app at a time:

    .venv/bin/python -m benchmarks.config_ab REPEATS 'NAME=JSON' ['NAME=JSON' ...]

Each JSON is merged into `serve_config.yaml`'s app args (e.g. `r1={"router":
{"num_replicas": 1}}`, `base={}`); each variant runs the compare benchmark's quick
levels (`compare.measure`: c=1, 8, 32; streaming, 64 tokens) and prints output tokens/s
and CPU ms per 1,000 tokens of every process together.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

from benchmarks.compare import measure, our_app, serve_args
from benchmarks.loadgen import LoadSpec

LEVELS = [(1, 8), (8, 16), (32, 32)]  # compare's --quick levels


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merged(base[k], v)
        else:
            base[k] = v
    return base


def one(args: dict[str, Any]) -> list[str]:
    with our_app(args) as url:
        spec = LoadSpec(base_url=url, model="kimi-k2.5:premium", max_tokens=64)
        levels = measure("ours-premium", spec, LEVELS)
    return [
        f"c={c} {s['output_throughput']:.0f} tok/s, "
        f"cpu/1k {sum(s['cpu_ms_per_1k_tokens'].values()):.0f} ms"
        for c, s in levels.items()
    ]


def main() -> None:
    repeats = int(sys.argv[1])
    variants = [arg.split("=", 1) for arg in sys.argv[2:]]
    for r in range(repeats):
        for name, over in variants:
            row = one(merged(copy.deepcopy(serve_args()), json.loads(over)))
            print(f"run {r + 1} {name}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
