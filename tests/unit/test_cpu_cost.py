"""The benchmark's CPU accounting: per role, per 1,000 output tokens; profile summaries."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.cpu_cost import CpuMeter, top_frames


def test_cpu_is_counted_per_role_and_scaled_to_1k_tokens():
    def label(name: str, cmd: str) -> str:
        return "me" if str(os.getpid()) in cmd or "pytest" in cmd else "other"

    with CpuMeter(label) as meter:
        sum(i * i for i in range(3_000_000))  # this process works
    assert meter.spent.get("me", 0.0) > 0.05
    per = meter.per_1k_tokens(output_tokens=500)
    assert per["me"] == round(meter.spent["me"] * 2e3, 1)  # ms per 1,000 tokens
    assert meter.per_1k_tokens(0) == {}


def test_top_frames_are_self_time_shares(tmp_path: Path):
    raw = tmp_path / "p.txt"
    raw.write_text("main;relay;json_dumps 30\nmain;relay 10\nmain;relay;json_dumps 30\nbad\n")
    assert top_frames(raw) == [("json_dumps", 0.857), ("relay", 0.143)]
