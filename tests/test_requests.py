from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import (
    AgentPolicy,
    Amount,
    CategoryRules,
    Code,
    MerchantRules,
    PaymentRequest,
    PolicyValidationError,
    evaluate,
    load_policy,
)
from agentpolicy._checks import check_payment_network, plain_network

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def make(**kw: Any) -> PaymentRequest:
    base: dict[str, Any] = {
        "agent_id": "agent-1",
        "amount": "500000000",
        "recipient": "0xvendor",
        "network": "eip155:8453",
    }
    return PaymentRequest(**{**base, **kw})


def test_defaults_are_usdt_and_digit_strings_become_ints() -> None:
    r = make()
    assert (r.amount, r.decimals, r.symbol, r.category, r.memo) == (
        500_000_000,
        6,
        "USDT",
        None,
        None,
    )
    assert r.asset_amount == Amount(500_000_000, 6, "USDT")


@pytest.mark.parametrize(
    "invisible",
    ["\u200b", "\u200d", "\u00ad", "\ufeff", "\u202e", "\u2066", "\u00a0", "\u2028", "\ue000"],
)
def test_identifiers_refuse_invisible_characters_that_would_pass_a_blacklist(
    invisible: str,
) -> None:
    """Zero-width, soft hyphen, BOM, bidi controls, odd spaces: "0x\u200bbad" is not "0xbad"."""
    for field, path in (("recipient", "$.recipient"), ("agent_id", "$.agentId")):
        with pytest.raises(PolicyValidationError) as err:
            make(**{field: "0x" + invisible + "bad"})
        assert [p.path for p in err.value.problems] == [path]
        assert f"U+{ord(invisible):04X}" in err.value.problems[0].message
    with pytest.raises(PolicyValidationError):  # nor can a policy list one
        AgentPolicy(merchant_rules=MerchantRules(whitelist=("0x" + invisible + "ok",)))


@pytest.mark.parametrize(
    "blank",
    ["\ufe0f", "\u034f", "\u3164", "\u115f", "\u1160", "\uffa0", "\u180b", "\U000e0100",
     "\u17b4", "\u2800"],
)  # fmt: skip
def test_payees_and_categories_refuse_printable_characters_that_show_nothing(blank: str) -> None:
    """Appended to a blacklisted address or a blocked category they made a lookalike that matched
    no list (and showed an approver the blocked address): refused, as the request's input."""
    blocked = "0x" + "ab" * 20
    policy = AgentPolicy(
        merchant_rules=MerchantRules(blacklist=(blocked,)),
        category_rules=CategoryRules(blocked_categories=("gambling",)),
    )
    assert evaluate(policy, make(recipient=blocked), {}, NOW).code is Code.RECIPIENT_BLOCKED
    for field, value, path in (("recipient", blocked + blank, "$.recipient"),
                               ("category", "gambling" + blank, "$.category")):  # fmt: skip
        with pytest.raises(PolicyValidationError) as err:
            make(**{field: value})
        assert [p.path for p in err.value.problems] == [path]
        assert f"U+{ord(blank):04X}" in err.value.problems[0].message
    # a name with a dot is compared folded, without them (emoji names carry U+FE0F)
    named = make(recipient="evil" + blank + ".eth")
    blocks_evil = AgentPolicy(merchant_rules=MerchantRules(blacklist=("evil.eth",)))
    assert evaluate(blocks_evil, named, {}, NOW).code is Code.RECIPIENT_BLOCKED


def test_identifiers_keep_inner_spaces_and_printable_unicode() -> None:
    assert make(category="office supplies", recipient="café-Zürich-東京").category == (
        "office supplies"
    )


def test_an_empty_category_is_no_category() -> None:
    assert make(category="").category is None


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("agent_id", "", "$.agentId"),
        ("agent_id", 5, "$.agentId"),
        ("agent_id", "a\nb", "$.agentId"),
        ("amount", 0, "$.amount"),
        ("amount", "0", "$.amount"),
        ("amount", -5, "$.amount"),
        ("amount", 1.0, "$.amount"),
        ("amount", "1.5", "$.amount"),
        ("amount", "1e6", "$.amount"),
        ("amount", True, "$.amount"),
        ("amount", " 5", "$.amount"),
        ("amount", "0x10", "$.amount"),
        ("recipient", "", "$.recipient"),
        ("recipient", "0xbad ", "$.recipient"),
        ("network", "base", "$.network"),
        ("network", "b\u0131p122:000000000019d6689c085ae165831e93", "$.network"),
        ("network", "eip155:\u212a", "$.network"),
        ("network", "eip155:8453 ", "$.network"),
        ("category", " x", "$.category"),
        ("decimals", -1, "$.decimals"),
        ("decimals", "6", "$.decimals"),
        ("decimals", 256, "$.decimals"),
        ("symbol", "", "$.symbol"),
        ("memo", 5, "$.memo"),
        ("memo", "x" * 5000, "$.memo"),
        ("idempotency_key", "", "$.idempotencyKey"),
    ],
)
def test_invalid_fields_are_refused_with_their_path(field: str, value: Any, path: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        make(**{field: value})
    assert [p.path for p in err.value.problems] == [path]


def test_every_problem_is_reported_together() -> None:
    with pytest.raises(PolicyValidationError) as err:
        make(agent_id="", amount="-1", network="x")
    assert {p.path for p in err.value.problems} == {"$.agentId", "$.amount", "$.network"}


def test_fingerprint_ignores_only_the_memo() -> None:
    assert make(memo="a").fingerprint() == make(memo="b").fingerprint()
    assert make(amount=1).fingerprint() != make(amount=2).fingerprint()
    assert make(category="x").fingerprint() != make().fingerprint()


_NETWORKS = st.one_of(
    st.sampled_from(["eip155:8453", "eip155:1", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
                     "eip155:0x1", "eip155:", "eip155:8453 ", " eip155:1", "bad", "eip155:8\u200b453",
                     "a" * 70 + ":1", "cosmos:hub-4"]),
    st.text(max_size=80),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(networks=st.lists(_NETWORKS, min_size=1, max_size=40))
def test_the_fast_network_test_agrees_with_the_full_check_on_every_call(
    networks: list[str],
) -> None:
    # plain_network keeps the networks it found plain (and starts over when full): asked
    # again, or after many others, it still says exactly what the full check says
    for network in networks * 2:
        assert plain_network(network) == (not check_payment_network(network, "$"))
    for i in range(300):  # past what it keeps
        assert plain_network(f"eip155:{i}")
    for network in networks:
        assert plain_network(network) == (not check_payment_network(network, "$"))


@pytest.mark.parametrize("text", ["\ud800", "paid \udfff", "\ud83d\ude00"])
def test_free_text_refuses_a_lone_surrogate_that_no_reply_could_carry(text: str) -> None:
    # a memo (or a blocked period's reason, a vote's comment) holding one was stored, then
    # every JSON reply and page that showed it failed to encode: the stdio servers, an
    # admin's included, died on listing the approval
    with pytest.raises(PolicyValidationError) as caught:
        PaymentRequest("agent-1", 1, "0xv", "eip155:8453", memo=text)
    assert [p.path for p in caught.value.problems] == ["$.memo"]
    assert "lone surrogate" in caught.value.problems[0].message
    with pytest.raises(PolicyValidationError) as caught:
        load_policy({"timeRules": {"blockedPeriods": [
            {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z", "reason": text}]}})  # fmt: skip
    assert [p.path for p in caught.value.problems] == ["$.timeRules.blockedPeriods[0].reason"]
    assert PaymentRequest("agent-1", 1, "0xv", "eip155:8453", memo="paid 😀 ✓").memo == "paid 😀 ✓"
