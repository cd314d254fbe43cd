"""The Grafana dashboard (cluster/grafana/kimi-serve.json) names only metrics the code
exports: a renamed metric would otherwise leave a panel silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_kimi_metric_on_the_dashboard_is_one_the_code_defines():
    dashboard = json.loads((ROOT / "cluster" / "grafana" / "kimi-serve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    # Ray exports `name` as ray_name, counters with _total, histograms with _bucket
    used = {
        m.group(1)
        for e in exprs
        for m in re.finditer(r"\bray_(kimi_\w+?)(?:_total|_bucket|_sum|_count)?\b", e)
    }
    source = "".join(
        p.read_text() for d in ("serve_app", "deployments") for p in (ROOT / d).rglob("*.py")
    )
    defined = set(re.findall(r'"(kimi_[a-z_]+)"', source))
    assert used and used <= defined, sorted(used - defined)
    assert {"kimi_queue_waiting", "kimi_queue_wait_seconds", "kimi_queue_timeouts"} <= used
