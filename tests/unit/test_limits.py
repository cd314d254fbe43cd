"""Rate-limit and budget arithmetic with a fake clock."""

import pytest

from serve_app.gateway.limits import Bucket, KeyState, Limits


def test_bucket_refills_per_minute():
    b = Bucket(60)  # one a second
    b.take(60, now=0)
    assert b.wait_for(1, now=0) == pytest.approx(1.0)
    assert b.wait_for(1, now=0.5) == pytest.approx(0.5)
    assert b.wait_for(1, now=1.0) == 0
    assert b.wait_for(10, now=100) == 0 and b.level == 60  # never above capacity


def test_oversized_request_waits_for_a_full_bucket_not_forever():
    b = Bucket(100)
    assert b.wait_for(10_000, now=0) == 0
    b.take(10_000, now=0)  # goes deeply negative: later requests pay for it
    assert b.wait_for(1, now=0) == pytest.approx((9_900 + 1) / (100 / 60))


def test_rpm_denies_with_retry_after_and_recovers():
    s = KeyState(Limits(requests_per_minute=3))
    for _ in range(3):
        assert s.check(10, 0, now=0) is None
        s.admit(10, now=0)
        s.settle(10, 10, 0.0, now=0)
    denial = s.check(10, 0, now=0)
    assert denial is not None and denial.status == 429 and denial.code == "rate_limit_exceeded"
    assert denial.retry_after_s == pytest.approx(20.0)  # 3/min: one every 20 s
    assert s.check(10, 0, now=20.0) is None


def test_tokens_charged_on_estimate_and_settled_on_real_count():
    s = KeyState(Limits(tokens_per_minute=1000))
    s.admit(900, now=0)  # estimate
    assert s.check(200, 0, now=0) is not None  # 100 left
    s.settle(900, 150, 0.0, now=0)  # real count refunds 750
    assert s.tokens.level == pytest.approx(850)
    assert s.check(800, 0, now=0) is None
    s.admit(100, now=0)
    s.settle(100, 1000, 0.0, now=0)  # used more than estimated: charged the difference
    assert s.tokens.level == pytest.approx(850 - 1000)


def test_concurrency_cap():
    s = KeyState(Limits(max_concurrent=2))
    s.admit(1, 0)
    s.admit(1, 0)
    d = s.check(1, 0, 0)
    assert d is not None and d.code == "concurrency_limit_exceeded" and d.status == 429
    s.settle(1, 1, 0, 0)
    assert s.check(1, 0, 0) is None


def test_budgets_answer_402_and_roll_over_monthly():
    s = KeyState(Limits(monthly_token_budget=1000, monthly_spend_usd=1.0))
    s.roll_month("2026-11")
    s.admit(10, 0)
    s.settle(10, 990, 0.5, 0)
    d = s.check(20, 0.0, 0)
    assert d is not None and d.status == 402 and d.code == "insufficient_quota"
    s.roll_month("2026-11")
    assert s.check(20, 0.0, 0) is not None
    s.roll_month("2026-12")
    assert s.check(20, 0.0, 0) is None
    s.settle(0, 0, 0.99, 0)
    d = s.check(1, 0.02, 0)
    assert d is not None and "spend" in d.message


def test_headers_report_what_is_left():
    s = KeyState(Limits(requests_per_minute=10, tokens_per_minute=1000))
    s.admit(100, now=0)
    h = s.headers(now=0)
    assert h["x-ratelimit-limit-requests"] == "10"
    assert h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-remaining-tokens"] == "900"
    assert h["x-ratelimit-reset-tokens"] == "6.000s"


def test_changed_limits_rebuild_buckets_unchanged_keep_levels():
    s = KeyState(Limits(requests_per_minute=10))
    s.admit(1, 0)
    s.apply(Limits(requests_per_minute=10))
    assert s.requests.level == 9
    s.apply(Limits(requests_per_minute=20))
    assert s.requests.level == 20
    s.apply(Limits())
    assert s.requests is None and s.check(1, 0, 0) is None


def test_a_session_is_refused_once_its_cap_is_used():
    from serve_app.gateway.limits import session_denial

    tokens = Limits(max_session_tokens=100)
    assert session_denial(tokens, 99, 0.0) is None
    denial = session_denial(tokens, 100, 0.0)
    assert (denial.status, denial.code) == (402, "session_budget_exceeded")
    spend = Limits(max_session_spend_usd=0.5)
    assert session_denial(spend, 10**9, 0.49) is None
    assert session_denial(spend, 0, 0.5).code == "session_budget_exceeded"
    assert not Limits().caps_sessions and tokens.caps_sessions
