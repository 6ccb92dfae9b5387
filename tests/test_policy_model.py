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
    load_policy,
)
from agentpolicy.policy import normalize_recipient, whitelist_form
from agentpolicy.testing import payment

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


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


def test_a_name_that_begins_like_an_address_is_folded_as_a_name() -> None:
    """``0xvendor.eth.`` is the name ``0xvendor.eth``: no final dot or case gets past a list.

    The hex-address branch once came first, so such a name kept its final
    dot: past the blacklist, a new group of a per-recipient limit each time.
    """
    for spelled in ("0xvendor.eth.", "0XVENDOR.ETH.", "0xvendor.eth", "0x\uff56endor.eth"):
        assert normalize_recipient(spelled) == "0xvendor.eth", spelled
    assert normalize_recipient("0xfoo.xn--mgbh0fb") == "0xfoo.\u0645\u062b\u0627\u0644"
    blocked = load_policy({"merchantRules": {"blacklist": ["0xevil.eth"]}})
    for spelled in ("0xevil.eth.", "0XEVIL.eth."):
        assert evaluate(blocked, payment(1, recipient=spelled), {}, NOW).code is (
            Code.RECIPIENT_BLOCKED)  # fmt: skip


EVM = "0x" + "66" * 19 + "ab"


def test_an_evm_address_without_its_prefix_is_the_same_payee() -> None:
    # x402's signer (EIP-712) reads 40 hex digits with or without 0x as the same 20 bytes, so a
    # payee spelled without the prefix must meet the blacklist, whitelist and scopes alike
    for spelled in (EVM[2:], EVM[2:].upper(), "0X" + EVM[2:].upper()):
        assert normalize_recipient(spelled) == EVM
        assert whitelist_form(spelled) == EVM
    assert normalize_recipient(EVM[3:]) == EVM[3:]  # 39 digits: not an address we know
    assert normalize_recipient("G" + EVM[3:]) == "G" + EVM[3:]  # not hex: left as it is
    request = payment(1, recipient=EVM[2:])
    blocked = evaluate(load_policy({"merchantRules": {"blacklist": [EVM]}}), request, {}, NOW)
    assert blocked.code is Code.RECIPIENT_BLOCKED
    listed = load_policy({"merchantRules": {"whitelist": [EVM.upper().replace("0X", "0x")]}})
    assert evaluate(listed, request, {}, NOW).allowed


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
    ("given", "compared", "admitted"),
    [
        ("EVIL.ETH.", "evil.eth", True),  # ASCII case and the root's dot
        ("_EVIL.eth", "_evil.eth", True),  # names ENS takes that DNS would not
        ("\uff45\uff56\uff49\uff4c.eth", "evil.eth", False),  # fullwidth letters
        ("\uff25\uff36\uff29\uff2c\uff0e\uff25\uff34\uff28", "evil.eth", False),  # and stop
        ("evil\u3002eth", "evil.eth", False),  # ideographic full stop
        ("evil\uff61eth", "evil.eth", False),  # halfwidth ideographic full stop
        ("evil\ufe0f.eth", "evil.eth", False),  # an invisible variation selector
        ("\u2764\ufe0f.ETH", "\u2764.eth", False),  # emoji, with and without it
        ("\U0001f4a9.ETH", "\U0001f4a9.eth", False),
        ("\u0939\u093f\u0928\u094d\u0926\u0940.ETH", "\u0939\u093f\u0928\u094d\u0926\u0940.eth",
         False),  # combining marks
        ("\u0958.eth", "\u0915\u093c.eth", False),  # a composition NFKC takes apart
        ("\u039b\u039f\u0393\u039f\u03a31.eth", "\u03bb\u03bf\u03b3\u03bf\u03c31.eth", False),
        ("\u03bb\u03bf\u03b3\u03bf\u03c2.eth", "\u03bb\u03bf\u03b3\u03bf\u03c3.eth", False),
        ("\u03bb\u03bf\u03b3\u03bf\u03f2.eth", "\u03bb\u03bf\u03b3\u03bf\u03c3.eth", False),
        ("\u1c80\u043e\u0440.eth", "\u0432\u043e\u0440.eth", False),  # a Cyrillic variant
        ("B\u00dcCHER.example", "b\u00fccher.example", False),
        ("xn--bcher-kva.example", "b\u00fccher.example", False),  # its punycode
        ("XN--ZZ.eth", "xn--zz.eth", False),  # no punycode: compared as written, in one case
        ("\u00df.eth", "ss.eth", False),  # joined, though ENS keeps them apart
        ("a b.eth", "a b.eth", True),  # ASCII: its case folded only
        ("So1Base58", "So1Base58", True),
    ],
)  # fmt: skip
def test_domain_names_compare_as_resolvers_read_them(
    given: str, compared: str, admitted: bool
) -> None:
    """A blacklist of evil.eth stops every spelling a resolver reads as evil.eth.

    A whitelist admits a spelling only when it cannot resolve elsewhere: in
    ASCII, where only case is folded.
    """
    assert normalize_recipient(given) == compared
    monday = datetime(2026, 1, 19, tzinfo=UTC)
    blocked = AgentPolicy(merchant_rules=MerchantRules(blacklist=(compared,)))
    allowed = AgentPolicy(merchant_rules=MerchantRules(whitelist=(compared,)))
    request = PaymentRequest("a", 1, given, "eip155:1")
    assert evaluate(blocked, request, {}, monday).code is Code.RECIPIENT_BLOCKED
    admitted_code = Code.ALLOWED if admitted else Code.RECIPIENT_NOT_WHITELISTED
    assert evaluate(allowed, request, {}, monday).code is admitted_code
    exactly = AgentPolicy(merchant_rules=MerchantRules(whitelist=(given,)))
    assert evaluate(exactly, request, {}, monday).code is Code.ALLOWED  # as listed: admitted


def test_a_whitelist_admits_no_spelling_that_may_resolve_elsewhere() -> None:
    # ENS maps a capital sigma to a small one, never to the final form: a whitelist of
    # "logos1.eth" with a final sigma must not admit the capitals (another name there)
    monday = datetime(2026, 1, 19, tzinfo=UTC)
    final = "\u03bb\u03bf\u03b3\u03bf\u03c21.eth"
    policy = AgentPolicy(merchant_rules=MerchantRules(whitelist=("ss.eth", final, "evil.eth")))
    others = (
        "\u00df.eth",
        "\u039b\u039f\u0393\u039f\u03a31.eth",
        "\u0435vil.eth",
    )  # last: Cyrillic
    for other in others:
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


@pytest.mark.parametrize(
    "beside",
    [
        {},  # scopes alone: no block of limits declares a token
        {"limits": {"daily": {"value": "9000000"}}},
        {"limits": {"daily": {"value": "9", "decimals": 0, "symbol": "USDT"}}},
        {"limits": {"counts": [{"window": "daily", "max": 5}]}},  # counts alone
    ],
)
def test_a_scope_name_is_unique_whatever_else_the_policy_limits(beside: dict[str, object]) -> None:
    # counters follow a scope's name across versions: two scopes of one name would share them
    counts = {"counts": [{"window": "daily", "max": 3}]}
    scopes = [
        {"name": "vendors", "match": {"categories": ["data"]}, "limits": counts},
        {"name": "Vendors", "match": {"categories": ["api"]}, "limits": counts},
    ]
    with pytest.raises(PolicyValidationError) as caught:
        load_policy({**beside, "scopedLimits": scopes})
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("$.scopedLimits[1].name", "repeats scopedLimits[0].name")
    ]
    load_policy({**beside, "scopedLimits": [scopes[0], {**scopes[1], "name": "apis"}]})
