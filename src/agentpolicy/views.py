"""JSON views of decisions, budgets, reservations, approvals and history (camelCase).

Shared by the MCP tools, the command line and webhook payloads. Amounts are
strings of base units; instants are ISO 8601 in UTC with ``Z``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from agentpolicy.amounts import Amount
from agentpolicy.codec import format_instant
from agentpolicy.decisions import Decision, Headroom
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
from agentpolicy.shadow import ShadowPolicy, ShadowReport
from agentpolicy.simulation import SimulationReport, WindowSpend
from agentpolicy.versions import PolicyChange, PolicyVersion

__all__ = [
    "approval_data",
    "approver_data",
    "budget_data",
    "budget_seen_by",
    "change_data",
    "decision_data",
    "delegation_data",
    "headroom_data",
    "history_data",
    "limit_data",
    "link_data",
    "reservation_data",
    "shadow_data",
    "shadow_report_data",
    "simulation_data",
    "version_data",
    "vote_data",
]


def _instant(value: Any) -> str | None:
    return None if value is None else format_instant(value)


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def budget_seen_by(budget: Budget, may_see: Callable[[str], bool]) -> Budget:
    """``budget`` as a caller bound to some agents sees it: no scope groups it may not see.

    Of each budget above it whose id ``may_see`` rejects, the limits of
    scopes are left out: a group of a scope above counts every payment below
    that budget, and its name is the recipient, network or category another
    agent below it paid. Windows and the other limits (what is left) stay.
    """
    ancestors = tuple(
        above
        if may_see(above.agent_id)
        else attrs.evolve(
            above, limits=tuple(x for x in above.limits if x.group is None), more_groups=()
        )
        for above in budget.ancestors
    )
    return attrs.evolve(budget, ancestors=ancestors)


def decision_data(d: Decision) -> dict[str, Any]:
    """The data of an authorize reply (a dry run adds ``dryRun`` and ``headroom``)."""
    data = _drop_none(
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
    if d.dry_run:
        data["dryRun"] = True
        data["headroom"] = [headroom_data(h) for h in d.headroom]
    return data


def headroom_data(h: Headroom) -> dict[str, Any]:
    """One limit of a dry run: what it allows, what is used, what the payment would leave."""
    data: dict[str, Any] = {"budgetId": h.budget_id, "kind": h.kind, "window": h.window}
    if h.scope is not None:
        data["scope"] = h.scope
        data["group"] = h.group
    if h.limit is not None and h.used is not None and h.remaining is not None:
        data.update(limit=str(h.limit.value), used=str(h.used.value),
                    remaining=str(h.remaining.value), decimals=h.limit.decimals,
                    symbol=h.limit.symbol)  # fmt: skip
    else:
        data.update(max=h.max_count, count=h.count, remaining=h.remaining_count)
        if h.symbol is not None:  # counts of one token's payments (absent: of every token's)
            data["symbol"] = h.symbol
    data["fits"] = h.fits
    for key, value in (("windowStart", h.window_start), ("windowEnd", h.window_end)):
        if value is not None:
            data[key] = format_instant(value)
    return data


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
    if b.more_groups:
        data["moreGroups"] = list(b.more_groups)
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
        if x.symbol is not None:  # counts of one token's payments (absent: of every token's)
            data["symbol"] = x.symbol
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
            "signature": v.signature,
            "signedAt": _instant(v.signed_at),
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


def change_data(c: PolicyChange) -> dict[str, Any]:
    """One field that differs between two policies: path, values before and after, and the line."""
    data: dict[str, Any] = {"path": c.path, "kind": c.kind}
    if c.before is not None:
        data["before"] = c.before
    if c.after is not None:
        data["after"] = c.after
    data["text"] = str(c)
    return data


def version_data(v: PolicyVersion) -> dict[str, Any]:
    """One version of a policy: when and how it was set, whether it is live, what changed."""
    return _drop_none(
        {
            "version": v.version,
            "setAt": format_instant(v.set_at),
            "origin": v.origin,
            "fromVersion": v.from_version,
            "current": v.current,
            "changes": [change_data(c) for c in v.changes],
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


def shadow_data(s: ShadowPolicy) -> dict[str, Any]:
    """An agent's shadow policy (its JSON form), when it was set, and the live version then."""
    from agentpolicy.codec import dump_policy  # noqa: PLC0415 - the converter loads lazily

    return {
        "agentId": s.agent_id,
        "policy": dump_policy(s.policy),
        "setAt": format_instant(s.set_at),
        "liveVersion": s.live_version,
    }


def _payment(at: Any, request: Any) -> dict[str, Any]:
    return _drop_none(
        {
            "at": format_instant(at),
            "agentId": request.agent_id,
            "amount": str(request.amount),
            "decimals": request.decimals,
            "symbol": request.symbol,
            "recipient": request.recipient,
            "network": request.network,
            "category": request.category,
        }
    )


def shadow_report_data(r: ShadowReport) -> dict[str, Any]:
    """A shadow report: counts by outcome and code (live and shadow), flips, the differences."""
    return {
        "agentId": r.agent_id,
        "setAt": format_instant(r.shadow.set_at),
        "liveVersion": r.shadow.live_version,
        "payments": r.payments,
        "live": r.live,
        "shadow": r.shadow_outcomes,
        "liveCodes": dict(r.live_codes),
        "shadowCodes": dict(r.shadow_codes),
        "flips": dict(r.flips),
        "differences": [
            {**_payment(x.at, x.request), "liveCode": x.live_code.value,
             "shadowCode": x.shadow_code.value, "flip": x.flip,
             **({} if x.policy_version is None else {"policyVersion": x.policy_version})}
            for x in r.differences
        ],
    }  # fmt: skip


def simulation_data(r: SimulationReport, limit: int = 100) -> dict[str, Any]:
    """A what-if report: counts, flips, the first ``limit`` changed payments, spend per window."""
    return {
        "agentId": r.agent_id,
        "since": format_instant(r.since),
        "until": format_instant(r.until),
        "payments": r.payments,
        "live": r.live,
        "candidate": r.candidate,
        "liveCodes": dict(r.live_codes),
        "candidateCodes": dict(r.candidate_codes),
        "flips": dict(r.flips),
        "changedTotal": len(r.changed),
        "changed": [
            {**_payment(x.at, x.request), "liveCode": x.live_code.value,
             "candidateCode": x.candidate_code.value, "flip": x.flip}
            for x in r.changed[:limit]
        ],
        "windows": [_spend_data(w) for w in r.windows],
        "notes": list(r.notes),
    }  # fmt: skip


def _spend_data(w: WindowSpend) -> dict[str, Any]:
    data: dict[str, Any] = {
        "window": w.window,
        "windowStart": format_instant(w.start),
        "windowEnd": format_instant(w.end),
    }
    if w.scope is not None:
        data["scope"] = w.scope
        data["group"] = w.group
    data.update(
        live=str(w.live.value), candidate=str(w.candidate.value), decimals=w.live.decimals,
        symbol=w.live.symbol, liveCount=w.live_count, candidateCount=w.candidate_count,
    )  # fmt: skip
    if w.limit is not None:
        data["limit"] = str(w.limit.value)
        data["limitDecimals"] = w.limit.decimals
    if w.max_count is not None:
        data["max"] = w.max_count
    return data
