"""The environment Ray's processes start with for this app (`cluster/ray.env`: Ray
Serve's throughput-optimized data path). Ray reads these when each of its processes
starts, so they belong to `ray start` (the Makefile, the cluster configs), and, where
Python starts Ray (the tests' cluster, the benchmarks), to `os.environ` before it does."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parent.parent / "cluster" / "ray.env"


def ray_env(path: Path = ENV_FILE) -> dict[str, str]:
    """The file's `NAME=value` lines (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


@contextlib.contextmanager
def ray_started_with(env: dict[str, str]) -> Iterator[None]:
    """`env` in this process's environment (which a Ray started here hands to its
    processes), as it was again afterwards."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
