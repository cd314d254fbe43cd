"""Tier choice policy with plain inputs (no Ray, no engines)."""

from pathlib import Path

import pytest

from deployments.protocol import EngineLoad
from serve_app.cli import app_args
from serve_app.config import load_config
from serve_app.errors import APIError
from serve_app.routing.tier_choice import (
    LatencyWindow,
    Live,
    LoadPolicy,
    Needs,
    candidate_tiers,
    choose_tier,
)

CFG = load_config(app_args(Path(__file__).resolve().parents[2] / "serve_config.yaml"))


def pick(model: str, plan: str, needs: Needs | None = None) -> str:
    cands = candidate_tiers(model, CFG.plans[plan], plan, CFG, needs or Needs())
    return choose_tier(cands, Live(), CFG.plans[plan]).tier.name


def test_base_model_follows_plan_preference():
    assert pick("kimi-k2.5", "enterprise") == "premium"
    assert pick("kimi-k2.5", "standard") == "standard"
    assert pick("kimi-k2.5", "free") == "budget"


def test_pin_within_plan():
    assert pick("kimi-k2.5:budget", "standard") == "budget"
    assert pick("kimi-k2.5:premium", "enterprise") == "premium"


@pytest.mark.parametrize(
    ("model", "plan", "status", "code"),
    [
        ("kimi-k2.5:premium", "standard", 403, "tier_not_in_plan"),
        ("kimi-k2.5:budget", "free", 403, "tier_not_in_plan"),  # free may not pin at all
        ("kimi-k2.5:gold", "enterprise", 404, "model_not_found"),
        ("gpt-4o", "enterprise", 404, "model_not_found"),
        ("kimi-k2.5:", "enterprise", 404, "model_not_found"),
    ],
)
def test_refusals(model, plan, status, code):
    with pytest.raises(APIError) as err:
        pick(model, plan)
    assert (err.value.status, err.value.code) == (status, code)
    assert err.value.param == "model"


def test_capability_filter_skips_tiers_and_explains_refusal():
    cfg = CFG.model_copy(deep=True)
    for name in ("standard", "budget"):
        cfg.tier(name).capabilities.vision = False
    plan = cfg.plans["enterprise"]
    assert candidate_tiers("kimi-k2.5", plan, "enterprise", cfg, Needs(vision=True))[0].name == (
        "premium"
    )
    with pytest.raises(APIError) as err:
        candidate_tiers("kimi-k2.5:budget", plan, "enterprise", cfg, Needs(vision=True))
    assert err.value.status == 400 and "vision" in err.value.message


def test_unhealthy_tier_is_skipped():
    tiers = candidate_tiers("kimi-k2.5", CFG.plans["enterprise"], "enterprise", CFG, Needs())
    loads = {"premium": EngineLoad(healthy=False), "standard": EngineLoad()}
    decision = choose_tier(tiers, Live(loads))
    assert decision.tier.name == "standard" and decision.degraded


def busy(running: int, waiting: int = 0, capacity: int = 4) -> EngineLoad:
    return EngineLoad(running=running, waiting=waiting, capacity=capacity)


def decide(
    plan: str,
    loads: dict,
    model: str = "kimi-k2.5",
    ttft: dict | None = None,
    policy: LoadPolicy | None = None,
    cfg=CFG,
):
    p = cfg.plans[plan]
    cands = candidate_tiers(model, p, plan, cfg, Needs())
    return choose_tier(cands, Live(loads, ttft or {}), p, policy or LoadPolicy())


def test_load_below_overload_keeps_first_choice():
    d = decide("standard", {"standard": busy(4), "budget": busy(0)})
    assert d.tier.name == "standard" and not d.degraded and not d.shed


def test_degradable_plan_spills_to_a_tier_with_room():
    d = decide("standard", {"standard": busy(4, 3), "budget": busy(1)})
    assert d.tier.name == "budget" and d.degraded


def test_spill_skips_tiers_that_are_also_overloaded():
    d = decide("enterprise", {"premium": busy(4, 4), "standard": busy(4, 4), "budget": busy(0)})
    assert d.tier.name == "budget" and d.degraded
    d = decide("enterprise", {"premium": busy(4, 4), "standard": busy(4, 4), "budget": busy(9)})
    assert d.tier.name == "premium" and not d.degraded  # nowhere better: queue at premium


def test_plan_that_may_not_degrade_keeps_its_tier():
    d = decide("premium", {"premium": busy(4, 8), "standard": busy(0)})
    assert d.tier.name == "premium" and not d.degraded and not d.shed  # priority 2: queued


def test_pinned_model_never_spills():
    d = decide("standard", {"standard": busy(4, 8), "budget": busy(0)}, "kimi-k2.5:standard")
    assert d.tier.name == "standard" and not d.degraded


def test_lowest_priority_is_shed_first_when_saturated():
    d = decide("free", {"budget": busy(4, 5)})  # pressure 2.25 > 2.0, priority 0 < 1
    assert d.shed
    assert not decide("free", {"budget": busy(4, 3)}).shed
    assert not decide("standard", {"standard": busy(4, 8), "budget": busy(4, 8)}).shed


def with_slo(ms: float):
    cfg = CFG.model_copy(deep=True)
    cfg.tier("premium").slo.ttft_ms = ms
    return cfg


def test_missed_ttft_objective_spills_degradable_plans_only():
    cfg = with_slo(500)
    loads = {"premium": busy(1, capacity=32), "standard": busy(0)}
    slow = {"premium": 900.0}
    d = decide("enterprise", loads, ttft=slow, cfg=cfg)
    assert d.tier.name == "standard" and d.degraded
    d = decide("premium", loads, ttft=slow, cfg=cfg)  # may not degrade: keeps premium
    assert d.tier.name == "premium" and not d.degraded
    d = decide("enterprise", loads, ttft={"premium": 400.0}, cfg=cfg)  # within objective
    assert d.tier.name == "premium"


def test_tier_scaled_to_zero_is_not_unhealthy():
    # A tier with no reports (scaled to zero) stays a candidate: a request wakes it.
    assert decide("free", {}).tier.name == "budget"
    d = decide("standard", {"standard": busy(4, 4)})  # budget reports nothing
    assert d.tier.name == "budget" and d.degraded


def test_baseline_strategies():
    loads = {"standard": busy(4, 8), "budget": busy(0)}
    d = decide("standard", loads, policy=LoadPolicy(strategy="plan_only"))
    assert d.tier.name == "standard" and not d.degraded
    seen = {
        decide("standard", {}, policy=LoadPolicy(strategy="random")).tier.name for _ in range(64)
    }
    assert seen == {"standard", "budget"}


def test_context_picks_a_tier_that_fits_or_refuses():
    plan = CFG.plans["enterprise"]
    fits = candidate_tiers("kimi-k2.5", plan, "enterprise", CFG, Needs(context_tokens=20000))
    assert [t.name for t in fits] == ["premium", "standard"]  # budget serves 16384
    cfg = CFG.model_copy(deep=True)
    cfg.plans["enterprise"].tiers = ["budget", "standard", "premium"]
    fits = candidate_tiers(
        "kimi-k2.5", cfg.plans["enterprise"], "enterprise", cfg, Needs(context_tokens=30000)
    )
    assert [t.name for t in fits] == ["premium"]
    with pytest.raises(APIError) as err:
        candidate_tiers("kimi-k2.5", plan, "enterprise", CFG, Needs(context_tokens=40000))
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    assert "32768" in err.value.message


def test_latency_window_needs_samples_and_forgets_old_ones():
    w = LatencyWindow(window_s=30, min_samples=5)
    for i in range(4):
        w.observe("premium", 100.0 * (i + 1), now=0.0)
    assert w.p90_ms(now=1.0) == {}  # 4 samples: not yet a trend
    w.observe("premium", 1000.0, now=1.0)
    assert w.p90_ms(now=2.0) == {"premium": 1000.0}
    assert w.counts(now=30.5) == {"premium": 1}  # the first four aged out...
    assert w.p90_ms(now=30.5) == {}  # ...and one is no trend: the console shows the count


def test_requests_sent_since_the_last_reading_count_at_once():
    p = CFG.plans["standard"]
    cands = candidate_tiers("kimi-k2.5", p, "standard", CFG, Needs())
    loads = {"standard": busy(3), "budget": busy(0)}
    assert choose_tier(cands, Live(loads), p).tier.name == "standard"
    burst = Live(loads, sent={"standard": 2})  # 5 of 4 slots once these two land
    d = choose_tier(cands, burst, p)
    assert d.tier.name == "budget" and d.degraded


def test_a_tier_that_keeps_replicas_but_reports_none_is_down_one_that_scales_to_zero_is_not():
    """Standard keeps a replica (min_replicas 1): reporting nothing while others report,
    it was lost with its node, and the plan's next tier serves. Budget may scale to zero:
    reporting nothing, a request wakes it."""
    p = CFG.plans["standard"]  # standard, then budget
    cands = candidate_tiers("kimi-k2.5", p, "standard", CFG, Needs())
    others = {"premium": EngineLoad()}
    assert choose_tier(cands, Live(others), p).tier.name == "budget"
    assert choose_tier(cands, Live({**others, "standard": EngineLoad()}), p).tier.name == "standard"
    free = CFG.plans["free"]  # budget only, scaled to zero
    only = candidate_tiers("kimi-k2.5", free, "free", CFG, Needs())
    assert choose_tier(only, Live(others), free).tier.name == "budget"
