"""The ledger's documents as plain JSON-able dicts, and the public records made from them.

Documents are built and read here only. Times are integer microseconds since
the epoch; amounts are Python ints (JSON keeps them exact; no store ever
parses a document). Everything read back is validated again when it becomes
a public record (a :class:`~agentpolicy.PaymentRequest` checks itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from agentpolicy.amounts import Amount
from agentpolicy.errors import InternalError
from agentpolicy.ledger import keys
from agentpolicy.records import (
    Approval,
    ApprovalGroup,
    ApprovalStatus,
    Delegation,
    DeliveryStatus,
    HistoryRecord,
    Reservation,
    ReservationStatus,
    Vote,
    WebhookDelivery,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage._time import instant, micros

__all__ = [
    "Known",
    "approval_doc",
    "approval_record",
    "delegation_record",
    "delivery_doc",
    "delivery_record",
    "history_record",
    "levels_of",
    "request_data",
    "request_of",
    "reservation_doc",
    "reservation_record",
    "vote_entry",
]

Body = dict[str, Any]


def request_data(r: PaymentRequest) -> Body:
    """A request as JSON (the camelCase shape of the public JSON form)."""
    data: Body = {
        "agentId": r.agent_id,
        "amount": str(r.amount),
        "recipient": r.recipient,
        "network": r.network,
        "decimals": r.decimals,
        "symbol": r.symbol,
    }
    if r.category is not None:
        data["category"] = r.category
    if r.memo is not None:
        data["memo"] = r.memo
    if r.idempotency_key is not None:
        data["idempotencyKey"] = r.idempotency_key
    return data


def request_of(data: Body) -> PaymentRequest:
    """The request stored by :func:`request_data` (validated again)."""
    try:
        return PaymentRequest(
            agent_id=data["agentId"],
            amount=data["amount"],
            recipient=data["recipient"],
            network=data["network"],
            category=data.get("category"),
            decimals=data.get("decimals", 6),
            symbol=data.get("symbol", "USDT"),
            memo=data.get("memo"),
            idempotency_key=data.get("idempotencyKey"),
        )
    except (KeyError, TypeError) as exc:
        raise InternalError(f"a stored request is damaged ({type(exc).__name__})") from None


def _opt_instant(us: int | None) -> datetime | None:
    return None if us is None else instant(us)


def reservation_doc(
    *,
    agent: str,
    status: str,
    request: Body,
    targets: Sequence[Sequence[Any]],
    created: int,
    expires: int,
    policy_version: int,
    approval_id: str | None,
    levels: Sequence[str] = (),
    holder: str | None = None,
) -> Body:
    """A new reservation (``held`` for an approval, or ``reserved``).

    ``targets`` are the counters it counts in: ``[book, key, "c", 0]`` for a
    calendar window, ``[book, key, "r", seconds]`` for a rolling one.
    ``levels`` are the budgets whose open-reservation index lists it (the
    agent, then its ancestors); ``holder`` the
    caller that claims it as it is made (``cl``, see ``ledger/claims.py``).
    """
    doc: Body = {
        "agent": agent,
        "st": status,
        "req": request,
        "tg": targets,
        "c": created,
        "x": expires,
        "u": created,
        "pv": policy_version,
        "apr": approval_id,
    }
    if len(levels) > 1:
        doc["lv"] = levels
    if holder is not None:
        doc["cl"] = holder
    return doc


def levels_of(doc: Body) -> Sequence[str]:
    """The budgets whose open-reservation index lists a reservation (its agent first)."""
    levels: Sequence[str] = doc.get("lv") or (doc["agent"],)
    return levels


Known = tuple[Body, PaymentRequest, dict[int, datetime]]
"""What a caller has of a reservation it made: the request as stored, the request, and
instants it holds as datetimes (by their microseconds)."""

_STATUSES = {s.value: s for s in ReservationStatus}


def reservation_record(reservation_id: str, doc: Body, known: Known | None = None) -> Reservation:
    """The public :class:`~agentpolicy.Reservation` of a reservation document.

    ``known``: what the caller has of it (see :data:`Known`): its request is
    used when the document holds that very request, its instants where the
    document has those instants.
    """
    stored = doc["req"]
    times: dict[int, datetime] = {}
    if known is not None and (known[0] is stored or known[0] == stored):
        request, times = known[1], known[2]
    else:
        request = request_of(stored)
    status = _STATUSES.get(doc["st"])
    agent = doc["agent"]
    # Reservation's fields in their order, given by position (a confirm returns one: naming
    # each field costs a third more than the making of the record)
    return Reservation(
        reservation_id,
        agent,
        ReservationStatus(doc["st"]) if status is None else status,
        request.asset_amount,
        _window_keys(doc["tg"], agent) if "tg" in doc else tuple(doc["w"]),
        times.get(doc["c"]) or instant(doc["c"]),  # created_at
        times.get(doc["x"]) or instant(doc["x"]),  # expires_at
        times.get(doc["u"]) or instant(doc["u"]),  # updated_at
        request,
        doc["pv"],
        doc["apr"],
        None if "snt" not in doc else times.get(doc["snt"]) or instant(doc["snt"]),  # sent_at
    )


def _window_keys(targets: Sequence[Sequence[Any]], agent: str) -> tuple[str, ...]:
    """The keys of the agent's own calendar windows among a reservation's targets."""
    shared = type(targets) is tuple  # targets an hour's reservations share (never changed)
    if shared:
        found = _WINDOW_KEYS.get(id(targets))
        if found is not None and found[0] is targets and found[1] == agent:
            return found[2]
    own = keys.head(agent)
    # each window once: a payment counts in its token's counter and in every token's
    window_keys = tuple(
        dict.fromkeys(t[1].split("|", 1)[-1] for t in targets if t[2] == "c" and t[0] == own)
    )
    if shared:
        if len(_WINDOW_KEYS) > 4096:
            _WINDOW_KEYS.clear()
        _WINDOW_KEYS[id(targets)] = (targets, agent, window_keys)
    return window_keys


_WINDOW_KEYS: dict[int, tuple[Any, str, tuple[str, ...]]] = {}
"""Window keys by targets (their identity; kept alive here, so an id is never reused)."""


def approval_doc(
    *,
    agent: str,
    request: Body,
    required: int,
    approvers: list[str],
    created: int,
    expires: int,
    hold: str,
    policy_version: int,
    groups: Sequence[tuple[str, int, Sequence[str], str]] = (),
    requested_by: str | None = None,
    signed_votes: bool = False,
    above: Sequence[str] = (),
) -> Body:
    """A new pending approval.

    ``groups``: ``(name, required, approvers, budget)`` each, when the
    threshold met has groups or several budgets ask for approval.
    ``requested_by``: the operator who asked on the agent's behalf.
    ``signed_votes``: every vote must be signed.
    ``above``: the budgets the agent's was delegated from, nearest first.
    """
    doc: Body = {
        "agent": agent,
        "st": "pending",
        "req": request,
        "need": required,
        "who": approvers,
        "votes": [],
        "c": created,
        "x": expires,
        "hold": hold,
        "pv": policy_version,
        "dec": None,
    }
    if groups:
        doc["grp"] = [[name, need, list(who), budget] for name, need, who, budget in groups]
    if requested_by is not None:
        doc["by"] = requested_by
    if signed_votes:
        doc["sv"] = True
    if above:
        doc["up"] = list(above)
    return doc


def vote_entry(vote: Vote, at: int) -> list[Any]:
    """A vote as the approval document keeps it: ``[approver, decision, at, comment, proof?]``."""
    entry: list[Any] = [vote.approver, vote.decision, at, vote.comment]
    if vote.via is not None:
        proof: Body = {"via": vote.via}
        if vote.key_version is not None:
            proof["kv"] = vote.key_version
        if vote.signature is not None and vote.signed_at is not None:
            proof["sig"], proof["sat"] = vote.signature, micros(vote.signed_at)
        entry.append(proof)
    return entry


def _vote(v: list[Any]) -> Vote:
    proof: Body = v[4] if len(v) > 4 else {}
    return Vote(v[0], v[1], instant(v[2]), v[3], proof.get("via"), proof.get("kv"),
                proof.get("sig"), _opt_instant(proof.get("sat")))  # fmt: skip


def _group(g: list[Any]) -> ApprovalGroup:
    # groups written before approver groups had no budget: their name was the budget
    return ApprovalGroup(g[0], g[1], tuple(g[2]), g[3] if len(g) > 3 else g[0])


def approval_record(approval_id: str, doc: Body) -> Approval:
    """The public :class:`~agentpolicy.Approval` of an approval document."""
    return Approval(
        id=approval_id,
        agent_id=doc["agent"],
        status=ApprovalStatus(doc["st"]),
        request=request_of(doc["req"]),
        required_approvers=doc["need"],
        approvers=tuple(doc["who"]),
        votes=tuple(_vote(v) for v in doc["votes"]),
        created_at=instant(doc["c"]),
        expires_at=instant(doc["x"]),
        hold_id=doc["hold"],
        policy_version=doc["pv"],
        decided_at=_opt_instant(doc["dec"]),
        groups=tuple(_group(g) for g in doc.get("grp", ())),
        requested_by=doc.get("by"),
        require_signed_votes=bool(doc.get("sv")),
        budgets_above=tuple(doc.get("up", ())),
    )


def delegation_record(agent_id: str, head: Body | None) -> Delegation | None:
    """The delegation an agent's head records (``"dg"``), if its budget was delegated."""
    dg = None if head is None else head.get("dg")
    if dg is None:
        return None
    return Delegation(
        agent_id=agent_id,
        parent_id=dg["by"],
        created_at=instant(dg["c"]),
        expires_at=_opt_instant(dg["x"]),
        revoked_at=_opt_instant(dg["rv"]),
    )


def history_record(agent_id: str, seq: int, at: int, entry: Body) -> HistoryRecord:
    """One history entry as a public :class:`~agentpolicy.HistoryRecord`."""
    request = entry.get("req")
    usage = entry.get("use")
    symbol = request["symbol"] if request is not None else "USDT"
    return HistoryRecord(
        agent_id=agent_id,
        at=instant(entry.get("at", at)),
        event=entry["ev"],
        code=entry.get("code"),
        policy_version=entry.get("pv"),
        request=None if request is None else request_of(request),
        reservation_id=entry.get("rid"),
        approval_id=entry.get("aid"),
        expires_at=_opt_instant(entry.get("x")),
        usage=None if usage is None else {k: Amount(v[0], v[1], symbol) for k, v in usage.items()},
        detail=entry.get("detail"),
        seq=seq,
        requested_by=entry.get("by"),
    )


def delivery_doc(
    *,
    delivery_id: str,
    event_id: str,
    endpoint_id: str,
    event: str,
    agent: str,
    approval_id: str,
    created: int,
    payload: Body,
) -> Body:
    """A new pending webhook delivery."""
    return {
        "id": delivery_id,
        "eid": event_id,
        "ep": endpoint_id,
        "ev": event,
        "agent": agent,
        "apr": approval_id,
        "c": created,
        "payload": payload,
        "st": "pending",
        "n": 0,
        "next": 0.0,
        "err": None,
    }


def delivery_record(doc: Body, seq: int) -> WebhookDelivery:
    """The :class:`~agentpolicy.records.WebhookDelivery` of a delivery document."""
    return WebhookDelivery(
        id=doc["id"],
        event_id=doc["eid"],
        endpoint_id=doc["ep"],
        event=doc["ev"],
        agent_id=doc["agent"],
        approval_id=doc["apr"],
        created_at=instant(doc["c"]),
        payload=doc["payload"],
        seq=seq,
        status=DeliveryStatus(doc["st"]),
        attempts=doc["n"],
        next_attempt_at=float(doc["next"]),
        last_error=doc["err"],
    )
