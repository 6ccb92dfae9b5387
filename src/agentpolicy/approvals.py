"""The approval state machine, as pure functions of values.

An approval starts ``pending``. One ``deny`` denies it at once; when the
approvals reach ``required_approvers`` it is ``approved`` (with ``groups``,
when every group reaches its own count); at ``expires_at`` it is
``expired``. Approvers compare ignoring case and each decides once.

Who may vote: an approver of the approval who did not ask for the payment
(neither the agent nor ``requested_by``), with a vote whose proof
(:class:`VoteProof`) is strong enough: a registered approver, and any
approver of an approval that requires signed votes, must sign.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from agentpolicy._checks import person
from agentpolicy.errors import ConflictError, ErrorCode, ForbiddenError, PolicyValidationError
from agentpolicy.records import Approval, ApprovalStatus, Vote

__all__ = ["DECISIONS", "UNSIGNED", "VIA", "VoteProof", "cast_vote"]

DECISIONS = ("approve", "deny")
"""The two decisions an approver can submit."""

VIA = ("signature", "link")
"""What can prove a vote's approver: their key's signature, or a one-time link."""


@attrs.frozen
class VoteProof:
    """What proves who cast a vote, as checked before the vote step.

    ``via`` is ``"signature"`` (verified with the approver's current key,
    ``key_version``), ``"link"`` (a one-time link the engine signed), or
    ``None`` (an unsigned call). ``registered`` is whether the approver had
    a registered key when the vote was checked: then only a signature will do.
    A signed vote keeps its ``signature`` and ``signed_at``, so anyone can
    check it again later against the key version that verified it.
    """

    via: str | None = None
    key_version: int | None = None
    registered: bool = False
    signature: str | None = None
    signed_at: datetime | None = None


UNSIGNED = VoteProof()
"""The proof of an unsigned call by an approver without a registered key: none."""


def cast_vote(
    approval: Approval,
    approver: str,
    decision: str,
    now: datetime,
    comment: str | None = None,
    proof: VoteProof = UNSIGNED,
) -> Approval:
    """Return ``approval`` with this approver's decision applied.

    Raises :class:`~agentpolicy.errors.ConflictError` (``APPROVAL_NOT_PENDING``
    when the approval is decided or its time is up, ``DUPLICATE_DECISION`` for a
    second decision by the same approver),
    :class:`~agentpolicy.errors.ForbiddenError` (``APPROVER_NOT_AUTHORIZED``:
    not an approver of it, the payment's own requester, or a vote without the
    signature it needs) and :class:`~agentpolicy.PolicyValidationError` for a
    decision other than ``approve`` or ``deny``. Nothing changes when it raises.
    """
    if decision not in DECISIONS:
        raise PolicyValidationError.single("$.decision", "must be 'approve' or 'deny'")
    if approval.status is not ApprovalStatus.PENDING or now >= approval.expires_at:
        status = "expired" if approval.status is ApprovalStatus.PENDING else approval.status
        raise ConflictError(
            f"approval {approval.id} is {status}, not pending",
            code=ErrorCode.APPROVAL_NOT_PENDING,
        )
    who = person(approver)
    if who not in {person(a) for a in approval.every_approver}:
        raise ForbiddenError(
            f"{approver} is not an approver of {approval.id}",
            code=ErrorCode.APPROVER_NOT_AUTHORIZED,
        )
    if who in {person(r) for r in approval.requesters}:
        raise ForbiddenError(
            f"{approver} asked for the payment of {approval.id} and cannot vote on it",
            code=ErrorCode.APPROVER_NOT_AUTHORIZED,
        )
    earlier = next((v for v in approval.votes if person(v.approver) == who), None)
    if earlier is not None:
        used = " (this link was used)" if proof.via == "link" and earlier.via == "link" else ""
        raise ConflictError(
            f"{approver} has already decided on {approval.id}{used}",
            code=ErrorCode.DUPLICATE_DECISION,
        )
    _check_proof(approval, approver, proof)
    vote = Vote(approver, decision, now, comment, proof.via, proof.key_version,
                proof.signature, proof.signed_at)  # fmt: skip
    voted = attrs.evolve(approval, votes=(*approval.votes, vote))
    if decision == "deny":
        return attrs.evolve(voted, status=ApprovalStatus.DENIED, decided_at=now)
    if _quorum(voted):
        return attrs.evolve(voted, status=ApprovalStatus.APPROVED, decided_at=now)
    return voted


def _check_proof(approval: Approval, approver: str, proof: VoteProof) -> None:
    """Refuse a vote whose proof is weaker than the approver and the approval ask for."""
    if proof.via == "signature":
        return
    if proof.registered:
        how = "a link" if proof.via == "link" else "an unsigned call"
        raise ForbiddenError(
            f"{approver} is a registered approver: their votes must be signed with their "
            f"key, not cast through {how}",
            code=ErrorCode.APPROVER_NOT_AUTHORIZED,
        )
    if approval.require_signed_votes:
        raise ForbiddenError(
            f"approval {approval.id} takes signed votes only (requireSignedVotes), and "
            f"{approver} has no registered key",
            code=ErrorCode.APPROVER_NOT_AUTHORIZED,
        )


def _quorum(approval: Approval) -> bool:
    """Whether enough approvers approved: every group its own count, when there are groups."""
    if not approval.groups:
        return approval.approvals >= approval.required_approvers
    yes = {person(v.approver) for v in approval.votes if v.decision == "approve"}
    return all(
        sum(1 for a in g.approvers if person(a) in yes) >= g.required for g in approval.groups
    )


def expire(approval: Approval, now: datetime) -> Approval:
    """Return a pending approval as expired at ``now``."""
    return attrs.evolve(approval, status=ApprovalStatus.EXPIRED, decided_at=now)
