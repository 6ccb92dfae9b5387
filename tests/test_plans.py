"""What an assessment works out once per policy, token and hour, and what it never shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agentpolicy import evaluate
from agentpolicy.codec import load_policy
from agentpolicy.decisions import Code, Evaluation
from agentpolicy.rules import assess, judge
from agentpolicy.testing import payment

NOW = datetime(2026, 3, 10, 10, 59, 59, tzinfo=UTC)
USDT = {"limits": {"daily": {"value": "100", "decimals": 6, "symbol": "USDT"}}}


def _asset_words(evaluations: tuple[Evaluation, ...]) -> str:
    (asset,) = [e for e in evaluations if e.name == "asset"]
    return asset.detail


def test_the_asset_check_names_the_token_as_each_request_spells_it() -> None:
    policy = load_policy(USDT)
    first = evaluate(policy, payment(1, symbol="USDT"), {}, NOW)
    second = evaluate(policy, payment(1, symbol="usdt"), {}, NOW)
    assert first.allowed
    assert second.allowed
    assert _asset_words(first.evaluations) == "the payment is in USDT, a token the policy limits"
    assert _asset_words(second.evaluations) == "the payment is in usdt, a token the policy limits"


def test_the_next_hour_has_windows_of_its_own() -> None:
    policy = load_policy(USDT)
    before = evaluate(policy, payment(1), {}, NOW)
    after = evaluate(policy, payment(1), {}, NOW + timedelta(seconds=1))
    assert before.windows[0].key == "hourly:2026-03-10T10:00:00+00:00"
    assert after.windows[0].key == "hourly:2026-03-10T11:00:00+00:00"
    # the day is the same: a payment at 11:00 counts against the usage of 10:59
    used = {after.windows[1].key: payment(100).asset_amount}
    assert evaluate(policy, payment(1), used, NOW + timedelta(seconds=1)).code is Code.DAILY_LIMIT


def test_two_policies_alike_but_for_their_token_are_each_judged_by_their_own() -> None:
    usdt, usdc = (
        load_policy(USDT),
        load_policy({"limits": {"daily": {"value": "100", "decimals": 6, "symbol": "USDC"}}}),
    )
    for _ in range(2):  # alternately, so that a plan of one would be found for the other
        assert evaluate(usdt, payment(1), {}, NOW).allowed
        assert evaluate(usdc, payment(1), {}, NOW).code is Code.ASSET_MISMATCH


def test_a_budget_above_with_the_very_same_policy_keeps_counters_of_its_own() -> None:
    policy = load_policy(USDT)
    a = assess(policy, payment(1), NOW, ancestors=[("fleet", policy, None)])
    owners = {t.owner for t in a.tallies}
    assert owners == {None, "fleet"}
    # the fleet's daily counter full, the agent's empty: the fleet's limit denies
    fleet_daily = next(t for t in a.tallies if t.owner == "fleet" and "daily" in t.key)
    verdict = judge(a, {fleet_daily.usage_key: (100_000_000, 6, 0)})
    assert verdict.code is Code.DAILY_LIMIT
    assert verdict.budget_id == "fleet"
