"""Catalogue validation: a bad config fails at build time and names the field."""

from pathlib import Path

import pytest

from serve_app.cli import app_args
from serve_app.config import AppConfig, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def embedded() -> dict:
    return app_args(ROOT / "serve_config.yaml")


def test_embedded_default_is_valid():
    cfg = load_config(embedded())
    assert [t.name for t in cfg.tiers] == ["premium", "standard", "budget"]
    assert {t.engine for t in cfg.tiers} == {"vllm", "llama.cpp"}
    assert cfg.tier("standard").artifact.quant == "Q4_K_M"
    assert cfg.tier("budget").artifact.quant == "Q2_K"
    assert set(cfg.plans) == {"free", "standard", "premium", "enterprise"}


def test_production_config_is_valid():
    cfg = load_config(app_args(ROOT / "cluster" / "serve_config.production.yaml"))
    assert cfg.tier("premium").artifact.repo == "moonshotai/Kimi-K2.5"


@pytest.mark.parametrize(
    ("path", "per_node"), [("cluster/serve_config.production.yaml", 1), ("serve_config.yaml", None)]
)
def test_router_replicas_per_node_reach_the_router_deployment(path, per_node):
    """Production keeps its two routers on different nodes, so a lost node leaves one
    serving; the one-node default sets no cap (it would leave the second unplaced)."""
    from serve_app.app import build_app

    router = build_app(app_args(ROOT / path))._bound_deployment  # Ray keeps it private
    assert router.num_replicas == 2
    assert router._replica_config.max_replicas_per_node == per_node


def test_config_path_may_name_a_serve_config():
    cfg = load_config({"config_path": "cluster/serve_config.production.yaml"})
    assert cfg.router.anonymous_plan is None and cfg.tier("budget").autoscaling.min_replicas == 0


def test_config_path_arg_loads_a_file(tmp_path):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(embedded()))
    assert len(load_config({"config_path": str(p)}).tiers) == 3


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c["tiers"][0].pop("max_context"), "tiers.0.max_context"),
        (lambda c: c["tiers"][0].update(engine="tgi"), "tiers.0.engine"),
        (lambda c: c["tiers"][1]["price"].update(input_per_mtok=-1), "tiers.1.price.input_per"),
        (lambda c: c["tiers"][0].update(name="Premium Tier"), "tiers.0.name"),
        (lambda c: c["tiers"][0].update(bogus=1), "tiers.0.bogus"),
        (lambda c: c["tiers"][0]["artifact"].update(kind="huggingface"), "artifact.repo"),
        (
            lambda c: c["tiers"][2]["autoscaling"].update(min_replicas=3, max_replicas=2),
            "min_replicas",
        ),
        (lambda c: c["plans"]["free"].update(tiers=["gold"]), "plans.free.tiers"),
        (lambda c: c["plans"]["free"].update(tiers=[]), "plans.free.tiers"),
        (lambda c: c["router"].update(anonymous_plan="vip"), "router.anonymous_plan"),
        (lambda c: c["router"].update(max_replicas_per_node=0), "router.max_replicas_per_node"),
        (lambda c: c["tiers"].append(dict(c["tiers"][0])), "duplicate tier"),
    ],
)
def test_invalid_config_names_the_field(mutate, field):
    cfg = embedded()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert field in str(err.value)


def test_price_cost_counts_cached_tokens_at_their_rate():
    price = AppConfig.model_validate(embedded()).tier("premium").price
    full = price.cost(prompt=1_000_000, completion=0)
    cached = price.cost(prompt=1_000_000, completion=0, cached=1_000_000)
    assert full == pytest.approx(0.60)
    assert cached == pytest.approx(0.15)
    assert price.cost(0, 1_000_000) == pytest.approx(2.50)
