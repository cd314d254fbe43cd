"""`kimi-serve` command line: build the embedded artifacts, check a config, wait for a
deployment, manage API keys (through the admin API) and report metered usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def app_args(serve_config: Path, app: str | None = None) -> dict:
    apps = yaml.safe_load(serve_config.read_text())["applications"]
    chosen = next((a for a in apps if app is None or a["name"] == app), None)
    if chosen is None:
        raise SystemExit(f"no application {app!r} in {serve_config}")
    return chosen.get("args") or {}


def build_artifacts(serve_config: Path) -> None:
    """Build every embedded artifact the config names, so replicas start without waiting."""
    from deployments.artifacts.resolve import resolve_artifact, resolve_mmproj

    config = load_config(app_args(serve_config))
    for tier in config.tiers:
        if tier.artifact.kind == "embedded":
            print(f"{tier.name}: {resolve_artifact(tier.artifact)}")
            if tier.engine == "llama.cpp" and (mmproj := resolve_mmproj(tier)):
                print(f"{tier.name} mmproj: {mmproj}")


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/ready", timeout=10)
            if r.status_code == 200:
                print(r.text)
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{url} not ready after {timeout:.0f}s")


def admin_client() -> httpx.Client:
    token = os.environ.get("KIMI_SERVE_ADMIN_TOKEN")
    if not token:
        raise SystemExit("set KIMI_SERVE_ADMIN_TOKEN to the admin credential")
    url = os.environ.get("KIMI_SERVE_URL", "http://127.0.0.1:8000")
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30)


def print_answer(r: httpx.Response) -> None:
    if r.status_code >= 400:
        raise SystemExit(r.json().get("error", {}).get("message", r.text))
    print(json.dumps(r.json(), indent=2))


def keys_command(args: argparse.Namespace) -> None:
    with admin_client() as c:
        if args.keys_cmd == "create":
            overrides = {
                k: v
                for k, v in {
                    "requests_per_minute": args.rpm,
                    "tokens_per_minute": args.tpm,
                    "max_concurrent": args.max_concurrent,
                    "monthly_spend_usd": args.monthly_spend_usd,
                }.items()
                if v is not None
            }
            expires = time.time() + args.expires_in_days * 86400 if args.expires_in_days else None
            r = c.post(
                "/admin/keys",
                json={
                    "plan": args.plan,
                    "name": args.name,
                    "overrides": overrides,
                    "expires_at": expires,
                },
            )
        elif args.keys_cmd == "list":
            r = c.get("/admin/keys")
        else:
            r = c.delete(f"/admin/keys/{args.key_id}")
    print_answer(r)


def webhooks_command(args: argparse.Namespace) -> None:
    """Register (`add`), list or delete a key's webhook endpoints; the signing secret is
    shown once, when made."""
    path = f"/admin/keys/{args.key_id}/webhook_endpoints"
    with admin_client() as c:
        if args.webhooks_cmd == "add":
            spec = {"url": args.url, "name": args.name, "event_types": args.events.split(",")}
            r = c.post(path, json=spec)
        elif args.webhooks_cmd == "delete":
            r = c.delete(f"{path}/{args.endpoint_id}")
        else:
            r = c.get(path)
    print_answer(r)


def usage_report(root: Path, by: list[str]) -> str:
    """Requests, tokens and cost grouped by the given columns (key_id/plan/tier/day/...)."""
    from serve_app.gateway.usage_query import usage_summary
    from serve_app.gateway.usage_rollups import Recounting

    try:
        summary = usage_summary(root, by)
    except Recounting as exc:  # the gateway counts them again beside its writes
        raise SystemExit(f"{exc}; try again shortly") from None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not summary:
        return "no usage recorded"
    cols = list(summary[0])
    rows = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in summary:
        rows.append(" | ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in r.values()))
    return "\n".join(rows)


def plan_command(args: argparse.Namespace) -> None:
    """`kimi-serve plan CONFIG`: the capacity plan of every tier (serve_app/planner/)."""
    from serve_app.planner.inputs import node_types
    from serve_app.planner.plan import PlanError, plan_config, table

    chosen = dict(pair.split("=", 1) for pair in args.node_type if "=" in pair)
    try:
        config = load_config(app_args(args.config, args.app))
        nodes = node_types(args.node_types) if args.node_types else node_types()
        plans = plan_config(config, nodes, chosen)
    except (ConfigError, PlanError, ValueError) as exc:
        print(f"the plan does not fit:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps([p.model_dump() for p in plans], indent=2))
    else:
        print(table(plans))


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="capacity plan of a serve config (starts nothing)")
    p.add_argument("config", type=Path)
    p.add_argument("--app", default=None)
    p.add_argument(
        "--node-type",
        action="append",
        default=[],
        metavar="TIER=TYPE",
        help="the node type a tier runs on, past its config's node_type",
    )
    p.add_argument("--node-types", type=Path, default=None, help="node types YAML")
    p.add_argument("--json", action="store_true")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-serve")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-artifacts", help="build the tiny model and its GGUF files")
    b.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    c = sub.add_parser("check-config", help="validate a serve config's application args")
    c.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    c.add_argument("--app", default=None)
    w = sub.add_parser("wait-ready", help="wait until the app answers /ready")
    w.add_argument("--url", default="http://127.0.0.1:8000")
    w.add_argument("--timeout", type=float, default=600)
    k = sub.add_parser("keys", help="create, list or revoke API keys (admin API)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("--plan", required=True)
    kc.add_argument("--name", default="")
    kc.add_argument("--rpm", type=int)
    kc.add_argument("--tpm", type=int)
    kc.add_argument("--max-concurrent", type=int)
    kc.add_argument("--monthly-spend-usd", type=float)
    kc.add_argument("--expires-in-days", type=float)
    ksub.add_parser("list")
    kr = ksub.add_parser("revoke")
    kr.add_argument("key_id")
    w = sub.add_parser("webhooks", help="a key's webhook endpoints (through the admin API)")
    wsub = w.add_subparsers(dest="webhooks_cmd", required=True)
    wa = wsub.add_parser("add")
    wa.add_argument("key_id")
    wa.add_argument("url")
    wa.add_argument("--name", default="")
    wa.add_argument(
        "--events",
        default="response.completed,response.failed,response.cancelled,response.incomplete",
    )
    wl = wsub.add_parser("list")
    wl.add_argument("key_id")
    wd = wsub.add_parser("delete")
    wd.add_argument("key_id")
    wd.add_argument("endpoint_id")
    add_plan_parser(sub)
    u = sub.add_parser("usage", help="usage report from the metered Parquet files")
    u.add_argument("--dir", type=Path, default=None, help="usage dir (default: state dir)")
    u.add_argument("--by", default="key_id,plan,tier,day")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    if args.cmd == "build-artifacts":
        build_artifacts(args.config)
    elif args.cmd == "check-config":
        try:
            cfg = load_config(app_args(args.config, args.app))
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(2) from None
        print(f"ok: {len(cfg.tiers)} tiers, {len(cfg.plans)} plans")
    elif args.cmd == "wait-ready":
        wait_ready(args.url, args.timeout)
    elif args.cmd == "keys":
        keys_command(args)
    elif args.cmd == "webhooks":
        webhooks_command(args)
    elif args.cmd == "plan":
        plan_command(args)
    elif args.cmd == "usage":
        from serve_app.config import state_dir

        print(usage_report(args.dir or state_dir(None) / "usage", args.by.split(",")))


if __name__ == "__main__":
    main()
