"""The pages of ``agentpolicy serve``: what each shows, and the templates that show it.

The functions here turn records (approvals, budgets, history, versions)
into plain values for the templates; they read nothing and decide nothing.
The templates are package resources (``agentpolicy/serve/templates``),
rendered by Jinja2 with autoescaping on: every value from the store (agent
ids, memos, recipients, comments: text the agent chose) is escaped. Bars
are inline SVG whose widths are attributes, so the pages need no inline
style and no inline script (the Content-Security-Policy allows neither).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

import jinja2

from agentpolicy.amounts import Amount
from agentpolicy.codec import dump_policy, format_instant
from agentpolicy.policy import AgentPolicy
from agentpolicy.records import Approval, Budget, HistoryRecord, LimitBudget
from agentpolicy.rules import matching_threshold
from agentpolicy.versions import PolicyVersion

__all__ = [
    "agent_url",
    "approval_view",
    "bar_view",
    "budget_views",
    "history_view",
    "moment",
    "policy_json",
    "render",
    "rule_lines",
    "versions_view",
    "when",
]

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("agentpolicy.serve", "templates"),
    autoescape=jinja2.select_autoescape(("html",), default=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(template: str, **values: Any) -> str:
    """A template of the package, rendered with ``values`` (everything escaped)."""
    return _ENV.get_template(template).render(**values)


def agent_url(agent_id: str) -> str:
    """The path of an agent's budget page (its id percent-encoded, slashes included)."""
    return "/agents/" + quote(agent_id, safe="")


def when(value: datetime) -> str:
    """An instant for people: ``2026-01-19 10:00 UTC`` (seconds when they are not zero)."""
    text = format_instant(value).replace("T", " ").removesuffix("Z")
    text = text.split(".")[0]
    return (text[:-3] if text.endswith(":00") else text) + " UTC"


def moment(value: datetime, now: datetime) -> str:
    """How far ``value`` is from ``now``, in words: ``in 58 min``, ``3 h ago``."""
    seconds = int((value - now).total_seconds())
    ahead = seconds >= 0
    seconds = abs(seconds)
    if seconds < 60:
        words = f"{seconds} s"
    elif seconds < 3600:
        words = f"{seconds // 60} min"
    elif seconds < 172_800:
        words = f"{seconds // 3600} h {seconds % 3600 // 60} min"
    else:
        words = f"{seconds // 86_400} days"
    return f"in {words}" if ahead else f"{words} ago"


def _share(part: int, whole: int) -> int:
    """``part`` of ``whole`` in tenths of a percent (0 to 1000), exact integers."""
    if whole <= 0:
        return 1000 if part > 0 else 0
    return min(1000, part * 1000 // whole)


def _width(permille: int) -> str:
    return f"{permille // 10}.{permille % 10}"


def bar_view(name: str, limit: Amount, spent: Amount, reserved: Amount,
             remaining: Amount) -> dict[str, Any]:  # fmt: skip
    """One limit as a bar: spent, then reserved, then what remains, out of the limit."""
    s = _share(spent.value, limit.value)
    r = min(1000 - s, _share(reserved.value, limit.value))
    text = (f"spent {spent.human()}, reserved {reserved.human()}, remaining "
            f"{remaining.human()} of {limit.human()}")  # fmt: skip
    return {
        "name": name,
        "text": text,
        "used": "spent",
        "spent": spent.human(),
        "reserved": reserved.human(),
        "remaining": remaining.human(),
        "limit": limit.human(),
        "spent_w": _width(s),
        "reserved_x": _width(s),
        "reserved_w": _width(r),
        "remaining_x": _width(s + r),
        "remaining_w": _width(1000 - s - r),
        "full": remaining.value == 0,
    }


def _count_bar(name: str, count: int, most: int) -> dict[str, Any]:
    s = _share(count, most)
    left = max(0, most - count)
    return {
        "name": name,
        "text": f"{count} of {most} payments used, {left} left",
        "used": "used",
        "spent": f"{count} payments",
        "reserved": None,
        "remaining": f"{left} payments",
        "limit": f"{most} payments",
        "spent_w": _width(s),
        "reserved_x": _width(s),
        "reserved_w": "0.0",
        "remaining_x": _width(s),
        "remaining_w": _width(1000 - s),
        "full": left == 0,
    }


def _limit_name(x: LimitBudget) -> str:
    name = x.window
    if x.scope is not None:
        name += f" ({x.scope}: {x.group})"
    if x.kind == "count":
        name += ", count" if x.symbol is None else f", count of {x.symbol} payments"
    return name


def _bars(limits: Iterable[LimitBudget]) -> list[dict[str, Any]]:
    bars = []
    for x in limits:
        if x.kind == "amount" and x.limit is not None:
            zero = Amount(0, x.limit.decimals, x.limit.symbol)
            bars.append(bar_view(_limit_name(x), x.limit, x.spent or zero, x.reserved or zero,
                                 x.remaining or zero))  # fmt: skip
        elif x.max_count is not None:
            bars.append(_count_bar(_limit_name(x), x.count or 0, x.max_count))
    return bars


def _budget_view(budget: Budget, what: str) -> dict[str, Any]:
    note = None
    if budget.more_groups:  # a budget lists at most 200 groups of its scopes
        note = f"more groups than shown in {', '.join(budget.more_groups)}"
    return {"title": f"{budget.agent_id} ({what})", "agent_id": budget.agent_id,
            "bars": _bars(budget.limits), "note": note}  # fmt: skip


def budget_views(budget: Budget, now: datetime) -> list[dict[str, Any]]:
    """The agent's own limits, then each budget above it, each with its bars."""
    views = [_budget_view(budget, "this agent")]
    views += [_budget_view(above, "a budget above it") for above in budget.ancestors]
    if budget.delegation is not None:
        d = budget.delegation
        ends = "no end" if d.expires_at is None else f"until {when(d.expires_at)}"
        state = f", revoked {when(d.revoked_at)}" if d.revoked_at is not None else ""
        delegated = f"delegated by {d.parent_id} {moment(d.created_at, now)}, {ends}{state}"
        views[0]["note"] = "; ".join(filter(None, (delegated, views[0]["note"])))
    return views


def rule_lines(approval: Approval, policies: Mapping[str, tuple[AgentPolicy, int]]) -> list[str]:
    """Which rule of which budget asked for this approval: its threshold and its quorum.

    ``policies`` maps each budget asking (the agent, and any budget above it
    named by a group) to its policy and version: the agent's is the version
    that decided; a budget above shows its version now.
    """
    budgets = list(dict.fromkeys(g.budget or approval.agent_id for g in approval.groups))
    if not budgets:
        budgets = [approval.agent_id]
    lines = []
    for budget_id in budgets:
        found = policies.get(budget_id)
        if found is None:
            lines.append(f"the approval threshold of {budget_id} (its policy is gone)")
            continue
        policy, version = found
        threshold = matching_threshold(policy, approval.amount)
        if threshold is None:
            lines.append(f"the approval threshold of {budget_id}, policy version {version} "
                         "(it no longer matches this amount)")  # fmt: skip
            continue
        if threshold.groups:
            who = "; ".join(f"{g.required} of {', '.join(g.approvers)} ({g.name})"
                            for g in threshold.groups)  # fmt: skip
        else:
            who = f"{threshold.required_approvers} of {', '.join(threshold.approvers)}"
        lines.append(f"{budget_id}, policy version {version}: payments of "
                     f"{threshold.amount.human()} or more need {who}")  # fmt: skip
    return lines


def approval_view(
    approval: Approval,
    now: datetime,
    *,
    rules: Sequence[str],
    budgets: Sequence[dict[str, Any]],
    link_agent: bool,
) -> dict[str, Any]:
    """Everything one approval card shows (the vote form is added by the caller)."""
    votes = [
        {"approver": v.approver, "decision": v.decision, "comment": v.comment,
         "at": when(v.at), "via": {"signature": "signed", "link": "one-time link"}.get(
             v.via or "", "unsigned")}
        for v in approval.votes
    ]  # fmt: skip
    if approval.groups and len(approval.groups) > 1:
        quorum = "; ".join(f"{g.name}: {g.required} of {', '.join(g.approvers)}"
                           for g in approval.groups)  # fmt: skip
        quorum = f"needs every group: {quorum}"
    else:
        quorum = (f"needs {approval.required_approvers} of "
                  f"{', '.join(approval.every_approver)}")  # fmt: skip
    return {
        "id": approval.id,
        "status": approval.status.value,
        "agent_id": approval.agent_id,
        "agent_url": agent_url(approval.agent_id) if link_agent else None,
        "amount": approval.amount.human(),
        "amount_raw": str(approval.amount.value),
        "recipient": approval.request.recipient,
        "network": approval.request.network,
        "category": approval.request.category,
        "memo": approval.request.memo,
        "requested_by": approval.requested_by,
        "created": when(approval.created_at),
        "created_iso": format_instant(approval.created_at),
        "created_ago": moment(approval.created_at, now),
        "expires": when(approval.expires_at),
        "expires_iso": format_instant(approval.expires_at),
        "expires_in": moment(approval.expires_at, now),
        "rules": list(rules),
        "quorum": quorum,
        "votes": votes,
        "signed_only": approval.require_signed_votes,
        "reservation_id": approval.reservation_id,
        "budgets": list(budgets),
    }


def history_view(records: Iterable[HistoryRecord]) -> list[dict[str, Any]]:
    """The rows of the recent decisions table, newest first."""
    rows = []
    for h in records:
        request = h.request
        rows.append({
            "at": when(h.at),
            "event": h.event,
            "code": h.code or "",
            "amount": "" if request is None else request.asset_amount.human(),
            "recipient": "" if request is None else request.recipient,
            "version": "" if h.policy_version is None else str(h.policy_version),
            "ref": h.approval_id or h.reservation_id or "",
        })  # fmt: skip
    return rows


def versions_view(versions: Iterable[PolicyVersion]) -> list[dict[str, Any]]:
    """Each version of the policy: when, how, whether it is live, and what changed."""
    return [
        {"version": v.version, "set_at": when(v.set_at), "origin": v.origin,
         "from_version": v.from_version, "current": v.current,
         "changes": [str(c) for c in v.changes]}
        for v in versions
    ]  # fmt: skip


def policy_json(policy: AgentPolicy) -> str:
    """The policy as its JSON file, indented."""
    return json.dumps(dump_policy(policy), indent=2, sort_keys=True)
