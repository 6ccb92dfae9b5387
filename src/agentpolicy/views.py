"""JSON views of decisions, budgets, reservations, approvals and history (camelCase).

Shared by the MCP tools, the command line and webhook payloads. Amounts are
strings of base units; instants are ISO 8601 in UTC with ``Z``.
"""

from __future__ import annotations

from typing import Any

from agentpolicy.amounts import Amount
from agentpolicy.codec import format_instant
from agentpolicy.decisions import Decision
from agentpolicy.records import (
    Approval,
    ApprovalGroup,
    ApprovalLink,
    Approver,
    Budget,
    Delegation,
    HistoryRecord,
    LimitBudget,
    Reservation,
    Vote,
)

__all__ = [
    "approval_data",
    "approver_data",
    "budget_data",
    "decision_data",
    "delegation_data",
    "history_data",
    "limit_data",
    "link_data",
    "reservation_data",
    "vote_data",
]


def _instant(value: Any) -> str | None:
    return None if value is None else format_instant(value)


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def decision_data(d: Decision) -> dict[str, Any]:
    """The data of an authorize reply."""
    return _drop_none(
        {
            "allowed": d.allowed,
            "code": d.code.value,
            "reason": d.reason,
            "reservationId": d.reservation_id,
            "requiresApproval": d.requires_approval,
            "approvalId": d.approval_id,
            "expiresAt": _instant(d.expires_at),
            "policyVersion": d.policy_version,
            "budgetId": d.budget_id,
            "evaluations": [
                {
                    "name": e.name,
                    "outcome": e.outcome.value,
                    "code": None if e.code is None else e.code.value,
                    "detail": e.detail,
                }
                for e in d.evaluations
            ],
        }
    )


def _amount(a: Amount | None) -> str | None:
    return None if a is None else str(a.value)


def budget_data(b: Budget) -> dict[str, Any]:
    """The data of a budget reply: every amount in base units of the window's limit."""
    data: dict[str, Any] = {
        "agentId": b.agent_id,
        "at": format_instant(b.at),
        "periods": {
            period.value: {
                "limit": _amount(w.limit),
                "spent": _amount(w.spent),
                "reserved": _amount(w.reserved),
                "remaining": _amount(w.remaining),
                "decimals": w.spent.decimals,
                "symbol": w.spent.symbol,
                "windowStart": format_instant(w.window.start),
                "windowEnd": format_instant(w.window.end),
            }
            for period, w in b.periods.items()
        },
        "limits": [limit_data(x) for x in b.limits],
    }
    if b.ancestors:
        data["ancestors"] = [budget_data(a) for a in b.ancestors]
    if b.delegation is not None:
        data["delegation"] = delegation_data(b.delegation)
    return data


def delegation_data(d: Delegation) -> dict[str, Any]:
    """How a budget was delegated: by whom, when, until when, and whether it was revoked."""
    return _drop_none(
        {
            "agentId": d.agent_id,
            "parentId": d.parent_id,
            "createdAt": format_instant(d.created_at),
            "expiresAt": _instant(d.expires_at),
            "revokedAt": _instant(d.revoked_at),
        }
    )


def limit_data(x: LimitBudget) -> dict[str, Any]:
    """One limit of a budget: amounts in base units of the limit's token, or counts."""
    data: dict[str, Any] = {"kind": x.kind, "window": x.window}
    if x.scope is not None:
        data["scope"] = x.scope
        data["group"] = x.group
    if x.kind == "amount" and x.limit is not None:
        data.update(
            limit=str(x.limit.value),
            spent=_amount(x.spent),
            reserved=_amount(x.reserved),
            remaining=_amount(x.remaining),
            decimals=x.limit.decimals,
            symbol=x.limit.symbol,
        )
    else:
        data.update(max=x.max_count, count=x.count, remaining=x.remaining_count)
    for key, value in (("windowStart", x.window_start), ("windowEnd", x.window_end),
                       ("freesAt", x.frees_at)):  # fmt: skip
        if value is not None:
            data[key] = format_instant(value)
    return data


def reservation_data(r: Reservation) -> dict[str, Any]:
    """The data of a confirm or release reply."""
    return {
        "reservationId": r.id,
        "status": r.status.value,
        "agentId": r.agent_id,
        "amount": str(r.amount.value),
        "expiresAt": format_instant(r.expires_at),
    }


def approval_data(a: Approval) -> dict[str, Any]:
    """The data of an approval (get, decide, and each entry of list)."""
    return _drop_none(
        {
            "id": a.id,
            "agentId": a.agent_id,
            "status": a.status.value,
            "amount": a.amount.human(),
            "amountRaw": str(a.amount.value),
            "decimals": a.amount.decimals,
            "symbol": a.amount.symbol,
            "recipient": a.request.recipient,
            "network": a.request.network,
            "category": a.request.category,
            "memo": a.request.memo,
            "requiredApprovers": a.required_approvers,
            "approvers": list(a.approvers),
            "groups": [_group_data(g) for g in a.groups] or None,
            "requestedBy": a.requested_by,
            "requireSignedVotes": a.require_signed_votes or None,
            "decisions": [vote_data(v) for v in a.votes],
            "createdAt": format_instant(a.created_at),
            "expiresAt": format_instant(a.expires_at),
            "reservationId": a.reservation_id,
        }
    )


def _group_data(g: ApprovalGroup) -> dict[str, Any]:
    return _drop_none(
        {"name": g.name, "required": g.required, "approvers": list(g.approvers), "budget": g.budget}
    )


def history_data(h: HistoryRecord) -> dict[str, Any]:
    """One history record as JSON."""
    return _drop_none(
        {
            "seq": h.seq,
            "at": format_instant(h.at),
            "event": h.event,
            "code": h.code,
            "policyVersion": h.policy_version,
            "reservationId": h.reservation_id,
            "approvalId": h.approval_id,
            "amount": None if h.request is None else str(h.request.amount),
            "recipient": None if h.request is None else h.request.recipient,
            "detail": h.detail,
            "requestedBy": h.requested_by,
        }
    )


def vote_data(v: Vote) -> dict[str, Any]:
    """One approver's decision."""
    return _drop_none(
        {
            "approver": v.approver,
            "decision": v.decision,
            "comment": v.comment,
            "timestamp": format_instant(v.at),
            "via": v.via,
            "keyVersion": v.key_version,
        }
    )


def approver_data(a: Approver) -> dict[str, Any]:
    """A registered approver: the current public key and every version of it."""
    return _drop_none(
        {
            "name": a.name,
            "publicKey": a.public_key,
            "version": a.version,
            "registered": a.current is not None,
            "keys": [
                _drop_none(
                    {
                        "version": k.version,
                        "publicKey": k.public_key,
                        "addedAt": format_instant(k.added_at),
                        "retiredAt": _instant(k.retired_at),
                        "retiredBy": k.retired_by,
                    }
                )
                for k in a.keys
            ],
        }
    )


def link_data(link: ApprovalLink) -> dict[str, Any]:
    """A one-time approval link: what it does, until when, and its token."""
    return {
        "approvalId": link.approval_id,
        "approver": link.approver,
        "decision": link.decision,
        "expiresAt": format_instant(link.expires_at),
        "token": link.token,
    }
