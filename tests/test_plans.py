"""What an assessment works out once per policy, token and hour, and what it never shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import evaluate
from agentpolicy.amounts import Amount
from agentpolicy.codec import load_policy
from agentpolicy.decisions import Code, Evaluation
from agentpolicy.policy import AgentPolicy, ApprovalConfig, ApprovalThreshold
from agentpolicy.rules import assess, judge, matching_threshold
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


PAYEES = {
    **USDT,
    "merchantRules": {"whitelist": ["0xaddr1", "shop.eth"], "blacklist": ["0xbad"]},
    "networkRules": {"allowedNetworks": ["eip155:8453"]},
    "categoryRules": {"allowedCategories": ["api_usage"]},
}


def _words(decision: object, name: str) -> str:
    (check,) = [e for e in decision.evaluations if e.name == name]  # type: ignore[attr-defined]
    return str(check.detail)


def test_each_payee_is_checked_as_its_request_spells_it() -> None:
    # the payee checks are kept per plan by recipient, network and category as spelled: a key
    # missing any of them, or folding them, would answer one payee's checks for another
    policy = load_policy(PAYEES)
    cases = [
        (payment(1, recipient="0xaddr1", category="api_usage"), Code.ALLOWED, "", ""),
        (payment(1, recipient="0xbad", category="api_usage"), Code.RECIPIENT_BLOCKED,
         "merchant_rules", "recipient 0xbad is blacklisted"),
        (payment(1, recipient="0xother", category="api_usage"), Code.RECIPIENT_NOT_WHITELISTED,
         "merchant_rules", "recipient 0xother is not on the whitelist"),
        (payment(1, recipient="0xaddr1", network="eip155:1", category="api_usage"),
         Code.NETWORK_NOT_ALLOWED, "network_rules", "network eip155:1 is not allowed"),
        (payment(1, recipient="0xaddr1", category="gambling"), Code.CATEGORY_NOT_ALLOWED,
         "category_rules", "category gambling is not allowed"),
        (payment(1, recipient="0xaddr1"), Code.CATEGORY_REQUIRED, "category_rules",
         "a category is required"),
        (payment(1, recipient="0xaddr1", category="api_usage"), Code.ALLOWED, "network_rules",
         "network eip155:8453 is allowed"),
        (payment(1, recipient="0xaddr1", network="EIP155:8453", category="api_usage"),
         Code.ALLOWED, "network_rules", "network EIP155:8453 is allowed"),
        (payment(1, recipient="0xBAD", category="api_usage"), Code.RECIPIENT_BLOCKED,
         "merchant_rules", "recipient 0xBAD is blacklisted"),
        (payment(1, recipient="0xaddr1", category="API_USAGE"), Code.ALLOWED, "category_rules",
         "category API_USAGE is allowed"),
    ]  # fmt: skip
    for _ in range(2):  # the second round finds every payee's checks kept
        for request, code, name, words in cases:
            decision = evaluate(policy, request, {}, NOW)
            assert decision.code is code, (request, decision.reason)
            if name:
                assert _words(decision, name) == words


def test_a_payee_seen_in_one_policy_is_judged_afresh_by_another() -> None:
    strict = load_policy(PAYEES)
    open_ = load_policy(USDT)
    request = payment(1, recipient="0xbad", category="api_usage")
    for _ in range(2):
        assert evaluate(strict, request, {}, NOW).code is Code.RECIPIENT_BLOCKED
        assert evaluate(open_, request, {}, NOW).allowed


def _highest_met_as_listed(thresholds: list[ApprovalThreshold], amount: Amount) -> object:
    """The rule, written plainly: the highest threshold in the token met; of equals, the first."""
    best = None
    for t in thresholds:
        if t.amount.symbol.casefold() != amount.symbol.casefold():
            continue
        if amount.compare(t.amount) >= 0 and (best is None or t.amount.compare(best.amount) > 0):
            best = t
    return best


_THRESHOLD_AMOUNTS = st.builds(
    Amount,
    st.integers(1, 10**6),
    st.integers(0, 8),
    st.sampled_from(["USDT", "usdt"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_THRESHOLD_AMOUNTS, min_size=1, max_size=6), st.integers(1, 10**7),
       st.integers(0, 8), st.sampled_from(["USDT", "usdt", "USDC"]))  # fmt: skip
def test_the_ranked_thresholds_find_the_highest_one_met_as_the_plain_rule_does(
    amounts: list[Amount], value: int, decimals: int, symbol: str
) -> None:
    # amounts in several decimals, the token spelled in either case, payments in another token;
    # a policy repeats no threshold amount (an equal one in other decimals or tokens neither)
    distinct: list[Amount] = []
    for a in amounts:
        if not any(a.compare(b) == 0 for b in distinct):
            distinct.append(a)
    thresholds = [
        ApprovalThreshold(amount=a, required_approvers=1, approvers=(f"approver{i}",))
        for i, a in enumerate(distinct)
    ]
    policy = AgentPolicy(approval_config=ApprovalConfig(thresholds=tuple(thresholds)))
    amount = Amount(value, decimals, symbol)
    expected = _highest_met_as_listed(thresholds, amount)
    assert matching_threshold(policy, amount) is expected
    decision = evaluate(policy, payment(value, decimals=decimals, symbol=symbol), {}, NOW)
    assert decision.threshold is expected


def test_a_blocked_period_inside_the_hour_or_ending_as_it_begins_blocks_its_instants() -> None:
    # the plan keeps the blocked periods that reach into its hour; both ends block (inclusive)
    hour = datetime(2026, 3, 10, 10, tzinfo=UTC)
    policy = load_policy({**USDT, "timeRules": {"blockedPeriods": [
        {"start": "2026-03-10T10:30:00Z", "end": "2026-03-10T10:45:00Z"},
        {"start": "2026-03-10T09:00:00Z", "end": "2026-03-10T10:00:00Z"},
        {"start": "2026-03-10T11:00:00Z", "end": "2026-03-10T12:00:00Z"},
    ]}})  # fmt: skip
    expected = [
        (hour, Code.BLOCKED_PERIOD),  # the end of the period before the hour
        (hour + timedelta(microseconds=1), Code.ALLOWED),
        (hour + timedelta(minutes=29, seconds=59), Code.ALLOWED),
        (hour + timedelta(minutes=30), Code.BLOCKED_PERIOD),
        (hour + timedelta(minutes=45), Code.BLOCKED_PERIOD),
        (hour + timedelta(minutes=45, microseconds=1), Code.ALLOWED),
        (hour + timedelta(minutes=59, seconds=59, microseconds=999_999), Code.ALLOWED),
        (hour + timedelta(hours=1), Code.BLOCKED_PERIOD),  # the next hour's plan
    ]
    for _ in range(2):
        for now, code in expected:
            assert evaluate(policy, payment(1), {}, now).code is code, now
