"""Properties of the approval state machine (``approvals.cast_vote``) with groups and proofs.

Whatever the groups, requesters, proofs and order of votes: a vote counts only
from a listed approver who did not ask for the payment and whose proof is strong
enough; one deny denies; the approval is approved exactly when every group has
reached its count; a refused vote changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy import ConflictError, ForbiddenError
from agentpolicy.approvals import VoteProof, cast_vote
from agentpolicy.records import Approval, ApprovalGroup, ApprovalStatus
from agentpolicy.testing import payment

PEOPLE = ["ann", "Ben", "cat", "dan", "eve"]
NOW = datetime(2026, 1, 19, 10, tzinfo=UTC)
PROOFS = {
    "unsigned": VoteProof(),
    "link": VoteProof(via="link"),
    "signature": VoteProof(via="signature", key_version=1, registered=True),
}


@st.composite
def approvals(draw: st.DrawFn) -> Approval:
    count = draw(st.integers(1, 3))
    groups = []
    for i in range(count):
        who = draw(st.lists(st.sampled_from(PEOPLE), min_size=1, max_size=3, unique=True))
        groups.append(ApprovalGroup(f"g{i}", draw(st.integers(1, len(who))), tuple(who), "bot"))
    everyone = tuple(dict.fromkeys(a for g in groups for a in g.approvers))
    requested_by = draw(st.one_of(st.none(), st.sampled_from(PEOPLE)))
    return Approval(
        id="apr_1", agent_id=draw(st.sampled_from(["bot", "ann"])),
        status=ApprovalStatus.PENDING, request=payment(5), votes=(),
        required_approvers=sum(g.required for g in groups), approvers=everyone,
        created_at=NOW, expires_at=NOW + timedelta(hours=1), hold_id="res_1",
        policy_version=1, groups=tuple(groups), requested_by=requested_by,
        require_signed_votes=draw(st.booleans()),
    )  # fmt: skip


votes = st.lists(
    st.tuples(
        st.sampled_from([*PEOPLE, "ANN", "zed"]),
        st.sampled_from(["approve", "approve", "deny"]),
        st.sampled_from(list(PROOFS)),
        st.booleans(),  # registered
    ),
    max_size=8,
)


@given(approvals(), votes)
def test_votes_follow_the_rules_whatever_their_order(approval: Approval, cast: list) -> None:
    folded = {a.casefold() for a in approval.approvers}
    asked = {r.casefold() for r in approval.requesters}
    yes: set[str] = set()
    voted: set[str] = set()
    status = "pending"
    for who, decision, kind, registered in cast:
        proof = PROOFS[kind]
        if kind != "signature":
            proof = VoteProof(via=proof.via, registered=registered)
        key = who.casefold()
        if status != "pending":
            expected = "APPROVAL_NOT_PENDING"
        elif key not in folded or key in asked:
            expected = "APPROVER_NOT_AUTHORIZED"
        elif key in voted:
            expected = "DUPLICATE_DECISION"
        elif kind != "signature" and (registered or approval.require_signed_votes):
            expected = "APPROVER_NOT_AUTHORIZED"
        else:
            expected = "ok"
        if expected != "ok":
            with pytest.raises((ForbiddenError, ConflictError)) as refused:
                cast_vote(approval, who, decision, NOW, None, proof)
            assert refused.value.code == expected
            continue
        after = cast_vote(approval, who, decision, NOW, None, proof)
        voted.add(key)
        if decision == "deny":
            status = "denied"
        else:
            yes.add(key)
            reached = all(
                len({a.casefold() for a in g.approvers} & yes) >= g.required
                for g in approval.groups
            )
            status = "approved" if reached else "pending"
        assert after.status.value == status
        assert after.votes[-1].via == proof.via
        approval = after
    assert not {v.approver.casefold() for v in approval.votes} & asked
