"""A/B of app configurations on ours-premium, interleaved, one app at a time:

    .venv/bin/python -m benchmarks.config_ab REPEATS 'NAME=JSON' ['NAME=JSON' ...]

Each JSON is merged into `serve_config.yaml`'s app args (e.g. `r1={"router":
{"num_replicas": 1}}`, `base={}`); each variant runs the compare benchmark's quick levels
(c=1, 8, 32; streaming, 64 tokens) and prints output tokens/s and CPU ms per 1,000
tokens of every process together.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from typing import Any

from benchmarks.compare import label, our_app, serve_args
from benchmarks.cpu_cost import CpuMeter
from benchmarks.loadgen import LoadSpec, run_load, summarize

LEVELS = ((1, 8), (8, 16), (32, 32))


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
        asyncio.run(run_load(spec, 4, concurrency=2))  # warm-up
        row = []
        for c, n in LEVELS:
            with CpuMeter(label) as cpu:
                results, wall = asyncio.run(run_load(spec, n, concurrency=c, seed=c))
            s = summarize(results, wall)
            tokens = sum(r.output_tokens for r in results if r.ok)
            total = sum(cpu.per_1k_tokens(tokens).values())
            row.append(f"c={c} {s['output_throughput']:.0f} tok/s, cpu/1k {total:.0f} ms")
        return row


def main() -> None:
    repeats = int(sys.argv[1])
    variants = [arg.split("=", 1) for arg in sys.argv[2:]]
    for r in range(repeats):
        for name, over in variants:
            row = one(merged(copy.deepcopy(serve_args()), json.loads(over)))
            print(f"run {r + 1} {name}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
