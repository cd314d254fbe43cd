"""The capacity planner's arithmetic, pinned to published figures: Kimi K2.5's parameter
counts (1T total, 32B active), its MLA KV cache (70,272 B a token in BF16), the artifact
sizes the production config names, and the fit checks that refuse a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.cli import app_args, main
from serve_app.config import load_config
from serve_app.planner.inputs import node_types
from serve_app.planner.model import KIMI_K25_TEXT, ModelShape
from serve_app.planner.plan import PlanError, plan_config

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ROOT / "cluster" / "serve_config.production.yaml"
K25 = ModelShape.from_config(KIMI_K25_TEXT)


def test_k25_parameters_and_kv_cache():
    assert K25.total_params == pytest.approx(1.03e12, rel=0.01)  # "1T total parameters"
    assert K25.active_params == pytest.approx(32e9, rel=0.03)  # "32B activated"
    assert K25.routed_expert_params / K25.total_params == pytest.approx(0.9886, abs=0.001)
    assert K25.kv_bytes_per_token() == 61 * (512 + 64) * 2 == 70_272
    # without MLA: every head's key and value (padded to the key's 192 wide)
    assert K25.kv_bytes_per_token(mla=False) == 61 * 64 * 2 * 192 * 2


def plans(config_path: Path = PRODUCTION, nodes: Path | None = None, **chosen: str):
    config = load_config(app_args(config_path))
    return {
        p.tier: p for p in plan_config(config, node_types(nodes) if nodes else node_types(), chosen)
    }


def test_the_production_config_fits_its_nodes():
    p = plans()
    premium, standard, budget = p["premium"], p["standard"], p["budget"]
    assert premium.artifact_gb == 555 and standard.artifact_gb == 620 and budget.artifact_gb == 375
    # premium: 8x H200 at 0.92, TP 8: ~69 GB of weights a GPU, MLA cache whole on each rank
    assert premium.gpus_per_replica == 8 and premium.replicas_per_node == 1
    usable = 0.92 * 141 - 555 / 8 - 6
    assert premium.kv_tokens == pytest.approx(usable * 1e9 / 70_272, rel=1e-3)
    assert premium.kv_tokens // premium.max_context == 2  # two full 256K sequences, nearly 3
    # GGUF tiers: routed experts in host RAM, the rest and the KV cache on the GPUs
    assert standard.host_gb_needed == pytest.approx(620 - K25.non_expert_params / 1e9, abs=1)
    assert standard.kv_tokens == 131_072 * 4
    assert budget.replicas_per_node == 2  # two 1-GPU replicas of ~363 GB on a 1 TB node
    assert all(x.decode_tps_full >= x.decode_tps_one > 0 for x in p.values())


def test_a_budget_tier_on_a_node_with_too_little_ram_names_the_tier_and_shortfall(tmp_path):
    nodes = yaml.safe_load((ROOT / "cluster" / "node_types.yaml").read_text())
    nodes["small-ram"] = {**nodes["h200x2-1tb"], "host_ram_gb": 256}
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(nodes))
    with pytest.raises(PlanError) as refused:
        plans(nodes=path, budget="small-ram")
    message = str(refused.value)
    assert message.startswith("budget on small-ram: needs 363 GB of host RAM a replica")
    assert "has 256 GB (short by 107 GB)" in message


def test_a_context_past_the_kv_cache_is_refused(tmp_path):
    config = yaml.safe_load(PRODUCTION.read_text())
    premium = config["applications"][0]["args"]["tiers"][0]
    premium["engine_args"]["tensor-parallel-size"] = 8
    premium["engine_args"]["gpu-memory-utilization"] = 0.5
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PlanError, match=r"premium on h200x8: weights and runtime need 75 GB"):
        plans(path)
    premium["engine_args"]["gpu-memory-utilization"] = 0.58
    premium["max_context"] = 262_144
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PlanError, match="premium on h200x8: max_context 262144 is more than"):
        plans(path, premium="h200x8")


def test_the_command_prints_a_table_and_fails_with_the_reason(capsys, tmp_path):
    main(["plan", str(PRODUCTION)])
    out = capsys.readouterr().out
    for tier in ("premium", "standard", "budget"):
        assert f"\n{tier} | " in out
    assert "roofline bounds" in out and "assumptions:" in out
    main(["plan", str(PRODUCTION), "--json"])
    assert '"kv_bytes_per_token": 70272' in capsys.readouterr().out
    with pytest.raises(SystemExit) as failed:
        main(["plan", str(PRODUCTION), "--node-type", "premium=h100x8"])
    assert failed.value.code == 2
    assert "premium on h100x8" in capsys.readouterr().err
