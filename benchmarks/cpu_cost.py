"""Where a relayed token's CPU goes: CPU time of each process of a serving path, read from
the processes themselves (user + system, by /proc through psutil) around a load level,
and py-spy profiles of chosen processes under load.

Processes are grouped by role with `compare.label` (proxy, router replica, tier replica,
engine core and worker, gateway, llama-server, vllm serve, Ray Serve LLM's replica...).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

ROLES = ("ray", "vllm", "llama", "serve", "python", "litellm")


def cpu_by_process(label: Callable[[str, str], str]) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for every serving process on the machine (not the
    load generator itself, nor the profiler)."""
    out: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        times = p.info["cpu_times"]
        if times is None or p.info["pid"] == me or "py-spy" in cmd:
            continue
        if not any(k in cmd.lower() for k in ROLES):
            continue
        out[p.info["pid"]] = (label(p.info["name"], cmd), times.user + times.system)
    return out


class CpuMeter:
    """CPU seconds each role spent between `__enter__` and `__exit__`."""

    def __init__(self, label: Callable[[str, str], str]) -> None:
        self.label = label
        self.before: dict[int, tuple[str, float]] = {}
        self.spent: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.before = cpu_by_process(self.label)
        return self

    def __exit__(self, *exc: object) -> None:
        spent: collections.Counter[str] = collections.Counter()
        for pid, (role, now) in cpu_by_process(self.label).items():
            _, then = self.before.get(pid, (role, 0.0))  # a process started meanwhile: all
            spent[role] += max(now - then, 0.0)
        self.spent = dict(spent)

    def per_1k_tokens(self, output_tokens: int) -> dict[str, float]:
        """CPU milliseconds per 1,000 output tokens, by role, busiest first."""
        if output_tokens <= 0:
            return {}
        scale = 1e6 / output_tokens  # s -> ms, per 1,000 tokens
        rows = sorted(self.spent.items(), key=lambda kv: -kv[1])
        return {role: round(s * scale, 1) for role, s in rows if s * scale >= 0.5}


def pids_of(label: Callable[[str, str], str], role: str) -> list[int]:
    return [pid for pid, (r, _) in cpu_by_process(label).items() if r == role]


class Profiles:
    """py-spy `record` of some processes for the next `seconds`, in the background; the
    collapsed stacks land in `out_dir` (`ROLE-PID.txt`)."""

    def __init__(self, pids: dict[str, list[int]], seconds: int, out_dir: Path) -> None:
        self.jobs = [(role, pid) for role, found in pids.items() for pid in found]
        self.seconds = seconds
        self.out_dir = out_dir
        self.threads: list[threading.Thread] = []
        self.files: list[Path] = []

    def _record(self, role: str, pid: int) -> None:
        out = self.out_dir / f"{role.replace(':', '-')}-{pid}.txt"
        spy = Path(sys.executable).with_name("py-spy")
        argv = [str(spy), "record", "--pid", str(pid), "--duration", str(self.seconds)]
        argv += ["--rate", "200", "--format", "raw", "--nonblocking", "-o", str(out)]
        if subprocess.run(argv, capture_output=True, timeout=self.seconds + 60).returncode == 0:
            self.files.append(out)

    def __enter__(self) -> Profiles:
        if self.jobs:  # no empty folder for a level nothing is profiled at
            self.out_dir.mkdir(parents=True, exist_ok=True)
        for role, pid in self.jobs:
            t = threading.Thread(target=self._record, args=(role, pid), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.threads:
            t.join()


def stacks(collapsed: Path) -> Iterator[tuple[list[str], int]]:
    """A collapsed-stack profile's stacks (outermost frame first) and their sample counts."""
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def shares(counts: collections.Counter[str], total: int, n: int) -> list[tuple[str, float]]:
    return [(frame, round(c / total, 3)) for frame, c in counts.most_common(n)] if total else []


def top_frames(collapsed: Path, n: int = 12) -> list[tuple[str, float]]:
    """The functions a collapsed-stack profile spent most samples in (self time), as
    shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in stacks(collapsed):
        total += count
        own[frames[-1]] += count
    return shares(own, total, n)


IDLE = ("Thread.run", "Worker.main_loop", "_worker (", "_WorkItem.run", "_run_user_code_event_loop")


def busy_frames(collapsed: Path, n: int = 12) -> list[tuple[str, float]]:
    """Self time without the frames that stand for waiting (a thread or event loop parked
    in native code shows as its last Python frame)."""
    return [(f, share) for f, share in top_frames(collapsed, 40) if not f.startswith(IDLE)][:n]


def our_code(collapsed: Path, n: int = 12, roots: tuple[str, ...] = ("serve_app/", "deployments/")
) -> list[tuple[str, float]]:  # fmt: skip
    """Inclusive shares of samples in this project's own functions."""
    seen: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in stacks(collapsed):
        total += count
        for frame in set(frames):
            if any(root in frame for root in roots):
                seen[frame] += count
    return shares(seen, total, n)


def summary(files: list[Path]) -> dict[str, Any]:
    return {f.name: {"busy": busy_frames(f), "ours": our_code(f)} for f in files}
