"""Repeated, interleaved runs of the side-by-side benchmark, read as medians with their
spread, so that one noisy run can neither make nor break a claim."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

Levels = dict[str, dict[str, Any]]  # concurrency -> a level's summary (loadgen.summarize)


def median_levels(runs: list[Levels]) -> Levels:
    """Each level's numbers as their median over the runs; what is not a number (CPU
    tables, profiles, sample errors) as the first run had it."""
    out: Levels = {}
    for level in runs[0]:
        summaries = [run[level] for run in runs if level in run]
        merged = dict(summaries[0])
        for key, value in merged.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                merged[key] = statistics.median(s[key] for s in summaries)
        out[level] = merged
    return out


def ratio_spread(
    ours: list[Levels], peer: list[Levels], ratios: Callable[[Levels, Levels], dict]
) -> dict[str, dict[str, float]]:
    """Each ratio of run i of ours to run i of the peer, as median, min and max."""
    per_run = [ratios(a, b) for a, b in zip(ours, peer, strict=False)]
    out: dict[str, dict[str, float]] = {}
    for key in per_run[0] if per_run else ():
        values = [r[key] for r in per_run if r.get(key) is not None]
        if values:
            out[key] = {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
            }
    return out
