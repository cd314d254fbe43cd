"""What each tier measured of its own contract (benchmarks/tool_calls.py: forced tool
calls and JSON-schema answers that validate), shown in `/v1/models` beside its
quantization. A result counts for a tier only when it was measured on that tier's
artifact: the embedded default's figures never label a production model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serve_app.config import TierEntry

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "tool_calls.json"
SHOWN = ("forced_call_schema_valid", "json_schema_valid")


def measured_accuracy(tiers: list[TierEntry], path: Path = RESULTS) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    by_name = {t.name: t for t in tiers}
    out: dict[str, dict[str, Any]] = {}
    for entry in data.get("tiers") or ():
        tier = by_name.get(entry.get("tier"))
        measured = {k: v for k, v in (entry.get("artifact") or {}).items() if v is not None}
        if tier is None or measured != tier.artifact.model_dump(mode="json", exclude_none=True):
            continue
        out[tier.name] = {key: entry[key]["rate"] for key in SHOWN if key in entry}
        out[tier.name]["requests"] = entry.get("requests")
        out[tier.name]["measured_by"] = data.get("command")
    return out
