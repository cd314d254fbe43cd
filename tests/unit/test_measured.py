"""/v1/models shows a tier's measured tool-call accuracy only for the artifact measured."""

from __future__ import annotations

import json

from serve_app.api.openai.measured import measured_accuracy
from serve_app.config import TierEntry


def tier(quant: str) -> TierEntry:
    return TierEntry.model_validate(
        {
            "name": "standard",
            "engine": "llama.cpp",
            "artifact": {"kind": "embedded", "quant": quant},
            "max_context": 64,
            "price": {"input_per_mtok": 1, "output_per_mtok": 1},
        }
    )


def test_figures_only_for_the_measured_artifact(tmp_path):
    results = tmp_path / "tool_calls.json"
    entry = {
        "tier": "standard",
        "artifact": {
            "kind": "embedded",
            "quant": "Q4_K_M",
            "repo": None,
            "file": None,
            "path": None,
        },
        "forced_call_schema_valid": {"ok": 9, "of": 10, "rate": 0.9},
        "json_schema_valid": {"ok": 4, "of": 4, "rate": 1.0},
        "requests": 14,
    }
    results.write_text(json.dumps({"command": "python -m benchmarks.tool_calls", "tiers": [entry]}))
    shown = measured_accuracy([tier("Q4_K_M")], results)["standard"]
    assert shown["forced_call_schema_valid"] == 0.9 and shown["json_schema_valid"] == 1.0
    assert shown["measured_by"] == "python -m benchmarks.tool_calls"
    assert measured_accuracy([tier("Q2_K")], results) == {}
    assert measured_accuracy([tier("Q4_K_M")], tmp_path / "missing.json") == {}


def test_the_committed_results_are_where_models_reads_them():
    from serve_app.api.openai.measured import RESULTS

    assert RESULTS.is_file(), RESULTS
