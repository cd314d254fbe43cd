"""Ray's token authentication is chosen, not inherited: a token file an earlier local Ray
left in ~/.ray (the benchmarks' `ray.init()` clusters leave one) turned authentication
on for the next `ray start`, and `serve deploy` was then refused. A real local Ray, in
a HOME that holds such a stray file, started and reached as the project's commands do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from serve_app.ray_env import LOCAL_AUTH

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# a fresh local Ray of its own (not the tests' cluster, nor its session files), a task on
# it, and the authentication mode it ran under
PROBE = """
import sys
import ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
ray.init(
    address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
    _temp_dir=sys.argv[1],
)
assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
print("token" if is_token_auth_enabled() else "disabled")
ray.shutdown()
"""


def probe(home: Path, extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **extra)
    env.pop("RAY_ADDRESS", None)
    ray_dir = tempfile.mkdtemp(prefix="kr-", dir="/tmp")  # short: Ray's socket paths
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, ray_dir],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_stray_token_file_changes_nothing_for_the_projects_ray(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    stray = home / ".ray" / "auth_token"
    stray.write_text("a-token-some-earlier-ray-left-behind")
    assert probe(home, LOCAL_AUTH) == "disabled"
    assert stray.read_text() == "a-token-some-earlier-ray-left-behind"  # untouched
    # the Makefile hands every command it runs the same choice (a user's own wins)
    mode = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    recipe = "ray-auth-mode: ; @echo $$RAY_AUTH_MODE"
    make = ["make", "-s", "--no-print-directory", "--eval", recipe, "ray-auth-mode"]
    said = subprocess.run(make, cwd=ROOT, env=mode, capture_output=True, text=True)
    assert said.stdout.strip() == LOCAL_AUTH["RAY_AUTH_MODE"], said.stderr
    mode["RAY_AUTH_MODE"] = "token"
    said = subprocess.run(make, cwd=ROOT, env=mode, capture_output=True, text=True)
    assert said.stdout.strip() == "token"


def test_left_to_ray_the_same_file_would_have_turned_tokens_on(tmp_path):
    """The control: without the choice, Ray 2.60 reads the stray file and turns token
    authentication on (what broke `make deploy` after a benchmark)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-some-earlier-ray-left-behind")
    assert probe(home, {}) == "token"
