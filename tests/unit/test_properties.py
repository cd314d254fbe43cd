"""Property-based tests (hypothesis) of the arithmetic that guards money and latency:
rate-limit buckets, key admission, tier choice, replica ranking, autoscaling."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.protocol import EngineLoad
from deployments.scheduling.autoscaling import Demand, desired_replicas
from deployments.scheduling.replica_router import ReplicaView, rank_replicas
from serve_app.cli import app_args
from serve_app.config import load_config
from serve_app.gateway.limits import Bucket, KeyState, Limits
from serve_app.routing.tier_choice import (
    Live,
    LoadPolicy,
    Needs,
    candidate_tiers,
    choose_tier,
    pressure,
    up,
)

CFG = load_config(app_args(Path(__file__).resolve().parents[2] / "serve_config.yaml"))
settings.register_profile("ci", max_examples=200, deadline=None)
settings.load_profile("ci")

steps = st.lists(
    st.tuples(st.floats(0, 30, allow_nan=False), st.integers(1, 5000)), min_size=1, max_size=60
)


@given(capacity=st.integers(1, 10_000), steps=steps)
def test_bucket_never_overfills_and_every_wait_ends(capacity, steps):
    b, now = Bucket(capacity), 0.0
    for dt, amount in steps:
        now += dt
        wait = b.wait_for(amount, now)
        assert wait >= 0 and b.level <= capacity
        # waiting the answer is always enough: no request waits forever
        assert b.wait_for(amount, now + wait + 1e-6) == 0
        b.take(amount, now + wait)
        now += wait


@given(
    rpm=st.integers(1, 120),
    gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=200),
)
def test_admissions_never_exceed_the_rate(rpm, gaps):
    state, now, admitted = KeyState(Limits(requests_per_minute=rpm)), 0.0, 0
    for gap in gaps:
        now += gap
        if state.check(1, 0.0, now) is None:
            state.admit(1, now)
            state.settle(1, 1, 0.0, now)
            admitted += 1
    # a token bucket admits at most its burst plus its rate over the elapsed time
    assert admitted <= rpm + rpm * now / 60 + 1e-9


@given(
    limit=st.integers(1, 8),
    ops=st.lists(st.sampled_from(["start", "end"]), min_size=1, max_size=100),
)
def test_concurrency_cap_holds_under_any_interleaving(limit, ops):
    state = KeyState(Limits(max_concurrent=limit))
    open_requests = 0
    for op in ops:
        if op == "start" and state.check(1, 0.0, 0.0) is None:
            state.admit(1, 0.0)
            open_requests += 1
        elif op == "end" and open_requests:
            state.settle(1, 1, 0.0, 0.0)
            open_requests -= 1
        assert 0 <= state.in_flight == open_requests <= limit


@given(
    budget=st.integers(100, 100_000),
    requests=st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 5000)), max_size=80),
)
def test_token_budget_never_overspent_when_estimates_cover_usage(budget, requests):
    state = KeyState(Limits(monthly_token_budget=budget))
    for est, real in requests:
        real = min(real, est)  # the router's estimate includes max_tokens
        if state.check(est, 0.0, 0.0) is None:
            state.admit(est, 0.0)
            state.settle(est, real, 0.0, 0.0)
    assert state.month_tokens <= budget


loads = st.builds(
    EngineLoad,
    running=st.integers(0, 64),
    waiting=st.integers(0, 64),
    capacity=st.integers(1, 32),
    healthy=st.booleans(),
)
tier_loads = st.dictionaries(st.sampled_from(["premium", "standard", "budget"]), loads)


@given(
    plan=st.sampled_from(sorted(CFG.plans)),
    live=tier_loads,
    pinned=st.sampled_from([None, "premium", "standard", "budget"]),
)
def test_tier_choice_stays_within_what_the_plan_allows(plan, live, pinned):
    p = CFG.plans[plan]
    if pinned is not None and (pinned not in p.tiers or not p.allow_pin):
        return  # refused before choice (tested in test_routing)
    model = "kimi-k2.5" if pinned is None else f"kimi-k2.5:{pinned}"
    cands = candidate_tiers(model, p, plan, CFG, Needs())
    d = choose_tier(cands, Live(live), p, LoadPolicy())
    assert d.tier in cands
    assert d.degraded == (d.tier is not cands[0])
    if pinned is not None:
        assert d.tier.name == pinned
    if d.degraded and not p.allow_degrade:
        # only a first choice that is down (unhealthy, or lost: no replica reports
        # though it keeps some) moves a plan that may not degrade
        assert not up(cands[0], live)
    if d.shed:
        assert p.priority < LoadPolicy().shed_below_priority
        assert pressure(live.get(d.tier.name)) > LoadPolicy().shed_pressure


views = st.lists(
    st.builds(
        ReplicaView,
        replica_id=st.text("abcdef0123456789", min_size=4, max_size=8),
        running=st.integers(0, 8),
        waiting=st.integers(0, 8),
        capacity=st.integers(1, 8),
        in_flight=st.integers(0, 16),
        healthy=st.booleans(),
    ),
    max_size=6,
    unique_by=lambda v: v.replica_id,
)


@given(vs=views, key=st.one_of(st.none(), st.text(max_size=20)))
def test_replica_ranking_is_a_ranking_of_usable_replicas(vs, key):
    ranked = [r for rank in rank_replicas(vs, key) for r in rank]
    healthy = {v.replica_id for v in vs if v.healthy}
    expected = healthy or {v.replica_id for v in vs}
    assert sorted(ranked) == sorted(expected)  # each usable replica once, no other


@given(
    a=st.tuples(st.integers(0, 100), st.integers(0, 100), st.integers(0, 100)),
    extra=st.integers(0, 100),
    target=st.floats(0.5, 64),
)
def test_more_demand_never_means_fewer_replicas(a, extra, target):
    low = desired_replicas(Demand(*a), 1, target)[0]
    high = desired_replicas(Demand(a[0], a[1] + extra, a[2]), 1, target)[0]
    assert high >= low >= 0
    assert (low == 0) == (a[0] + a[1] == 0 and a[2] == 0)
