"""The benchmark's CPU accounting: per role, per 1,000 output tokens; profile summaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.cpu_cost import CpuMeter, top_frames


def test_cpu_is_counted_per_role_and_scaled_to_1k_tokens():
    """A serving process's CPU counts; the measuring process's own does not."""
    work = "import sys; sum(i * i for i in range(20_000_000)); print(flush=True); sys.stdin.read()"
    worker = subprocess.Popen(
        [sys.executable, "-c", work], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )

    def label(name: str, cmd: str) -> str:
        return "worker" if "20_000_000" in cmd else "other"

    with CpuMeter(label) as meter:
        sum(i * i for i in range(3_000_000))  # this process works too, uncounted
        assert worker.stdout is not None and worker.stdout.readline()  # its work is done
    worker.communicate(timeout=60)  # it lives until measured, as serving processes do
    assert meter.spent.get("worker", 0.0) > 0.2
    per = meter.per_1k_tokens(output_tokens=500)
    assert per["worker"] == round(meter.spent["worker"] * 2e3, 1)  # ms per 1,000 tokens
    assert meter.per_1k_tokens(0) == {}


def test_top_frames_are_self_time_shares(tmp_path: Path):
    raw = tmp_path / "p.txt"
    raw.write_text("main;relay;json_dumps 30\nmain;relay 10\nmain;relay;json_dumps 30\nbad\n")
    assert top_frames(raw) == [("json_dumps", 0.857), ("relay", 0.143)]
