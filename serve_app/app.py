"""Application builder: `serve_config.yaml` points Ray Serve at `serve_app.app:build_app`."""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from deployments.tier import build_tier
from serve_app.config import load_config
from serve_app.ingress import Ingress


def build_app(args: dict[str, Any]) -> Application:
    config = load_config(args)  # raises ConfigError naming the field
    tiers = {tier.name: build_tier(tier) for tier in config.tiers}
    router = config.router
    ingress = Ingress.options(
        num_replicas=router.num_replicas, max_replicas_per_node=router.max_replicas_per_node
    )
    return ingress.bind(config.model_dump(mode="json"), tiers)
