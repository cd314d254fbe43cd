"""Medians over repeated benchmark runs, and each ratio's spread run by run."""

from __future__ import annotations

from benchmarks.compare import level_ratios
from benchmarks.repeats import median_levels, ratio_spread


def level(tput: float, ttft: float) -> dict:
    return {"output_throughput": tput, "ttft_p50_ms": ttft, "cpu_ms_per_1k_tokens": {"x": tput}}


def test_levels_are_medians_and_ratios_pair_runs():
    ours = [{"1": level(100, 40)}, {"1": level(300, 10)}, {"1": level(200, 20)}]
    peer = [{"1": level(200, 80)}, {"1": level(200, 20)}, {"1": level(100, 20)}]
    merged = median_levels(ours)
    assert merged["1"]["output_throughput"] == 200 and merged["1"]["ttft_p50_ms"] == 20
    assert merged["1"]["cpu_ms_per_1k_tokens"] == {"x": 100}  # not a number: the first run's
    spread = ratio_spread(ours, peer, level_ratios)
    assert spread["throughput_c1"] == {"median": 1.5, "min": 0.5, "max": 2.0}
    assert spread["ttft_p50_c1"] == {"median": 0.5, "min": 0.5, "max": 1.0}
    assert "throughput_c8" not in spread  # no such level measured
