"""Side-by-side benchmark in one run: our router vs the engines' own servers and peers.

    .venv/bin/python -m benchmarks.compare [--quick] [--with-ray-llm]

Systems, each started, measured and stopped in turn on this machine, all serving the
same tiny Kimi-architecture model with the same engine flags:
  ours-premium      our app (Ray Serve router + gateway) -> premium tier (vLLM)
  vllm-serve        vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)
  ray-serve-llm     Ray Serve LLM's `build_openai_app` (optional: --with-ray-llm)
  ray-serve-llm-4ms the same, joining a stream's tokens for 4 ms, not 50 (--with-ray-llm-streaming)
  ours-standard     our app -> standard tier (llama.cpp, GGUF Q4_K_M)
  llama-server      llama.cpp's server alone, with the standard tier's flags
Closed-loop load at concurrency 1, 8 and 32 (streaming, fixed output length), every system
`--repeats` times (3), interleaved; the report gives medians and each ratio's median with
its min and max over the runs (`--levels 8x128,32x256`: other levels, e.g. long enough
for a steady state). Writes benchmarks/results/latest.{json,md} and PNG plots (`--out`:
another name).
Peak resident memory of every process is sampled while each system runs, and the CPU
each process spends per 1,000 output tokens (`cpu_cost.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks import holdback
from benchmarks.cpu_cost import CpuMeter, Profiles, pids_of, summary
from benchmarks.loadgen import LoadSpec, run_load, summarize
from benchmarks.repeats import median_levels, ratio_spread
from deployments.ports import free_port
from deployments.spec import HoldBack, TierSpec, flags_to_argv
from serve_app.ray_env import (
    LOCAL_AUTH,
    on_free_ports,
    ray_env,
    ray_started_with,
    stop_orphaned_haproxy,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Ray's metrics exported every second (default 10 s), so that a level's hold-back histogram
# can be read soon after it; Ray Serve LLM runs with the same setting
METRICS_EVERY_S = {"metrics_report_interval_ms": 1000}
# Ray Serve LLM's token batching at the granularity ours streams with one stream
# (`HoldBack.min_ms`): the two compared at the same promise of latency per token
STREAMING_BATCH_MS = HoldBack().min_ms
STREAMING_PEER = f"ray-serve-llm-{STREAMING_BATCH_MS:g}ms"


# ---- memory sampling ---------------------------------------------------------------------


class MemorySampler:
    """Peak RSS per process (by command name) and of all of them together."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.peak_total = 0
        self.series: list[tuple[float, int]] = []  # (monotonic time, total RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = 0
            for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
                try:
                    if p.info["pid"] == me or p.info["memory_info"] is None:
                        continue
                    rss = p.info["memory_info"].rss
                    cmd = " ".join(p.info["cmdline"] or [])
                    # lower-cased: vLLM titles its engine processes "VLLM::EngineCore" etc.
                    low = cmd.lower()
                    if not any(k in low for k in ("ray", "vllm", "llama", "serve", "python")):
                        continue
                    name = label(p.info["name"], cmd)
                    total += rss
                    self.peaks[name] = max(self.peaks.get(name, 0), rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_total = max(self.peak_total, total)
            self.series.append((time.monotonic(), total))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        top = sorted(self.peaks.items(), key=lambda kv: -kv[1])[:12]
        return {
            "peak_total_mib": round(self.peak_total / 2**20),
            "peak_by_process_mib": {k: round(v / 2**20) for k, v in top},
        }


def label(name: str, cmd: str) -> str:
    for key in (
        "llama-server",
        "EngineCore",
        "ServeReplica:kimi:tier-premium",
        "ServeReplica:kimi:tier-standard",
        "ServeReplica:kimi:tier-budget",
        "ServeReplica:kimi:Ingress",
        "ServeController",
        "ProxyActor",
        "gcs_server",
        "raylet",
        "vllm.entrypoints",
        "GatewayState",
        "LLMServer",
    ):
        if key in cmd or key in name:
            return key
    return name


# ---- systems under test ------------------------------------------------------------------


def serve_args() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def tier_spec(name: str) -> TierSpec:
    raw = next(t for t in serve_args()["tiers"] if t["name"] == name)
    return TierSpec.model_validate({k: v for k, v in raw.items() if k in TierSpec.model_fields})


def wait_http(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(url)


@contextlib.contextmanager
def our_app(args: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Our app on a Ray started as `ray start` is (cluster/ray.env), or with `env`."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    with ray_started_with({**(ray_env() if env is None else env), **on_free_ports(), **LOCAL_AUTH}):
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=METRICS_EVERY_S,
        )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args or serve_args()), name="kimi", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready")
    try:
        yield f"{url}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_orphaned_haproxy()


@contextlib.contextmanager
def process(
    argv: list[str], health: str, env: dict[str, str] | None = None, name: str | None = None
) -> Iterator[None]:
    name = name or f"{Path(argv[0]).name}-{argv[2] if len(argv) > 2 else ''}"
    log = open(RESULTS / f"{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        wait_http(health)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def vllm_flags(spec: TierSpec) -> dict[str, Any]:
    from deployments.engines.vllm.engine import KIMI_DEFAULT_FLAGS

    flags = {**KIMI_DEFAULT_FLAGS, **spec.engine_args, "max-model-len": spec.max_context}
    flags["tool-call-parser"] = "kimi_k2"  # vLLM's own parser; ours is a plugin of the app
    return flags


@contextlib.contextmanager
def vllm_serve() -> Iterator[str]:
    from deployments.artifacts.tiny_model import ensure_tiny_model

    spec, port = tier_spec("premium"), free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(ensure_tiny_model()),
        "--served-model-name",
        "kimi-k2.5",
        "--port",
        str(port),
        *flags_to_argv(vllm_flags(spec)),
    ]
    with process(argv, f"http://127.0.0.1:{port}/health", spec.env):
        yield f"http://127.0.0.1:{port}/v1"


# 1.100.0: later releases need a certifi newer than the package registry here has
LITELLM = "litellm[proxy]==1.100.0"
LITELLM_VENV = ROOT / ".venv-litellm"


def litellm_bin() -> Path:
    """LiteLLM's proxy in its own venv: its pins clash with vLLM's."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"installing {LITELLM} into {LITELLM_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", LITELLM]
        subprocess.run(pip, check=True)
    return exe


@contextlib.contextmanager
def litellm_proxy() -> Iterator[str]:
    """LiteLLM's proxy (the gateway peer) in front of `vllm serve`, one worker."""
    exe = litellm_bin()
    with vllm_serve() as upstream:
        port = free_port()
        config = RESULTS / "litellm-config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model_list": [
                        {
                            "model_name": "kimi-k2.5",
                            "litellm_params": {
                                "model": "hosted_vllm/kimi-k2.5",
                                "api_base": upstream,
                                "api_key": "none",
                            },
                        }
                    ],
                    # pass vLLM's own sampling fields (ignore_eos) through unchanged
                    "litellm_settings": {"drop_params": False},
                }
            )
        )
        argv = [str(exe), "--config", str(config), "--port", str(port), "--num_workers", "1"]
        with process(argv, f"http://127.0.0.1:{port}/health/liveliness", name="litellm-proxy"):
            yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def ray_serve_llm(
    env: dict[str, str] | None = None, batch_ms: float | None = None
) -> Iterator[str]:
    """Ray Serve LLM's OpenAI app on the premium tier's engine flags; `env`: what its
    Ray starts with (none: Ray Serve's defaults, as a user gets them); `batch_ms`: how long
    it joins a stream's tokens (none: its default, 50 ms)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.llm import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    from deployments.artifacts.tiny_model import ensure_tiny_model

    spec = tier_spec("premium")
    kwargs = {k.replace("-", "_"): v for k, v in vllm_flags(spec).items()}
    with ray_started_with({**(env or {}), **on_free_ports(), **LOCAL_AUTH}):
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": spec.env},
            _system_config=METRICS_EVERY_S,  # as ours: the same metrics cost on both
        )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = LLMConfig(
        model_loading_config={"model_id": "kimi-k2.5", "model_source": str(ensure_tiny_model())},
        engine_kwargs=kwargs,
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        placement_group_config={"bundles": [{"CPU": 1}]},  # no GPU: the CPU build of vLLM
        runtime_env={"env_vars": spec.env},
        experimental_configs={} if batch_ms is None else {"stream_batching_interval_ms": batch_ms},
    )
    # Built on the cluster, as `serve deploy` builds it: a handle made in this process
    # would keep the transport of this process's Ray environment, not the cluster's.
    app = {
        "name": "peer",
        "route_prefix": "/",
        "import_path": "ray.serve.llm:build_openai_app",
        "args": {"llm_configs": [config.model_dump(mode="json", exclude_unset=True)]},
    }
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        # the first request waits for the engine; send one before measuring
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(
                    f"{url}/chat/completions",
                    timeout=120,
                    json={
                        "model": "kimi-k2.5",
                        "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                if r.status_code == 200:
                    break
            time.sleep(2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_orphaned_haproxy()


@contextlib.contextmanager
def llama_server_alone() -> Iterator[str]:
    from deployments.engines.llama_cpp.engine import LlamaCppEngine

    engine = LlamaCppEngine(tier_spec("standard"))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    try:
        yield f"{engine.base_url}/v1"
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()


# ---- the run -------------------------------------------------------------------------------


def run_facts(module: str) -> dict[str, str]:
    """When, where, at which commit and with which command a report was made."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB, no GPU",
        "commit": commit,
        "command": f"python -m {module} " + " ".join(sys.argv[1:]),
    }


def measure(
    name: str,
    spec: LoadSpec,
    levels: list[tuple[int, int]],
    profile: tuple[str, ...] = (),
    tier: str | None = None,
) -> dict[str, Any]:
    """Each load level's latency and throughput, and the CPU each process spent on it;
    at the highest level, py-spy profiles of the `profile` roles (results/profiles/); for
    our app (`tier` named), how long that tier's replicas held tokens back."""
    out: dict[str, Any] = {}
    asyncio.run(run_load(spec, 4, concurrency=2))  # warm-up (prefix caches, first-call paths)
    ports = holdback.metrics_ports() if tier else []
    for concurrency, n in levels:
        roles = profile if concurrency == levels[-1][0] else ()
        spied = Profiles({r: pids_of(label, r) for r in roles}, 15, RESULTS / "profiles" / name)
        held = holdback.settled(ports, tier) if tier else {}
        with spied, CpuMeter(label) as cpu:
            load = run_load(spec, n, concurrency=concurrency, seed=concurrency)
            results, wall = asyncio.run(load)
        out[str(concurrency)] = summarize(results, wall)
        tokens = sum(r.output_tokens for r in results if r.ok)
        out[str(concurrency)]["cpu_ms_per_1k_tokens"] = cpu.per_1k_tokens(tokens)
        if tier:
            after = holdback.settled(ports, tier)
            out[str(concurrency)]["holdback"] = holdback.summary(held, after)
        if spied.files:
            out[str(concurrency)]["profile_top_frames"] = summary(spied.files)
        s = out[str(concurrency)]
        print(
            f"  {name:15s} c={concurrency:<3d} ttft p50 {s['ttft_p50_ms']:8.1f} ms  "
            f"itl p50 {s['itl_p50_ms']:7.2f} ms  {s['output_throughput']:8.1f} tok/s  "
            f"errors {s['errors']}",
            flush=True,
        )
    return out


def router_cost(iterations: int = 2000) -> dict[str, float]:
    """CPU time of the router's per-request decision path, in-process (no network)."""
    from serve_app.canonical import ChatRequest
    from serve_app.config import load_config
    from serve_app.gateway.limits import KeyState, Limits
    from serve_app.routing.tier_choice import (
        Live,
        candidate_tiers,
        choose_tier,
        estimate_tokens,
        needs_of,
    )

    cfg = load_config(serve_args())
    body = {
        "model": "kimi-k2.5",
        "messages": [{"role": "user", "content": "hello " * 50}],
        "max_tokens": 64,
        "stream": True,
    }
    raw = json.dumps(body).encode()
    state = KeyState(Limits(requests_per_minute=10**9, tokens_per_minute=10**12))
    plan = cfg.plans["standard"]
    start = time.process_time()
    for i in range(iterations):
        parsed = ChatRequest.model_validate(json.loads(raw))
        needs = needs_of(parsed, estimate_tokens(len(raw)), parsed.output_limit)
        cands = candidate_tiers(parsed.model, plan, "standard", cfg, needs)
        tier = choose_tier(cands, Live(), plan).tier
        state.check(100, tier.price.cost(50, 64), float(i))
        state.admit(100, float(i))
        state.settle(100, 90, 0.0, float(i))
    per = (time.process_time() - start) / iterations
    return {"decision_and_admission_cpu_us": round(per * 1e6, 1)}


def ratios(results: dict[str, Any], ours: str, peer: str) -> dict[str, float | None]:
    if ours not in results or peer not in results:
        return {}
    return level_ratios(results[ours], results[peer])


def level_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """Ours (`a`) over a peer (`b`), level by level; < 1 is better for latency."""

    def r(level: str, key: str) -> float | None:
        x, y = a.get(level, {}).get(key), b.get(level, {}).get(key)
        return round(x / y, 3) if x and y else None

    return {
        "ttft_p50_c1": r("1", "ttft_p50_ms"),
        "ttft_p95_c1": r("1", "ttft_p95_ms"),
        "ttft_p50_c8": r("8", "ttft_p50_ms"),
        "ttft_p95_c8": r("8", "ttft_p95_ms"),
        "itl_p50_c1": r("1", "itl_p50_ms"),
        "throughput_c1": r("1", "output_throughput"),
        "throughput_c8": r("8", "output_throughput"),
        "throughput_c32": r("32", "output_throughput"),
    }


def gateway_added(results: dict[str, Any]) -> dict[str, float]:
    """TTFT p50 a gateway adds over the engine's own server at concurrency 1 (ms)."""
    base = results.get("vllm-serve", {}).get("1", {}).get("ttft_p50_ms")
    out = {}
    for name in ("ours-premium", "litellm-proxy", "ray-serve-llm"):
        ttft = results.get(name, {}).get("1", {}).get("ttft_p50_ms")
        if base and ttft:
            out[name] = round(ttft - base, 2)
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark results ({report['date']})",
        "",
        f"Machine: {report['machine']}. Commit: `{report['commit']}`. "
        f"Command: `{report['command']}`.",
        "",
        "| system | concurrency | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | TPOT ms | "
        "output tok/s | req/s | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, levels in report["results"].items():
        for c, s in levels.items():
            lines.append(
                f"| {system} | {c} | {s['ttft_p50_ms']} | {s['ttft_p95_ms']} | "
                f"{s['itl_p50_ms']} | {s['tpot_mean_ms']} | {s['output_throughput']} | "
                f"{s['request_throughput']} | {s['errors']} |"
            )
    repeats = report.get("repeats", 1)
    lines += [
        "",
        f"Medians of {repeats} interleaved runs of every system. Ratios (ours / peer; < 1 is"
        " better for latency, > 1 for throughput), run by run: median [min, max]:",
        "",
    ]
    for pair, rs in report.get("ratio_spread", {}).items():
        if rs:
            spread = (f"{k} {v['median']} [{v['min']}, {v['max']}]" for k, v in rs.items())
            lines.append(f"- **{pair}**: " + ", ".join(spread))
    lines += [
        "",
        f"Router decision + admission CPU per request: "
        f"{report['router_cost']['decision_and_admission_cpu_us']} µs.",
        "",
        "TTFT p50 added over plain `vllm serve` at concurrency 1 (ms): "
        + (
            ", ".join(f"{k} {v}" for k, v in report.get("gateway_added_ttft_ms", {}).items())
            or "n/a"
        )
        + ".",
        "",
        "CPU milliseconds per 1,000 output tokens, by process (read from /proc around each"
        " level; `benchmarks/cpu_cost.py`):",
        "",
        "| system | concurrency | total | by process |",
        "|---|---|---|---|",
    ]
    for system, levels in report["results"].items():
        for c, s in levels.items():
            cpu = s.get("cpu_ms_per_1k_tokens") or {}
            parts = ", ".join(f"{k} {v}" for k, v in cpu.items())
            lines.append(f"| {system} | {c} | {round(sum(cpu.values()), 1)} | {parts} |")
    lines += holdback_lines(report)
    lines += ["", "Peak resident memory while each system ran (MiB):", ""]
    for system, mem in report["memory"].items():
        top = ", ".join(f"{k} {v}" for k, v in list(mem["peak_by_process_mib"].items())[:6])
        lines.append(f"- {system}: total {mem['peak_total_mib']} ({top})")
    return "\n".join(lines) + "\n"


def holdback_lines(report: dict[str, Any]) -> list[str]:
    """Our tier replicas' hold-back per level: every run's bucket bounds (ms) for the
    median, the 99th percentile and the longest wait of a message's oldest chunk."""
    lines = [
        "",
        "Hold-back in our tier replicas (`kimi_tier_holdback_seconds`; per run: p50 / p99 /"
        " max, each as the histogram bucket's upper bound in ms; messages sent):",
        "",
        "| system | concurrency | per run |",
        "|---|---|---|",
    ]
    for system, runs in report.get("runs", {}).items():
        for c in runs[0]:
            held = [run[c].get("holdback") for run in runs if c in run]
            cells = [
                " / ".join(holdback.bucket_ms(h, k) for k in ("p50", "p99", "max"))
                + f" ({h['messages']})"
                for h in held
                if h and h.get("messages")
            ]
            if cells:
                lines.append(f"| {system} | {c} | {'; '.join(cells)} |")
    return lines


def plots(report: dict[str, Any], prefix: str = "") -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for metric, title, fname in (
        ("ttft_p50_ms", "TTFT p50 (ms)", "ttft_vs_concurrency.png"),
        ("output_throughput", "output tokens/s", "throughput_vs_concurrency.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, levels in report["results"].items():
            xs = [int(c) for c in levels]
            ax.plot(xs, [levels[c][metric] for c in levels], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(title)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{prefix}{fname}", dpi=110)
        plt.close(fig)
        made.append(f"{prefix}{fname}")
    return made


def parse_levels(text: str) -> list[tuple[int, int]]:
    """`8x128,32x256` -> [(8, 128), (32, 256)]: concurrency and requests of each level."""
    try:
        levels = [tuple(int(n) for n in part.split("x")) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not CxN[,CxN...]: {text!r}") from exc
    if not levels or any(len(lv) != 2 or min(lv) < 1 for lv in levels):
        raise argparse.ArgumentTypeError(f"not CxN[,CxN...] with C, N >= 1: {text!r}")
    return levels  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    parser.add_argument("--with-ray-llm", action="store_true")
    parser.add_argument(
        "--with-ray-llm-optimized",
        action="store_true",
        help="Ray Serve LLM again, on the Ray environment ours runs on (cluster/ray.env)",
    )
    parser.add_argument(
        "--with-ray-llm-streaming",
        action="store_true",
        help=f"Ray Serve LLM again, joining a stream's tokens for {STREAMING_BATCH_MS:g} ms"
        " (ours with one stream) instead of its default 50",
    )
    parser.add_argument(
        "--with-litellm", action="store_true", help="LiteLLM's proxy before vllm serve"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of every system, interleaved (medians)"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated systems left out (ours, vllm-serve, llama-server), to iterate",
    )
    parser.add_argument(
        "--levels",
        type=parse_levels,
        help="concurrency x requests per level, e.g. 8x128,32x256 (default: 1x8,8x16,32x32"
        " with --quick, twice the requests without)",
    )
    parser.add_argument(
        "--out",
        default="latest",
        help="results/OUT.json, OUT.md and OUT_*.png (default: latest, with profiles)",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    scale = 1 if args.quick else 2
    skip = set(filter(None, args.skip.split(",")))
    levels = args.levels or [(1, 8 * scale), (8, 16 * scale), (32, 32 * scale)]
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    memory: dict[str, Any] = {}
    started = time.monotonic()

    def run(name: str, system: Any, model: str) -> None:
        print(f"{name}: starting", flush=True)
        with MemorySampler() as mem, system() as url:
            spec = LoadSpec(base_url=url, model=model, max_tokens=args.max_tokens)
            runs[name].append(measure(name, spec, levels))
        memory[name] = mem.report()

    def ours_both(profile: bool) -> None:
        with MemorySampler() as mem, our_app() as url:
            for name, tier in (("ours-premium", "premium"), ("ours-standard", "standard")):
                spec = LoadSpec(base_url=url, model=f"kimi-k2.5:{tier}", max_tokens=args.max_tokens)
                spied = ("ServeReplica:kimi:Ingress", f"ServeReplica:kimi:tier-{tier}")
                profiled = spied if profile else ()
                runs[name].append(measure(name, spec, levels, profiled, tier))
        memory["ours (all three tiers)"] = mem.report()

    for repeat in range(args.repeats):
        print(f"run {repeat + 1} of {args.repeats}; ours: starting the app", flush=True)
        if "ours" not in skip:
            ours_both(profile=repeat == 0 and args.out == "latest")
        if "vllm-serve" not in skip:
            run("vllm-serve", vllm_serve, "kimi-k2.5")
        if args.with_ray_llm:
            run("ray-serve-llm", ray_serve_llm, "kimi-k2.5")
        if args.with_ray_llm_optimized:
            run("ray-serve-llm-opt", functools.partial(ray_serve_llm, ray_env()), "kimi-k2.5")
        if args.with_ray_llm_streaming:
            streaming = functools.partial(ray_serve_llm, batch_ms=STREAMING_BATCH_MS)
            run(STREAMING_PEER, streaming, "kimi-k2.5")
        if args.with_litellm:
            run("litellm-proxy", litellm_proxy, "kimi-k2.5")
        if "llama-server" not in skip:
            run("llama-server", llama_server_alone, "kimi-k2.5:standard")

    results = {name: median_levels(rs) for name, rs in runs.items()}
    pairs = [
        ("ours-premium", "vllm-serve"),
        ("ours-premium", "ray-serve-llm"),
        ("ours-premium", "ray-serve-llm-opt"),
        ("ours-premium", STREAMING_PEER),
        ("ours-premium", "litellm-proxy"),
        ("ours-standard", "llama-server"),
    ]
    report = {
        **run_facts("benchmarks.compare"),
        "max_tokens": args.max_tokens,
        "results": results,
        "repeats": args.repeats,
        "ratios": {f"{a} / {b}": ratios(results, a, b) for a, b in pairs},
        # run i of ours over run i of the peer: median, min, max
        "ratio_spread": {
            f"{a} / {b}": ratio_spread(runs[a], runs[b], level_ratios)
            for a, b in pairs
            if a in runs and b in runs
        },
        "runs": runs,
        "router_cost": router_cost(),
        "gateway_added_ttft_ms": gateway_added(results),
        "memory": memory,
        "duration_s": round(time.monotonic() - started),
    }
    report["plots"] = plots(report, "" if args.out == "latest" else f"{args.out}_")
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
