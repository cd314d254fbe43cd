"""The hold-back summary read from the tier replicas' histogram, as the report prints it."""

from __future__ import annotations

import math

from benchmarks.holdback import bucket_ms, summary


def test_bounds_of_the_level_and_past_the_top_bucket():
    before = {0.005: 10.0, 0.01: 10.0, 0.25: 10.0, math.inf: 10.0}
    # this level: 60 messages within 5 ms, 39 within 10 ms, one past 250 ms
    after = {0.005: 70.0, 0.01: 109.0, 0.25: 109.0, math.inf: 110.0}
    held = summary(before, after)
    assert held["messages"] == 100 and held["top_bucket_ms"] == 250.0
    assert (held["p50_ms_at_most"], held["p99_ms_at_most"], held["max_ms_at_most"]) == (
        5.0,
        10.0,
        None,
    )
    assert [bucket_ms(held, k) for k in ("p50", "p99", "max")] == ["5.0", "10.0", "> 250.0"]


def test_a_level_that_sent_nothing():
    assert summary({0.005: 3.0, math.inf: 3.0}, {0.005: 3.0, math.inf: 3.0}) == {"messages": 0}
