"""The recorded payments of a budget, read from history, as events for a what-if replay.

Pure: given the history entries of a budget and of the budgets below it
(``(seq, at, entry)``, as :meth:`Storage.log` returns them), and a function
that re-judges a recorded decision budget by budget, build the events
:func:`agentpolicy.simulation.replay` takes: each decision, in the order the
ledger recorded it, and the moment the amount of a payment stopped
counting live (a release, an expiry, an approval denied or expired).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agentpolicy.decisions import Code
from agentpolicy.ledger.docs import Body, request_of
from agentpolicy.ledger.state import SPENT_ON_EXPIRY_DETAILS
from agentpolicy.requests import PaymentRequest
from agentpolicy.simulation import Freed, RecordedPayment
from agentpolicy.storage._time import instant

__all__ = ["LevelCodes", "Entry", "events_of"]

Entry = tuple[int, int, Any]
"""A history entry as a store returns it: ``(seq, at, entry)``."""

LevelCodes = Callable[[Body, PaymentRequest], list[Code]]
"""The code each budget of a recorded decision's chain gives (the payer's first)."""

_PASSING = (Code.ALLOWED, Code.APPROVAL_REQUIRED)
_ENDED = (Code.DELEGATION_REVOKED, Code.DELEGATION_EXPIRED)
_FAILS = frozenset(c for c in Code if c not in _PASSING)


def _first_failure(codes: Iterable[Code]) -> Code | None:
    return next((c for c in codes if c in _FAILS), None)


def _facts(agent: str, rec: Body, request: PaymentRequest, codes: list[Code]) -> RecordedPayment:
    """The recorded payment with what the budgets other than ``agent``'s decided."""
    chain = [request.agent_id, *(who for who, _ in rec.get("up", ()))]
    k = chain.index(agent)
    before = _first_failure(codes[:k])
    if before is None and k < len(codes) and codes[k] in _ENDED:
        before = codes[k]  # the budget's delegation had ended: no policy of it decides
    elsewhere = [c for i, c in enumerate(codes) if i != k]
    return RecordedPayment(
        at=instant(rec["at"]),
        request=request,
        live_code=Code(rec["code"]),
        before=before,
        after=_first_failure(codes[k + 1 :]),
        approval_elsewhere=Code.APPROVAL_REQUIRED in elsewhere,
        policy_version=rec.get("pv") or None,
    )


def events_of(
    agent: str,
    logs: Mapping[str, Iterable[Entry]],
    until: int,
    level_codes: LevelCodes,
) -> list[RecordedPayment | Freed]:
    """The replay events of ``agent``'s budget from the history ``logs`` of it and those below.

    ``logs`` maps each agent to its entries (both logs, any order). A
    decision of a budget whose chain did not include ``agent`` at the time
    is left out. An open reservation or approval whose expiry is at or
    before ``until`` (microseconds) is taken as expired then.
    """
    decisions: list[tuple[int, int, Body]] = []
    settled: dict[str, tuple[str, int, int]] = {}  # reservation id -> (event, at, seq)
    approvals: dict[str, tuple[str, int, int, Body]] = {}  # approval id -> (event, at, seq, entry)
    for entries in logs.values():
        for seq, at, entry in entries:
            event = entry.get("ev")
            if event == "decision":
                decisions.append((entry.get("at", at), seq, entry))
            elif event in ("confirm", "release", "expire") and "rid" in entry:
                if entry.get("detail") in SPENT_ON_EXPIRY_DETAILS:  # sent: spent, not freed
                    event = "confirm"
                settled[entry["rid"]] = (event, at, seq)
            elif event in ("approval_approved", "approval_denied", "approval_expired"):
                approvals[entry["aid"]] = (event, at, seq, entry)
    timeline: list[tuple[int, int, int, Any]] = []  # (time, seq, kind, what)
    for at, seq, rec in decisions:
        request = request_of(rec["req"])
        chain = [request.agent_id, *(who for who, _ in rec.get("up", ()))]
        if agent not in chain:
            continue
        payment = _facts(agent, rec, request, level_codes(rec, request))
        timeline.append((at, seq, 1, payment))
        if payment.live_code in _PASSING:
            timeline += _fate(rec, seq, settled, approvals, until)
    timeline.sort(key=lambda t: (t[0], t[1]))
    events: list[RecordedPayment | Freed] = []
    index: dict[int, int] = {}  # the decision's seq -> its number among the payments
    for time, seq, kind, what in timeline:
        if kind == 1:
            index[seq] = len(index)
            events.append(what)
        elif what[0] in index:
            events.append(Freed(index[what[0]], instant(time), what[1]))
    return events


def _fate(
    rec: Body,
    seq: int,
    settled: Mapping[str, tuple[str, int, int]],
    approvals: Mapping[str, tuple[str, int, int, Body]],
    until: int,
) -> list[tuple[int, int, int, Any]]:
    """When the amount of a held payment stopped counting live, if it did."""
    rid, expires, approval = rec.get("rid"), rec.get("x"), False
    if rec.get("aid") is not None:
        found = approvals.get(rec["aid"])
        if found is None or found[0] == "approval_expired":
            ends = expires
            if found is not None:  # lapsed (or revoked): at its expiry at the latest
                ends = found[1] if expires is None else min(expires, found[1])
            return [] if ends is None or ends > until else [(ends, -1, 0, (seq, True))]
        if found[0] == "approval_denied":
            return [(found[1], found[2], 0, (seq, True))]
        rid, expires = found[3].get("rid"), found[3].get("x")
    if rid is None:
        return []
    done = settled.get(rid)
    if done is None or done[0] == "expire":
        if expires is None or expires > until:
            return []
        return [(expires, -1, 0, (seq, approval))]
    if done[0] == "release":
        return [(done[1], done[2], 0, (seq, approval))]
    return []  # confirmed: spent
