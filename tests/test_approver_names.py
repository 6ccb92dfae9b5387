"""Approver names that show the same person compare equal, in every place a vote is judged.

``é`` written as one code point or as ``e`` and a combining accent, or a
fullwidth letter, is the same name: a quorum counts such a person once, a
key registered under one spelling binds every spelling, and a requester
cannot vote under another spelling of their own name.
"""

from __future__ import annotations

import pytest

from agentpolicy import (
    ConflictError,
    ErrorCode,
    ForbiddenError,
    PolicyEngine,
    PolicyValidationError,
)
from agentpolicy._checks import person
from agentpolicy.signing import SigningKey
from agentpolicy.testing import ManualClock, payment

NFC, NFD = "jos\u00e9@acme.com", "jose\u0301@acme.com"


def threshold(*approvers: str, required: int = 1) -> dict[str, object]:
    return {"approvalConfig": {"thresholds": [{"amount": {"value": "100"},
                                               "requiredApprovers": required,
                                               "approvers": list(approvers)}]}}  # fmt: skip


def test_spellings_of_one_name_fold_alike() -> None:
    assert person(NFC) == person(NFD) == person("JOSE\u0301@ACME.COM")
    assert person("\uff41lice") == person("ALICE") == "alice"
    assert person("bob") != person("b\u043eb")  # a Cyrillic o is another letter (not folded)


@pytest.mark.parametrize("hidden", ["\ufe00", "\u034f", "\u3164", "\u2800", "\ufe0f"])
def test_a_name_with_a_character_that_shows_nothing_is_the_same_person(hidden: str) -> None:
    # "cfo" and "cfo" + U+FE00 show alike and were two approvers: one person filled 2 of 3
    assert person("cfo" + hidden) == person("c" + hidden + "FO") == "cfo"
    engine = PolicyEngine(clock=ManualClock())
    with pytest.raises(PolicyValidationError) as refused:
        engine.set_policy("bot", threshold("cfo", "cfo" + hidden, "ctl", required=2))
    assert refused.value.problems[0].path == "$.policy.approvalConfig.thresholds[0].approvers"
    engine.set_policy("bot", threshold("cfo", "ctl", required=2))
    approval_id = engine.authorize(payment(500, agent_id="bot")).approval_id
    assert approval_id is not None
    engine.decide(approval_id, "cfo", "approve")
    with pytest.raises(ConflictError) as again:
        engine.decide(approval_id, "cfo" + hidden, "approve")
    assert again.value.code == ErrorCode.DUPLICATE_DECISION
    assert engine.get_approval(approval_id).status.value == "pending"


@pytest.mark.parametrize("pair", [(NFC, NFD), ("alice", "\uff41lice")])
def test_a_policy_cannot_list_one_person_twice(pair: tuple[str, str]) -> None:
    engine = PolicyEngine(clock=ManualClock())
    with pytest.raises(PolicyValidationError) as refused:
        engine.set_policy("bot", threshold(*pair, required=2))
    assert refused.value.problems[0].path == "$.policy.approvalConfig.thresholds[0].approvers"


def test_a_key_registered_under_one_spelling_binds_the_other() -> None:
    engine = PolicyEngine(clock=ManualClock(), link_secret="k" * 40)
    engine.register_approver(NFC, SigningKey.generate().public_key)
    engine.set_policy("bot", threshold(NFD))
    approval_id = engine.authorize(payment(500, agent_id="bot")).approval_id
    assert approval_id is not None
    assert engine.approval_links(approval_id) == []  # a registered approver gets no links
    with pytest.raises(ForbiddenError) as unsigned:
        engine.decide(approval_id, NFD, "approve")
    assert unsigned.value.code == ErrorCode.APPROVER_NOT_AUTHORIZED
    assert engine.get_approval(approval_id).votes == ()


def test_a_requester_cannot_vote_under_another_spelling_of_their_name() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", threshold(NFD, "cfo"))
    approval_id = engine.authorize(payment(500, agent_id="bot"), requested_by=NFC).approval_id
    assert approval_id is not None
    with pytest.raises(ForbiddenError) as refused:
        engine.decide(approval_id, NFD, "approve")
    assert refused.value.code == ErrorCode.APPROVER_NOT_AUTHORIZED
    assert engine.decide(approval_id, "cfo", "approve").status.value == "approved"


def test_a_vote_under_either_spelling_counts_once() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", threshold(NFC, "cfo", required=2))
    approval_id = engine.authorize(payment(500, agent_id="bot")).approval_id
    assert approval_id is not None
    engine.decide(approval_id, NFD, "approve")
    with pytest.raises(ConflictError) as again:
        engine.decide(approval_id, NFC, "approve")
    assert again.value.code == ErrorCode.DUPLICATE_DECISION
    assert engine.decide(approval_id, "cfo", "approve").status.value == "approved"


@pytest.mark.parametrize("blank", ["\u3164", "\u2800", "\u115f\u1160", "\u3164\ufe00"])
def test_a_name_that_shows_nothing_is_refused_where_approvers_are_named(blank: str) -> None:
    # it folded to "": every such name was one and the same person, whatever it looked like
    assert person(blank) == ""
    engine = PolicyEngine(clock=ManualClock())
    with pytest.raises(PolicyValidationError) as listed:
        engine.set_policy("bot", threshold("cfo", blank, required=1))
    assert listed.value.problems[0].path == ("$.policy.approvalConfig.thresholds[0].approvers[1]")
    with pytest.raises(PolicyValidationError) as registered:
        engine.register_approver(blank, SigningKey.generate().public_key)
    assert registered.value.path == "$.name"
    engine.set_policy("bot", threshold("cfo"))
    approval_id = engine.authorize(payment(500, agent_id="bot")).approval_id
    assert approval_id is not None
    with pytest.raises(PolicyValidationError) as voted:
        engine.decide(approval_id, blank, "approve")
    assert voted.value.path == "$.approver"
    assert engine.get_approval(approval_id).votes == ()
