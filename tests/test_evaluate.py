from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import (
    AgentPolicy,
    Amount,
    Code,
    Decision,
    Outcome,
    PaymentRequest,
    PolicyValidationError,
    Window,
    evaluate,
    load_policy,
    windows_for,
)
from agentpolicy.examples import example_policy
from agentpolicy.rules import assess, conclude

MONDAY_10 = datetime(2026, 1, 19, 10, tzinfo=UTC)


def req(amount: int | str = 1_000_000, **kw: Any) -> PaymentRequest:
    kw.setdefault("recipient", "0xaddr1")
    kw.setdefault("network", "eip155:8453")
    return PaymentRequest(agent_id=kw.pop("agent_id", "agent-1"), amount=amount, **kw)


def decide(
    policy: dict[str, Any] | AgentPolicy | None,
    request: PaymentRequest | None = None,
    usage: Mapping[str, Amount] | None = None,
    now: datetime = MONDAY_10,
) -> Decision:
    p = load_policy(policy) if isinstance(policy, dict) else policy
    return evaluate(p, request or req(), usage or {}, now)


def usage_of(policy: dict[str, Any], now: datetime, **by_period: int) -> dict[str, Amount]:
    windows = {w.period.value: w for w in windows_for(load_policy(policy), now)}
    return {windows[p].key: Amount(v) for p, v in by_period.items()}


def test_codes_are_exactly_the_contract_strings() -> None:
    expected = {
        "ALLOWED", "NO_POLICY", "POLICY_DISABLED", "DELEGATION_REVOKED", "DELEGATION_EXPIRED",
        "BLOCKED_PERIOD", "OUTSIDE_ALLOWED_WINDOW",
        "RECIPIENT_BLOCKED", "RECIPIENT_NOT_WHITELISTED", "NETWORK_BLOCKED",
        "NETWORK_NOT_ALLOWED", "CATEGORY_REQUIRED", "CATEGORY_BLOCKED", "CATEGORY_NOT_ALLOWED",
        "ASSET_MISMATCH", "PER_TRANSACTION_LIMIT", "HOURLY_LIMIT", "DAILY_LIMIT",
        "WEEKLY_LIMIT", "MONTHLY_LIMIT", "YEARLY_LIMIT", "LIFETIME_LIMIT", "ROLLING_LIMIT",
        "COUNT_LIMIT", "SCOPED_LIMIT", "APPROVAL_REQUIRED",
    }  # fmt: skip
    assert {c.value for c in Code} == expected
    assert Code.DAILY_LIMIT == "DAILY_LIMIT"


def test_no_policy_and_disabled_policy_deny() -> None:
    none = decide(None)
    assert (none.allowed, none.code) == (False, Code.NO_POLICY)
    assert [e.name for e in none.evaluations] == ["policy"]
    off = decide({"enabled": False})
    assert (off.allowed, off.code) == (False, "POLICY_DISABLED")


def test_an_empty_policy_allows_and_lists_every_check_in_order() -> None:
    d = decide({})
    assert (d.allowed, d.code, d.requires_approval) == (True, Code.ALLOWED, False)
    assert [e.name for e in d.evaluations] == [
        "policy", "blocked_periods", "allowed_windows", "merchant_rules", "network_rules",
        "category_rules", "asset", "per_transaction_limit", "hourly_limit", "daily_limit",
        "weekly_limit", "monthly_limit", "yearly_limit", "lifetime_limit", "approval_threshold",
    ]  # fmt: skip
    assert {e.outcome for e in d.evaluations[1:]} == {Outcome.SKIP}
    assert len(d.windows) == 6


def test_every_check_runs_and_the_first_failure_decides() -> None:
    policy = {
        "merchantRules": {"blacklist": ["0xaddr1"]},
        "networkRules": {"blockedNetworks": ["eip155:8453"]},
        "limits": {"daily": {"value": "1"}},
    }
    d = decide(policy)
    assert d.code == Code.RECIPIENT_BLOCKED
    failed = [e.code for e in d.evaluations if e.outcome is Outcome.FAIL]
    assert failed == [Code.RECIPIENT_BLOCKED, Code.NETWORK_BLOCKED, Code.DAILY_LIMIT]
    assert d.reason == d.evaluations[3].detail


# --- time ---------------------------------------------------------------------------

BLOCKED = {
    "timeRules": {
        "blockedPeriods": [{"start": "2026-01-20T00:00:00Z", "end": "2026-01-21T00:00:00Z"}]
    }
}


@pytest.mark.parametrize(
    ("now", "code"),
    [
        (datetime(2026, 1, 19, 23, 59, 59, 999999, tzinfo=UTC), Code.ALLOWED),
        (datetime(2026, 1, 20, tzinfo=UTC), Code.BLOCKED_PERIOD),
        (datetime(2026, 1, 20, 12, tzinfo=UTC), Code.BLOCKED_PERIOD),
        (datetime(2026, 1, 21, tzinfo=UTC), Code.BLOCKED_PERIOD),  # inclusive end
        (datetime(2026, 1, 21, 0, 0, 0, 1, tzinfo=UTC), Code.ALLOWED),
    ],
)
def test_blocked_periods_are_inclusive_at_both_ends(now: datetime, code: Code) -> None:
    assert decide(BLOCKED, now=now).code == code


def test_blocked_period_compares_instants_whatever_the_offset() -> None:
    berlin_midnight = datetime.fromisoformat("2026-01-20T01:00:00+01:00")
    assert decide(BLOCKED, now=berlin_midnight).code == Code.BLOCKED_PERIOD


WEEKDAYS_9_17 = {
    "timeRules": {"allowedWindows": [{"days": [1, 2, 3, 4, 5], "startHour": 9, "endHour": 17}]}
}


@pytest.mark.parametrize(
    ("now", "code"),
    [
        (datetime(2026, 1, 19, 8, 59, 59, tzinfo=UTC), Code.OUTSIDE_ALLOWED_WINDOW),
        (datetime(2026, 1, 19, 9, tzinfo=UTC), Code.ALLOWED),  # start hour included
        (datetime(2026, 1, 19, 16, 59, 59, tzinfo=UTC), Code.ALLOWED),
        (datetime(2026, 1, 19, 17, tzinfo=UTC), Code.OUTSIDE_ALLOWED_WINDOW),  # end excluded
        (datetime(2026, 1, 18, 12, tzinfo=UTC), Code.OUTSIDE_ALLOWED_WINDOW),  # Sunday
        (datetime(2026, 1, 24, 12, tzinfo=UTC), Code.OUTSIDE_ALLOWED_WINDOW),  # Saturday
        (datetime(2026, 1, 23, 12, tzinfo=UTC), Code.ALLOWED),  # Friday
    ],
)
def test_allowed_window_hours_and_days_at_their_edges(now: datetime, code: Code) -> None:
    assert decide(WEEKDAYS_9_17, now=now).code == code


def test_end_hour_24_covers_the_last_hour_and_sunday_is_zero() -> None:
    policy = {"timeRules": {"allowedWindows": [{"days": [0], "startHour": 22, "endHour": 24}]}}
    assert decide(policy, now=datetime(2026, 1, 18, 23, 59, 59, tzinfo=UTC)).allowed
    assert not decide(policy, now=datetime(2026, 1, 19, 0, 0, tzinfo=UTC)).allowed  # Monday
    assert not decide(policy, now=datetime(2026, 1, 18, 21, 59, tzinfo=UTC)).allowed


def test_allowed_windows_read_the_clock_in_the_policy_timezone() -> None:
    policy = {
        "timeRules": {
            "allowedWindows": [{"days": [1], "startHour": 9, "endHour": 17}],
            "timezone": "America/New_York",
        }
    }
    # 14:00 UTC on Monday is 09:00 in New York; 13:59 UTC is 08:59
    assert decide(policy, now=datetime(2026, 1, 19, 14, tzinfo=UTC)).allowed
    outside = decide(policy, now=datetime(2026, 1, 19, 13, 59, tzinfo=UTC))
    assert outside.code == Code.OUTSIDE_ALLOWED_WINDOW
    assert "America/New_York" in outside.reason
    # 03:00 UTC on Tuesday is still Monday 22:00 in New York: not in 9-17
    assert not decide(policy, now=datetime(2026, 1, 20, 3, tzinfo=UTC)).allowed


def test_allowed_windows_across_a_dst_change_follow_local_hours() -> None:
    policy = {
        "timeRules": {
            "allowedWindows": [{"days": [0, 1, 2, 3, 4, 5, 6], "startHour": 9, "endHour": 10}],
            "timezone": "Europe/Berlin",
        }
    }
    # before the change Berlin is UTC+1, after it UTC+2
    assert decide(policy, now=datetime(2026, 3, 28, 8, 30, tzinfo=UTC)).allowed
    assert not decide(policy, now=datetime(2026, 3, 29, 8, 30, tzinfo=UTC)).allowed
    assert decide(policy, now=datetime(2026, 3, 29, 7, 30, tzinfo=UTC)).allowed


def test_allowed_windows_answer_each_instant_of_an_hour_and_each_policy_apart() -> None:
    # the answer is kept per policy and hour of the policy's zone; its words name the minute
    policy = load_policy(WEEKDAYS_9_17)
    at_0905 = decide(policy, now=datetime(2026, 1, 19, 9, 5, tzinfo=UTC))
    at_0945 = decide(policy, now=datetime(2026, 1, 19, 9, 45, tzinfo=UTC))
    words = [
        {e.name: e.detail for e in d.evaluations}["allowed_windows"] for d in (at_0905, at_0945)
    ]
    assert "Monday 09:05 UTC" in words[0]
    assert "Monday 09:45 UTC" in words[1]
    nights = load_policy({"timeRules": {"allowedWindows": [{"days": [1], "startHour": 0,
                                                            "endHour": 9}]}})  # fmt: skip
    assert decide(nights, now=datetime(2026, 1, 19, 9, 5, tzinfo=UTC)).code == (
        Code.OUTSIDE_ALLOWED_WINDOW
    )
    assert decide(policy, now=datetime(2026, 1, 19, 9, 6, tzinfo=UTC)).allowed


def test_allowed_windows_in_a_half_hour_zone_turn_at_local_hours() -> None:
    # Kolkata is UTC+5:30: 03:29 and 03:30 UTC are one UTC hour but 08:59 and 09:00 there
    policy = load_policy({"timeRules": {
        "allowedWindows": [{"days": [1], "startHour": 9, "endHour": 10}],
        "timezone": "Asia/Kolkata",
    }})  # fmt: skip
    assert not decide(policy, now=datetime(2026, 1, 19, 3, 29, tzinfo=UTC)).allowed
    assert decide(policy, now=datetime(2026, 1, 19, 3, 30, tzinfo=UTC)).allowed
    assert decide(policy, now=datetime(2026, 1, 19, 4, 29, tzinfo=UTC)).allowed
    assert not decide(policy, now=datetime(2026, 1, 19, 4, 30, tzinfo=UTC)).allowed


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(PolicyValidationError):
        decide({}, now=datetime(2026, 1, 19))


@pytest.mark.parametrize(
    ("args", "paths"),
    [
        (({"limits": {}}, req(), {}, MONDAY_10), ["$.policy"]),  # the JSON form, not loaded
        ((None, {"agent_id": "agent-1"}, {}, MONDAY_10), ["$.request"]),
        ((None, req(), None, MONDAY_10), ["$.usage"]),
        ((None, req(), {"k": "5"}, MONDAY_10), ["$.usage['k']"]),
        ((None, req(), {"k": (1, -6)}, MONDAY_10), ["$.usage['k']"]),
        ((None, req(), {"k": (True, 6)}, MONDAY_10), ["$.usage['k']"]),
        ((None, req(), {7: Amount(1)}, MONDAY_10), ["$.usage"]),
        (("policy", "request", [], "now"), ["$.now", "$.policy", "$.request", "$.usage"]),
    ],
)
def test_arguments_of_the_wrong_kind_are_invalid_input_naming_each(
    args: tuple[Any, Any, Any, Any], paths: list[str]
) -> None:
    with pytest.raises(PolicyValidationError) as caught:
        evaluate(*args)
    assert caught.value.code == "INVALID_INPUT"
    assert [p.path for p in caught.value.problems] == paths


def test_usage_may_mix_amounts_and_unit_tuples() -> None:
    policy = load_policy(
        {"limits": {"daily": {"value": "10000000"}, "hourly": {"value": "6000000"}}}
    )
    key = {w.period: w.key for w in windows_for(policy, MONDAY_10)}
    mixed = {key["daily"]: Amount(8_000_000), key["hourly"]: (4_000_000, 6, 2)}
    assert evaluate(policy, req(2_000_000), mixed, MONDAY_10).code == Code.ALLOWED
    assert evaluate(policy, req(2_000_001), mixed, MONDAY_10).code == Code.HOURLY_LIMIT
    mixed[key["daily"]] = Amount(9_000_001)
    assert evaluate(policy, req(1_000_000), mixed, MONDAY_10).code == Code.DAILY_LIMIT


# --- merchant, network, category -----------------------------------------------------------


def test_blacklist_is_checked_before_whitelist() -> None:
    policy = {"merchantRules": {"whitelist": ["0xaddr1"], "blacklist": ["0xaddr1"]}}
    assert decide(policy).code == Code.RECIPIENT_BLOCKED


@pytest.mark.parametrize(
    ("rules", "recipient", "code"),
    [
        ({"whitelist": ["0xAddr1"]}, "0xADDR1", Code.ALLOWED),
        ({"whitelist": ["0xaddr1"]}, "0xaddr2", Code.RECIPIENT_NOT_WHITELISTED),
        ({"whitelist": [], "requireWhitelist": True}, "0xaddr1", Code.RECIPIENT_NOT_WHITELISTED),
        ({"whitelist": [], "requireWhitelist": False}, "0xaddr9", Code.ALLOWED),
        ({"blacklist": ["0xBAD"]}, "0xbad", Code.RECIPIENT_BLOCKED),
        ({"blacklist": ["0xBAD"]}, "0XBAD", Code.RECIPIENT_BLOCKED),
        ({"blacklist": ["So1Base58"]}, "so1base58", Code.ALLOWED),  # base58 case counts
        ({"blacklist": ["So1Base58"]}, "So1Base58", Code.RECIPIENT_BLOCKED),
        ({"whitelist": ["So1Base58"]}, "SO1BASE58", Code.RECIPIENT_NOT_WHITELISTED),
    ],
)
def test_merchant_rules(rules: dict[str, Any], recipient: str, code: Code) -> None:
    assert decide({"merchantRules": rules}, req(recipient=recipient)).code == code


@pytest.mark.parametrize(
    ("rules", "network", "code"),
    [
        ({"blockedNetworks": ["eip155:56"]}, "EIP155:56", Code.NETWORK_BLOCKED),
        ({"allowedNetworks": ["eip155:8453"]}, "eip155:1", Code.NETWORK_NOT_ALLOWED),
        ({"allowedNetworks": ["eip155:8453"]}, "EIP155:8453", Code.ALLOWED),
        ({"allowedNetworks": []}, "eip155:1", Code.ALLOWED),
        (
            {"allowedNetworks": ["eip155:56"], "blockedNetworks": ["eip155:56"]},
            "eip155:56",
            Code.NETWORK_BLOCKED,
        ),
    ],
)
def test_network_rules(rules: dict[str, Any], network: str, code: Code) -> None:
    assert decide({"networkRules": rules}, req(network=network)).code == code


@pytest.mark.parametrize(
    ("rules", "category", "code"),
    [
        ({"allowedCategories": ["api_usage"]}, None, Code.CATEGORY_REQUIRED),
        ({"allowedCategories": ["api_usage"]}, "", Code.CATEGORY_REQUIRED),
        ({"allowedCategories": ["api_usage"]}, "API_Usage", Code.ALLOWED),
        ({"allowedCategories": ["api_usage"]}, "gambling", Code.CATEGORY_NOT_ALLOWED),
        ({"blockedCategories": ["Gambling"]}, "gambling", Code.CATEGORY_BLOCKED),
        ({"blockedCategories": ["gambling"]}, None, Code.ALLOWED),
        (
            {"allowedCategories": ["gambling"], "blockedCategories": ["gambling"]},
            "gambling",
            Code.CATEGORY_BLOCKED,
        ),
    ],
)
def test_category_rules(rules: dict[str, Any], category: str | None, code: Code) -> None:
    assert decide({"categoryRules": rules}, req(category=category)).code == code


# --- assets and limits ---------------------------------------------------------------------


def test_a_request_in_another_token_is_an_asset_mismatch_never_ignored() -> None:
    policy = {"limits": {"daily": {"value": "100", "symbol": "USDC"}}}
    d = decide(policy, req(amount=10**30, symbol="DAI"))
    assert d.code == Code.ASSET_MISMATCH
    daily = next(e for e in d.evaluations if e.name == "daily_limit")
    assert daily.outcome is Outcome.SKIP
    assert decide(policy, req(amount=50, symbol="usdc")).allowed  # case-insensitive


def test_threshold_symbols_count_for_the_asset_check() -> None:
    policy = {
        "approvalConfig": {
            "thresholds": [
                {"amount": {"value": "1", "symbol": "EURC"}, "requiredApprovers": 1,
                 "approvers": ["a"]}
            ]
        }
    }  # fmt: skip
    assert decide(policy, req(symbol="USDT")).code == Code.ASSET_MISMATCH


def test_per_transaction_limit_equal_passes_and_one_more_unit_denies() -> None:
    policy = {"limits": {"perTransaction": {"value": "100000000"}}}
    assert decide(policy, req(100_000_000)).allowed
    assert decide(policy, req(100_000_001)).code == Code.PER_TRANSACTION_LIMIT


def test_limits_compare_across_decimals_exactly() -> None:
    policy = {"limits": {"perTransaction": {"value": "1000000", "decimals": 6}}}
    assert decide(policy, req(10**18, decimals=18)).allowed  # exactly 1 USDT
    assert decide(policy, req(10**18 + 1, decimals=18)).code == Code.PER_TRANSACTION_LIMIT
    assert decide(policy, req(101, decimals=2)).code == Code.PER_TRANSACTION_LIMIT


@pytest.mark.parametrize("period", ["hourly", "daily", "weekly", "monthly"])
def test_window_limit_uses_used_plus_amount(period: str) -> None:
    policy = {"limits": {period: {"value": "100"}}}
    at_limit = usage_of(policy, MONDAY_10, **{period: 60})
    assert decide(policy, req(40), at_limit).allowed
    d = decide(policy, req(41), at_limit)
    assert d.code == f"{period.upper()}_LIMIT"
    assert "would exceed" in d.reason


def test_usage_from_another_window_does_not_count() -> None:
    policy = {"limits": {"daily": {"value": "100"}}}
    yesterday = usage_of(policy, MONDAY_10 - timedelta(days=1), daily=100)
    assert decide(policy, req(100), yesterday).allowed
    today = usage_of(policy, MONDAY_10, daily=100)
    assert decide(policy, req(1), today).code == Code.DAILY_LIMIT


def test_usage_in_finer_decimals_counts_exactly() -> None:
    policy = {"limits": {"daily": {"value": "100"}}}
    key = usage_of(policy, MONDAY_10, daily=0).popitem()[0]
    used = {key: Amount(99 * 10**12 + 1, 18)}  # 99.000001 base units of 6 decimals
    assert decide(policy, req(1), used).code == Code.DAILY_LIMIT
    assert decide(policy, req(10**12 - 1, decimals=18), used).allowed


def test_five_payments_of_30_against_100_three_pass() -> None:
    policy = {"limits": {"daily": {"value": "100"}}}
    key = usage_of(policy, MONDAY_10, daily=0).popitem()[0]
    used = 0
    allowed = 0
    for _ in range(5):
        d = decide(policy, req(30), {key: Amount(used)})
        if d.allowed:
            used += 30
            allowed += 1
    assert (allowed, used) == (3, 90)


def test_limits_accumulate_per_period_independently() -> None:
    policy = {"limits": {"hourly": {"value": "50"}, "daily": {"value": "120"}}}
    usage = usage_of(policy, MONDAY_10, hourly=0, daily=100)
    d = decide(policy, req(30), usage)
    assert d.code == Code.DAILY_LIMIT
    hourly = next(e for e in d.evaluations if e.name == "hourly_limit")
    assert hourly.outcome is Outcome.PASS


def test_forty_digit_limits_and_amounts_are_exact() -> None:
    limit = 10**40
    policy = {"limits": {"daily": {"value": str(limit)}}}
    usage = usage_of(policy, MONDAY_10, daily=limit - 5)
    assert decide(policy, req(5), usage).allowed
    assert decide(policy, req(6), usage).code == Code.DAILY_LIMIT


def test_a_zero_amount_request_is_invalid_input() -> None:
    with pytest.raises(PolicyValidationError) as err:
        req(0)
    assert err.value.problems[0].path == "$.amount"


def test_a_zero_limit_denies_every_payment() -> None:
    assert decide({"limits": {"daily": {"value": "0"}}}, req(1)).code == Code.DAILY_LIMIT


# --- approval thresholds -------------------------------------------------------------------

APPROVALS = {
    "approvalConfig": {
        "thresholds": [
            {"amount": {"value": "100000000"}, "requiredApprovers": 1, "approvers": ["a", "b"]},
            {"amount": {"value": "1000000000"}, "requiredApprovers": 2,
             "approvers": ["a", "b", "c"]},
        ]
    }
}  # fmt: skip


@pytest.mark.parametrize(
    ("amount", "needed"),
    [(99_999_999, None), (100_000_000, 1), (999_999_999, 1), (1_000_000_000, 2), (10**12, 2)],
)
def test_the_highest_threshold_met_decides(amount: int, needed: int | None) -> None:
    d = decide(APPROVALS, req(amount))
    if needed is None:
        assert (d.allowed, d.code, d.threshold) == (True, Code.ALLOWED, None)
    else:
        assert (d.allowed, d.requires_approval, d.code) == (False, True, "APPROVAL_REQUIRED")
        assert d.threshold is not None
        assert d.threshold.required_approvers == needed


def test_thresholds_are_matched_regardless_of_their_order_in_the_policy() -> None:
    reordered = {
        "approvalConfig": {"thresholds": list(reversed(APPROVALS["approvalConfig"]["thresholds"]))}
    }
    d = decide(reordered, req(2_000_000_000))
    assert d.threshold is not None
    assert d.threshold.required_approvers == 2


def test_a_denial_wins_over_an_approval_requirement() -> None:
    policy = {**APPROVALS, "limits": {"perTransaction": {"value": "200000000"}}}
    d = decide(policy, req(500_000_000))
    assert (d.code, d.requires_approval) == (Code.PER_TRANSACTION_LIMIT, False)


def test_the_example_policy_decides_sample_payments() -> None:
    policy = load_policy(example_policy())
    ok = req(5_000_000, recipient="0xaddr1", category="api_usage")
    assert evaluate(policy, ok, {}, MONDAY_10).code == Code.ALLOWED
    big = req(100_000_000, recipient="0xaddr2", network="eip155:1", category="subscription")
    assert evaluate(policy, big, {}, MONDAY_10).code == Code.APPROVAL_REQUIRED
    bsc = req(1, recipient="0xaddr1", network="eip155:56", category="api_usage")
    assert evaluate(policy, bsc, {}, MONDAY_10).code == Code.NETWORK_BLOCKED
    maintenance = datetime(2026, 1, 20, 10, tzinfo=UTC)
    assert evaluate(policy, ok, {}, maintenance).code == Code.BLOCKED_PERIOD


def test_decision_windows_are_the_windows_of_now() -> None:
    d = decide({})
    assert all(isinstance(w, Window) and w.contains(MONDAY_10) for w in d.windows)


def test_a_threshold_in_another_token_is_said_not_to_apply_not_to_be_passed() -> None:
    policy = {
        "limits": {"daily": {"value": "100000000", "symbol": "USDC"}},
        "assets": [{"symbol": "ETH", "limits": {
            "daily": {"value": str(10**18), "decimals": 18, "symbol": "ETH"}}}],
        "approvalConfig": {"thresholds": [{"amount": {"value": "50", "symbol": "USDC"},
                                           "requiredApprovers": 1, "approvers": ["x@y"]}]},
    }  # fmt: skip
    eth = decide(policy, req(10**17, symbol="ETH", decimals=18))
    (check,) = [e for e in eth.evaluations if e.name == "approval_threshold"]
    # it read "0.1 ETH is below every approval threshold": an ETH payment of any size is
    assert (eth.code, check.outcome, check.detail) == (
        Code.ALLOWED,
        Outcome.SKIP,
        "no approval threshold in ETH",
    )
    usdc = decide(policy, req(5, symbol="USDC"))
    (check,) = [e for e in usdc.evaluations if e.name == "approval_threshold"]
    assert (check.outcome, check.detail) == (
        Outcome.PASS,
        "0.000005 USDC is below every approval threshold",
    )


_GIVEN = {
    "reservation_id": "res_x",
    "approval_id": "apr_x",
    "expires_at": MONDAY_10 + timedelta(minutes=5),
    "policy_version": 7,
    "decided_at": MONDAY_10,
}


@pytest.mark.parametrize(
    ("policy", "amount", "code"),
    [
        ({}, 1_000_000, Code.ALLOWED),
        ({"limits": {"daily": {"value": "1", "decimals": 6}}}, 2, Code.DAILY_LIMIT),
        (
            {"approvalConfig": {"thresholds": [{"amount": {"value": "5", "decimals": 6},
                                                 "requiredApprovers": 1, "approvers": ["a"]}]}},
            9,
            Code.APPROVAL_REQUIRED,
        ),
        (None, 1, Code.NO_POLICY),
    ],
)  # fmt: skip
def test_the_engine_fields_land_in_their_own_fields(
    policy: dict[str, Any] | None, amount: int, code: Code
) -> None:
    # conclude() (the engine's way to a decision) sets each field it is given, by name, and
    # a field beyond them too; what it does not name stays as evaluate() decides it
    assessment = assess(None if policy is None else load_policy(policy), req(amount), MONDAY_10)
    plain = evaluate(assessment.policy, req(amount), {}, MONDAY_10)
    for given in ({}, _GIVEN, {"policy_version": 3}, {**_GIVEN, "dry_run": True}):
        made = conclude(assessment, {}, **given)
        assert made.code is code is plain.code
        expected = {**dict.fromkeys(_GIVEN), **given}
        assert {k: getattr(made, k) for k in expected} == expected
        assert made.dry_run is given.get("dry_run", False)
        assert (made.allowed, made.requires_approval, made.threshold, made.budget_id) == (
            plain.allowed, plain.requires_approval, plain.threshold, plain.budget_id)  # fmt: skip
        assert (made.reason, made.evaluations, made.windows) == (
            plain.reason, plain.evaluations, plain.windows)  # fmt: skip
