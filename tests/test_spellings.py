"""Two spellings of one network or category are one value to every rule, scope and key.

An adversarial probe found that ``groupBy: network`` counted ``eip155:08453``
apart from ``eip155:8453`` and ``groupBy: category`` counted fullwidth
``data`` apart from ASCII ``data``: a governed agent got a fresh per-group
budget (or slipped out of a scope, or past a blocked network or category) by
re-spelling what it pays. A request now keeps an ``eip155`` chain id without
leading zeros and its category NFKC-normalised; policies compare their lists
in the same form; an ``eip155`` chain id not in decimal digits is refused.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy import PolicyValidationError, evaluate, load_policy
from agentpolicy.ledger.docs import request_of
from agentpolicy.testing import engine_with_policy, payment

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def _fullwidth(text: str) -> str:
    """ASCII letters, digits and punctuation as their fullwidth compatibility forms."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _scoped(group_by: str, **match: list[str]) -> dict[str, Any]:
    return {
        "scopedLimits": [
            {
                "name": "one a day",
                "match": match,
                "groupBy": group_by,
                "limits": {"counts": [{"window": "daily", "max": 1}]},
            }
        ]
    }


def test_group_by_network_counts_an_eip155_chain_id_with_leading_zeros_in_its_group() -> None:
    engine, _ = engine_with_policy(_scoped("network"))
    assert engine.authorize(payment(network="eip155:8453")).code == "ALLOWED"
    # each was ALLOWED: a fresh group of its own
    for spelling in ("eip155:08453", "eip155:008453", "EIP155:08453"):
        assert engine.authorize(payment(network=spelling)).code == "SCOPED_LIMIT"
    assert engine.authorize(payment(network="eip155:1")).code == "ALLOWED"  # another chain


def test_group_by_category_counts_a_fullwidth_category_in_its_group() -> None:
    engine, _ = engine_with_policy(_scoped("category"))
    assert engine.authorize(payment(category="data")).code == "ALLOWED"
    for spelling in (
        _fullwidth("data"),
        _fullwidth("DATA"),
        "DATA",
    ):  # the fullwidth ones were ALLOWED
        assert engine.authorize(payment(category=spelling)).code == "SCOPED_LIMIT"


def test_a_scope_covers_every_spelling_of_the_networks_and_categories_it_matches() -> None:
    engine, _ = engine_with_policy(_scoped("recipient", networks=["eip155:8453"]))
    assert engine.authorize(payment(recipient="0xa")).code == "ALLOWED"
    assert engine.authorize(payment(recipient="0xa", network="eip155:08453")).code == (
        "SCOPED_LIMIT"  # was ALLOWED: outside the scope altogether
    )
    engine, _ = engine_with_policy(_scoped("recipient", categories=["data"]))
    assert engine.authorize(payment(recipient="0xa", category="data")).code == "ALLOWED"
    assert (
        engine.authorize(payment(recipient="0xa", category=_fullwidth("data"))).code
        == "SCOPED_LIMIT"
    )
    # and a scope whose own list is written another way matches the plain spelling
    engine, _ = engine_with_policy(
        _scoped("recipient", networks=["eip155:08453"], categories=[_fullwidth("data")])
    )
    assert engine.authorize(payment(recipient="0xa", category="data")).code == "ALLOWED"
    assert engine.authorize(payment(recipient="0xa", category="data")).code == "SCOPED_LIMIT"


def test_network_rules_see_through_leading_zeros_on_either_side() -> None:
    policy = {"networkRules": {"blockedNetworks": ["eip155:56"]}}
    engine, _ = engine_with_policy(policy)
    assert engine.authorize(payment(network="eip155:056")).code == "NETWORK_BLOCKED"  # ALLOWED
    engine, _ = engine_with_policy({"networkRules": {"blockedNetworks": ["eip155:056"]}})
    assert engine.authorize(payment(network="eip155:56")).code == "NETWORK_BLOCKED"  # ALLOWED
    engine, _ = engine_with_policy({"networkRules": {"allowedNetworks": ["eip155:0001"]}})
    assert engine.authorize(payment(network="eip155:1")).code == "ALLOWED"  # NOT_ALLOWED
    # the policy keeps its own spelling: dump_policy(load_policy(x)) is unchanged
    stored = engine.get_policy("agent-1")
    assert stored is not None
    assert stored.policy.network_rules is not None
    assert stored.policy.network_rules.allowed_networks == ("eip155:0001",)


def test_category_rules_see_through_compatibility_forms_on_either_side() -> None:
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": ["gambling"]}})
    assert engine.authorize(payment(category=_fullwidth("gambling"))).code == "CATEGORY_BLOCKED"
    engine, _ = engine_with_policy(
        {"categoryRules": {"blockedCategories": [_fullwidth("gambling")]}}
    )
    assert engine.authorize(payment(category="Gambling")).code == "CATEGORY_BLOCKED"
    engine, _ = engine_with_policy(
        {"categoryRules": {"allowedCategories": ["\ufb01les"]}}
    )  # ligature
    assert engine.authorize(payment(category="files")).code == "ALLOWED"


@pytest.mark.parametrize(
    "network",
    ["eip155:0x2105", "eip155:8453e0", "eip155:_8453", "eip155:-8453", "EIP155:8453abc"],
)
def test_an_eip155_chain_id_not_in_decimal_digits_is_invalid_input(network: str) -> None:
    engine, _ = engine_with_policy(_scoped("network"))
    with pytest.raises(PolicyValidationError) as err:
        engine.authorize(payment(network=network))
    assert err.value.code == "INVALID_INPUT"
    assert [p.path for p in err.value.problems] == ["$.network"]
    assert "decimal" in err.value.problems[0].message
    assert engine.authorize(payment(network="eip155:8453")).code == "ALLOWED"  # nothing counted


def test_other_namespaces_are_kept_as_written() -> None:
    solana = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
    assert payment(network=solana).network == solana
    assert payment(network="cosmos:cosmoshub-4").network == "cosmos:cosmoshub-4"
    assert payment(network="bip122:000000000019d6689c085ae165831e93").network == (
        "bip122:000000000019d6689c085ae165831e93"  # leading zeros of a hash are the hash
    )
    assert payment(network="eip155:0").network == "eip155:0"
    assert payment(network="eip155:000").network == "eip155:0"


def test_one_idempotency_key_is_one_payment_whatever_the_spelling() -> None:
    engine, _ = engine_with_policy(_scoped("network"))
    first = engine.authorize(
        payment(network="eip155:08453", category=_fullwidth("data"), idempotency_key="k1")
    )
    again = engine.authorize(payment(network="eip155:8453", category="data", idempotency_key="k1"))
    assert first.code == again.code == "ALLOWED"  # was IDEMPOTENCY_CONFLICT
    assert again.reservation_id == first.reservation_id


def test_a_stored_request_in_an_old_spelling_reads_back_as_the_same_value() -> None:
    """Records written before the fix still read back (and are judged as the plain spelling)."""
    stored = {
        "agentId": "agent-1",
        "amount": "1000000",
        "recipient": "0xvendor",
        "network": "eip155:08453",
        "category": _fullwidth("data"),
        "decimals": 6,
        "symbol": "USDT",
        "idempotencyKey": "k1",
    }
    old = request_of(stored)
    plain = payment(network="eip155:8453", category="data", idempotency_key="k1")
    assert old == plain
    assert old.fingerprint() == plain.fingerprint()
    policy = load_policy({"networkRules": {"blockedNetworks": ["eip155:8453"]}})
    assert evaluate(policy, old, {}, NOW).code == "NETWORK_BLOCKED"


_WORD = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"),
    min_size=1,
    max_size=12,
)


@st.composite
def _category_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """Two spellings of one category: case changed, compatibility forms, or both."""
    word = draw(_WORD)

    def spell() -> str:
        cased = draw(st.sampled_from([word, word.upper(), word.lower(), word.swapcase()]))
        return _fullwidth(cased) if draw(st.booleans()) else cased

    return spell(), spell()


@st.composite
def _network_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """Two spellings of one eip155 chain: leading zeros, namespace case."""
    chain = draw(st.integers(0, 10**20))

    def spell() -> str:
        namespace = draw(st.sampled_from(["eip155", "EIP155", "Eip155"]))
        return f"{namespace}:{'0' * draw(st.integers(0, 4))}{chain}"

    return spell(), spell()


@given(
    categories=_category_spellings(),
    networks=_network_spellings(),
    listed=st.sampled_from(["first", "second", "none"]),
)
def test_two_spellings_of_one_value_land_in_one_group_and_one_rule_outcome(
    categories: tuple[str, str], networks: tuple[str, str], listed: str
) -> None:
    a = payment(network=networks[0], category=categories[0])
    b = payment(network=networks[1], category=categories[1])
    # the policy lists the value in either spelling (or not at all)
    net = {"first": networks[0], "second": networks[1], "none": "eip155:99999999999999999999999"}
    cat = {"first": categories[0], "second": categories[1], "none": "other"}
    policy = load_policy(
        {
            "networkRules": {"blockedNetworks": [net[listed]]},
            "categoryRules": {"blockedCategories": [cat[listed]]},
            "scopedLimits": [
                {
                    "name": f"by {by} {i}",
                    "groupBy": by,
                    "match": match,
                    "limits": {"counts": [{"window": "daily", "max": 1}]},
                }
                for by in ("network", "category")
                for i, match in enumerate(
                    ({}, {"networks": [net[listed]], "categories": [cat[listed]]})
                )
            ],
        }
    )
    for scope in policy.scoped_limits:
        assert scope.covers(a) == scope.covers(b)
        assert scope.group(a.category, a.recipient, a.network) == scope.group(
            b.category, b.recipient, b.network
        )
    assert evaluate(policy, a, {}, NOW).code == evaluate(policy, b, {}, NOW).code
    # what is kept (and fingerprinted) differs at most in letter case, which rules ignore
    assert a.network.casefold() == b.network.casefold()
    assert a.category is not None
    assert b.category is not None
    assert a.category.casefold() == b.category.casefold()
    assert unicodedata.is_normalized("NFKC", a.category)
