from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import attrs
import pytest

from agentpolicy import (
    AgentPolicy,
    Amount,
    ApprovalConfig,
    ApprovalThreshold,
    BlockedPeriod,
    CategoryRules,
    Code,
    MerchantRules,
    NetworkRules,
    PaymentRequest,
    PolicyValidationError,
    SpendingLimits,
    TimeRules,
    TimeWindow,
    evaluate,
)
from agentpolicy.policy import normalize_recipient


def test_policy_classes_are_frozen_and_hold_tuples_and_frozensets() -> None:
    window = TimeWindow(days=[1, 2], start_hour=9, end_hour=17)  # type: ignore[arg-type]
    assert window.days == frozenset({1, 2})
    rules = MerchantRules(whitelist=["0xa"])  # type: ignore[arg-type]
    assert rules.whitelist == ("0xa",)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rules.require_whitelist = True  # type: ignore[misc]


def test_direct_construction_validates_like_the_json_form() -> None:
    with pytest.raises(PolicyValidationError) as err:
        TimeWindow(days=frozenset({1}), start_hour=10, end_hour=9)
    assert err.value.problems[0].path == "$.endHour"
    with pytest.raises(PolicyValidationError):
        ApprovalThreshold(Amount(1), 2, ("a",))
    with pytest.raises(PolicyValidationError):
        TimeRules(timezone="Not/AZone")
    with pytest.raises(PolicyValidationError):
        AgentPolicy(limits="nope")  # type: ignore[arg-type]
    with pytest.raises(PolicyValidationError):
        NetworkRules(allowed_networks=("eip155",))
    with pytest.raises(PolicyValidationError):
        CategoryRules(allowed_categories="abc")  # type: ignore[arg-type]
    with pytest.raises(PolicyValidationError):
        ApprovalConfig(timeout=True)  # type: ignore[arg-type]


def test_blocked_periods_are_held_in_utc_and_must_be_aware() -> None:
    start = datetime(2026, 1, 20, 1, tzinfo=timezone(timedelta(hours=1)))
    period = BlockedPeriod(start, start)
    assert period.start.tzinfo is UTC
    assert period.contains(datetime(2026, 1, 20, tzinfo=UTC))
    with pytest.raises(PolicyValidationError):
        BlockedPeriod(datetime(2026, 1, 1), datetime(2026, 1, 2))


def test_timezone_is_resolved_once() -> None:
    rules = TimeRules(timezone="Europe/Berlin")
    assert rules.zone == ZoneInfo("Europe/Berlin")
    assert rules.zone is rules.zone


def test_policy_symbol_is_the_symbol_of_its_amounts() -> None:
    assert AgentPolicy().symbol is None
    policy = AgentPolicy(limits=SpendingLimits(daily=Amount(5, symbol="usdc")))
    assert policy.symbol == "usdc"
    with pytest.raises(PolicyValidationError) as err:
        AgentPolicy(
            limits=SpendingLimits(daily=Amount(5, symbol="USDC")),
            approval_config=ApprovalConfig(
                thresholds=(ApprovalThreshold(Amount(1, symbol="DAI"), 1, ("a",)),)
            ),
        )
    assert err.value.problems[0].path == "$.approvalConfig.thresholds[0].amount.symbol"


def test_recipients_normalise_only_hex_addresses() -> None:
    assert normalize_recipient("0xAbC") == "0xabc"
    assert normalize_recipient("0XAbC") == "0xabc"
    assert normalize_recipient("So1Base58") == "So1Base58"


@pytest.mark.parametrize(
    ("given", "compared"),
    [
        (
            "BC1QAR0SRRR7XFKVY5L643LYDNW9RE59GTZZWF5MDQ",
            "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
        ),
        (
            "COSMOS1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPAPJQ8D",
            "cosmos1qyqszqgpqyqszqgpqyqszqgpqyqszqgpapjq8d",
        ),
        ("EVIL.eth", "evil.eth"),
        ("Vendor.Example.COM", "vendor.example.com"),
        # case is significant: base58, and a mixed-case string that is no valid bech32
        (
            "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV",
            "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV",
        ),
        (
            "Bc1QAR0SRRR7XFKVY5L643LYDNW9RE59GTZZWF5MDQ",
            "Bc1QAR0SRRR7XFKVY5L643LYDNW9RE59GTZZWF5MDQ",
        ),
    ],
)
def test_case_insensitive_address_forms_compare_in_lower_case(given: str, compared: str) -> None:
    """A blacklist of bc1q... or evil.eth also stops BC1Q... and EVIL.eth (the same payee)."""
    assert normalize_recipient(given) == compared
    policy = AgentPolicy(merchant_rules=MerchantRules(blacklist=(compared,)))
    monday = datetime(2026, 1, 19, tzinfo=UTC)
    for written in (given, given.lower(), given.upper()):
        code = evaluate(policy, PaymentRequest("a", 1, written, "eip155:1"), {}, monday).code
        same = normalize_recipient(written) == compared  # another payee when case matters
        assert code == (Code.RECIPIENT_BLOCKED if same else Code.ALLOWED), written


@pytest.mark.parametrize(
    ("given", "compared"),
    [
        ("\uff45\uff56\uff49\uff4c.eth", "evil.eth"),  # fullwidth letters
        (
            "\uff25\uff36\uff29\uff2c\uff0e\uff25\uff34\uff28",
            "evil.eth",
        ),  # fullwidth capitals and full stop
        ("evil\u3002eth", "evil.eth"),  # ideographic full stop
        ("evil\uff61eth", "evil.eth"),  # halfwidth ideographic full stop
        ("evil.eth.", "evil.eth"),  # the root's dot
        ("EVIL.ETH.", "evil.eth"),
        ("Évil.eth", "évil.eth"),  # a name in another script: still one case
        ("BÜCHER.example", "bücher.example"),
        ("ﬀ.eth", "ff.eth"),  # a compatibility ligature
        ("ß.eth", "ß.eth"),  # not "ss.eth": another name in ENS and IDNA 2008
        ("ς.eth", "ς.eth"),
        ("a b.eth", "a b.eth"),  # no domain name: as written
        ("x.", "x."),
    ],
)
def test_domain_names_compare_as_resolvers_read_them(given: str, compared: str) -> None:
    """A blacklist of evil.eth also stops every spelling a resolver reads as evil.eth."""
    assert normalize_recipient(given) == compared
    monday = datetime(2026, 1, 19, tzinfo=UTC)
    blocked = AgentPolicy(merchant_rules=MerchantRules(blacklist=(compared,)))
    allowed = AgentPolicy(merchant_rules=MerchantRules(whitelist=(compared,)))
    request = PaymentRequest("a", 1, given, "eip155:1")
    assert evaluate(blocked, request, {}, monday).code is Code.RECIPIENT_BLOCKED
    assert evaluate(allowed, request, {}, monday).code is Code.ALLOWED


def test_names_that_resolve_apart_stay_apart() -> None:
    # a whitelist of ss.eth must not let a payment to ß.eth (someone else's name) through
    monday = datetime(2026, 1, 19, tzinfo=UTC)
    policy = AgentPolicy(merchant_rules=MerchantRules(whitelist=("ss.eth", "evil.eth")))
    for other in ("ß.eth", "\u0435vil.eth"):  # the second: Cyrillic ie, then "vil"
        request = PaymentRequest("a", 1, other, "eip155:1")
        assert evaluate(policy, request, {}, monday).code is Code.RECIPIENT_NOT_WHITELISTED


def test_spending_limits_by_period() -> None:
    limits = SpendingLimits(hourly=Amount(1), monthly=Amount(2))
    assert [p.value for p, _ in limits.windowed] == ["hourly", "monthly"]


@pytest.mark.parametrize(
    "name", ["America", "localtime", "posixrules", "Factory", "Europe", "right/UTC", "posix/UTC",
             "Europe/Berlin/", "europe/berlin"],
)  # fmt: skip
def test_only_real_iana_zone_keys_are_timezones(name: str) -> None:
    from agentpolicy import load_policy

    with pytest.raises(PolicyValidationError) as err:
        load_policy({"timeRules": {"timezone": name}})
    (problem,) = err.value.problems
    assert problem.path == "$.timeRules.timezone"
    assert problem.message.startswith("unknown IANA timezone")
    assert "Error" not in problem.message


@pytest.mark.parametrize("name", ["UTC", "Etc/GMT+5", "Australia/Lord_Howe", "US/Eastern"])
def test_real_zone_keys_are_accepted(name: str) -> None:
    assert TimeRules(timezone=name).timezone == name
