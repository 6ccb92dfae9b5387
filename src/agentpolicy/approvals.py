"""The approval state machine, as pure functions of values.

An approval starts ``pending``. One ``deny`` denies it at once; when the
approvals reach ``required_approvers`` it is ``approved`` (with ``groups``,
when every group reaches its own count); at ``expires_at`` it is
``expired``. Approvers compare ignoring case and each decides once.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from agentpolicy.errors import ConflictError, ErrorCode, ForbiddenError, PolicyValidationError
from agentpolicy.records import Approval, ApprovalStatus, Vote

__all__ = ["DECISIONS", "cast_vote"]

DECISIONS = ("approve", "deny")
"""The two decisions an approver can submit."""


def cast_vote(
    approval: Approval,
    approver: str,
    decision: str,
    now: datetime,
    comment: str | None = None,
) -> Approval:
    """Return ``approval`` with this approver's decision applied.

    Raises :class:`~agentpolicy.errors.ConflictError` (``APPROVAL_NOT_PENDING``
    when the approval is decided or its time is up, ``DUPLICATE_DECISION`` for a
    second decision by the same approver),
    :class:`~agentpolicy.errors.ForbiddenError` (``APPROVER_NOT_AUTHORIZED``)
    and :class:`~agentpolicy.PolicyValidationError` for a decision other than
    ``approve`` or ``deny``. Nothing changes when it raises.
    """
    if decision not in DECISIONS:
        raise PolicyValidationError.single("$.decision", "must be 'approve' or 'deny'")
    if approval.status is not ApprovalStatus.PENDING or now >= approval.expires_at:
        status = "expired" if approval.status is ApprovalStatus.PENDING else approval.status
        raise ConflictError(
            f"approval {approval.id} is {status}, not pending",
            code=ErrorCode.APPROVAL_NOT_PENDING,
        )
    who = approver.casefold()
    listed = approval.approvers if not approval.groups else [
        a for g in approval.groups for a in g.approvers]  # fmt: skip
    if who not in {a.casefold() for a in listed}:
        raise ForbiddenError(
            f"{approver} is not an approver of {approval.id}",
            code=ErrorCode.APPROVER_NOT_AUTHORIZED,
        )
    if any(v.approver.casefold() == who for v in approval.votes):
        raise ConflictError(
            f"{approver} has already decided on {approval.id}",
            code=ErrorCode.DUPLICATE_DECISION,
        )
    voted = attrs.evolve(approval, votes=(*approval.votes, Vote(approver, decision, now, comment)))
    if decision == "deny":
        return attrs.evolve(voted, status=ApprovalStatus.DENIED, decided_at=now)
    if _quorum(voted):
        return attrs.evolve(voted, status=ApprovalStatus.APPROVED, decided_at=now)
    return voted


def _quorum(approval: Approval) -> bool:
    """Whether enough approvers approved: every group its own count, when there are groups."""
    if not approval.groups:
        return approval.approvals >= approval.required_approvers
    yes = {v.approver.casefold() for v in approval.votes if v.decision == "approve"}
    return all(
        sum(1 for a in g.approvers if a.casefold() in yes) >= g.required for g in approval.groups
    )


def expire(approval: Approval, now: datetime) -> Approval:
    """Return a pending approval as expired at ``now``."""
    return attrs.evolve(approval, status=ApprovalStatus.EXPIRED, decided_at=now)
