"""Service tiers (OpenAI's `service_tier`, Anthropic's): the band a request is served in,
from what it asked and what its plan offers, and what the band changes: the tier's
price and the plan's weight in the fair queue (`config.ServiceTiers`)."""

from __future__ import annotations

from serve_app.config import Band, Plan, Price, ServiceTier


def served_band(asked: str | None, plan: Plan) -> ServiceTier:
    """`auto` or nothing: the plan's default band. A band the plan does not offer is
    served as `default`, as OpenAI serves a tier a project lacks, and the answer says
    which band it was."""
    if asked is None or asked == "auto":
        return plan.default_service_tier
    if asked == "flex" or asked == "priority":
        return asked if asked in plan.service_tiers else "default"
    return "default"


def banded(price: Price, band: Band) -> Price:
    """The tier's price in a band."""
    f = band.price_factor
    if f == 1.0:
        return price
    cached = price.cached_input_per_mtok
    return Price(
        input_per_mtok=price.input_per_mtok * f,
        output_per_mtok=price.output_per_mtok * f,
        cached_input_per_mtok=None if cached is None else cached * f,
    )
