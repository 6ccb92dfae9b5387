"""The ledger's operations as steps: authorize, confirm, release, vote, set a policy, expire.

Each function returns a step for :func:`agentpolicy.ledger.runner.run`: it
reads what it needs through the view, checks everything before it writes,
and puts its writes and its result into the transaction. A step that raises
writes nothing. These are the only rules of the ledger; no store repeats
any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from agentpolicy import approvals
from agentpolicy.decisions import Code, Decision
from agentpolicy.errors import ConflictError, ErrorCode, NotFoundError
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import (
    Body,
    approval_doc,
    approval_record,
    request_data,
    reservation_doc,
)
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import (
    ClockBehindError,
    Head,
    LedgerConfig,
    emit,
    expire_due,
    record,
)
from agentpolicy.policy import AgentPolicy
from agentpolicy.records import ApprovalStatus, Vote
from agentpolicy.requests import PaymentRequest
from agentpolicy.rules import Assessment, assess, judge
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.base import Txn

__all__ = [
    "PolicySource",
    "authorize",
    "expire",
    "put_policy",
    "settle",
    "vote",
]

Step = Callable[[View, Txn], None]

PolicySource = Callable[[str, int, View], AgentPolicy | None]
"""The engine's parsed policies: ``(agent, version, view) -> policy`` (``None`` for version 0)."""

_IDEMPOTENCY_KEEP_MS = 25 * 3_600_000
_PASSING = (Code.ALLOWED, Code.APPROVAL_REQUIRED)


def authorize(
    cfg: LedgerConfig,
    shard: str,
    request: PaymentRequest,
    now: datetime,
    policies: PolicySource,
    seen: list[Decision],
) -> Step:
    """Decide a payment and hold its amount when it is allowed or needs approval.

    The result is ``{"rec": decision record}`` (with ``"replayed": True``
    for an idempotency key seen before). The decision, with its ids, is
    appended to ``seen`` (its details are worded only when read).
    """
    agent = request.agent_id
    now_us = micros(now)
    head_name = keys.head(agent)
    key = request.idempotency_key
    idem_name = None if key is None else keys.idempotency(agent, key)
    names = (head_name,) if idem_name is None else (head_name, idem_name)
    fingerprint = "" if key is None else request.fingerprint()

    def step(view: View, txn: Txn) -> None:
        view.read(names, guess=names)
        head = Head.read(view, agent)
        if now_us < head.body["hz"]:
            raise ClockBehindError(
                f"this engine's clock ({now.isoformat()}) is behind what agent {agent}'s "
                "ledger has already seen by more than the counter grace period; nothing "
                "was allowed or changed"
            )
        if idem_name is not None:
            entry = view.doc(idem_name)
            if entry is not None and now_us - entry["c"] < cfg.idempotency_ttl:
                if entry["fp"] != fingerprint:
                    raise ConflictError(
                        f"idempotency key {key!r} was used for a different request",
                        code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    )
                txn.result = {"rec": entry["rec"], "replayed": True}
                return
        version = head.body["pv"]
        a = assess(policies(agent, version, view), request, now)
        expire_due(view, txn, cfg, shard, head, now_us)
        head.prune(now_us, cfg.counter_grace)
        counters = head.counters
        usage: dict[str, list[int]] = {}
        for w in a.windows:
            c = counters.get(w.key)
            if c is not None:
                usage[w.key] = [c[2] + c[3], c[1]]
        verdict = judge(a, usage)
        code = verdict.code
        rec: Body = {
            "ev": "decision",
            "at": now_us,
            "code": code.value,
            "pv": version,
            "req": request_data(request),
            "use": usage,
        }
        if code in _PASSING:
            _hold(txn, cfg, shard, head, a, rec, code is Code.APPROVAL_REQUIRED, now_us)
            record(txn, cfg, agent, rec)
            seen.append(verdict.decision(
                reservation_id=rec.get("rid"), approval_id=rec.get("aid"),
                expires_at=instant(rec["x"]), policy_version=version or None, decided_at=now,
            ))  # fmt: skip
        else:
            record(txn, cfg, agent, rec, denial=True)
            seen.append(verdict.decision(policy_version=version or None, decided_at=now))
        head.write(txn)
        if idem_name is not None:
            txn.put[idem_name] = {"fp": fingerprint, "c": now_us, "rec": rec}
            txn.ttl[idem_name] = _IDEMPOTENCY_KEEP_MS
        txn.result = {"rec": rec}

    return step


def _hold(
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    head: Head,
    a: Assessment,
    rec: Body,
    held: bool,
    now: int,
) -> None:
    """Reserve the payment's amount (or hold it for an approval) in every window."""
    request = a.request
    agent = request.agent_id
    token = keys.new_token(now)
    rid = keys.new_id("res", agent, token)
    version = rec["pv"]
    approval_id = None
    if held:
        assert a.policy is not None  # noqa: S101 - a threshold matched, so there is a policy
        assert a.threshold is not None  # noqa: S101 - held means a threshold matched
        config = a.policy.approval_config
        timeout_ms = config.timeout if config is not None else 0
        expires = now + timeout_ms * 1000
        approval_id = keys.new_id("apr", agent, token)
        approval = approval_doc(
            agent=agent, request=rec["req"], required=a.threshold.required_approvers,
            approvers=list(a.threshold.approvers), created=now, expires=expires, hold=rid,
            policy_version=version,
        )  # fmt: skip
        name = keys.approval(approval_id)
        txn.put[name] = approval
        txn.ttl[name] = timeout_ms + cfg.keep_closed_ms
        txn.index.append((keys.pending_index(agent), approval_id, now))
        txn.index.append((keys.PENDING, approval_id, now))
        emit(txn, cfg, shard, "approval.created", approval_id, approval)
        rec["aid"] = approval_id
    else:
        expires = now + cfg.reservation_ttl
        rec["rid"] = rid
    rec["x"] = expires
    name = keys.reservation(rid)
    txn.put[name] = reservation_doc(
        agent=agent, status="held" if held else "reserved", request=rec["req"],
        windows=[w.key for w in a.windows], created=now, expires=expires,
        policy_version=version, approval_id=approval_id,
    )  # fmt: skip
    txn.ttl[name] = (expires - now) // 1000 + cfg.keep_closed_ms
    txn.index.append((keys.open_index(agent), rid, expires))
    head.reserve(a.windows, request.amount, request.decimals)
    head.lower_due(expires)


def _close(
    txn: Txn,
    cfg: LedgerConfig,
    head: Head,
    rid: str,
    doc: Body,
    status: str,
    now: int,
) -> Body:
    """Close an open reservation: give its amount back (or spend it) in its windows."""
    request = doc["req"]
    op = "settle" if status == "confirmed" else "unreserve"
    head.apply(doc["w"], int(request["amount"]), request["decimals"], op)
    closed = {**doc, "st": status, "u": now}
    name = keys.reservation(rid)
    txn.put[name] = closed
    txn.ttl[name] = cfg.keep_closed_ms
    txn.index.append((keys.open_index(doc["agent"]), rid, None))
    event = {"confirmed": "confirm", "released": "release", "expired": "expire"}[status]
    entry: Body = {"ev": event, "rid": rid, "pv": doc["pv"]}
    if doc["apr"] is not None:
        entry["aid"] = doc["apr"]
    record(txn, cfg, doc["agent"], entry)
    return closed


def settle(cfg: LedgerConfig, reservation_id: str, action: str, now: datetime) -> Step:
    """Confirm (``action="confirm"``) or release a reservation.

    Confirming again, or releasing again (or after expiry), changes nothing
    and reports the reservation. The result is ``{"doc": reservation}``.
    Raises ``RESERVATION_NOT_FOUND``, ``RESERVATION_RELEASED``,
    ``RESERVATION_EXPIRED`` or ``RESERVATION_ALREADY_CONFIRMED``.
    """
    now_us = micros(now)
    name = keys.reservation(reservation_id)
    agent = keys.agent_of_id(reservation_id)
    names = (name,) if agent is None else (name, keys.head(agent))

    def step(view: View, txn: Txn) -> None:
        view.read(names, guess=names)
        doc = view.doc(name)
        if doc is None or doc["st"] == "held":
            raise NotFoundError(
                f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
            )
        status = doc["st"]
        txn.result = {"doc": doc}
        if action == "confirm":
            if status == "confirmed":
                return
            if status == "released":
                raise ConflictError(
                    f"reservation {reservation_id} was released",
                    code=ErrorCode.RESERVATION_RELEASED,
                )
            if status == "expired" or now_us >= doc["x"]:
                raise ConflictError(
                    f"reservation {reservation_id} expired",
                    code=ErrorCode.RESERVATION_EXPIRED,
                )
            new_status = "confirmed"
        else:
            if status == "confirmed":
                raise ConflictError(
                    f"reservation {reservation_id} is already confirmed",
                    code=ErrorCode.RESERVATION_ALREADY_CONFIRMED,
                )
            if status in ("released", "expired"):
                return
            new_status = "expired" if now_us >= doc["x"] else "released"
        head = Head.read(view, doc["agent"])
        txn.result = {"doc": _close(txn, cfg, head, reservation_id, doc, new_status, now_us)}
        head.write(txn)

    return step


def vote(
    cfg: LedgerConfig,
    shard: str,
    approval_id: str,
    approver: str,
    decision: str,
    comment: str | None,
    now: datetime,
) -> Step:
    """Record an approver's decision; approving enough turns the hold into a reservation.

    The result is ``{"doc": approval}``. Raises ``APPROVAL_NOT_FOUND``,
    ``APPROVAL_NOT_PENDING``, ``APPROVER_NOT_AUTHORIZED`` or
    ``DUPLICATE_DECISION`` (nothing changes).
    """
    now_us = micros(now)
    name = keys.approval(approval_id)
    agent = keys.agent_of_id(approval_id)
    names = [name]
    if agent is not None:
        names += [keys.head(agent), keys.reservation("res" + approval_id[3:])]

    def step(view: View, txn: Txn) -> None:
        view.read(names, guess=names)
        doc = view.doc(name)
        if doc is None:
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        decided = approvals.cast_vote(
            approval_record(approval_id, doc), approver, decision, now, comment
        )
        status = decided.status.value
        new = {
            **doc,
            "st": status,
            "votes": [*doc["votes"], [approver, decision, now_us, comment]],
            "dec": now_us if decided.decided_at is not None else None,
        }
        txn.put[name] = new
        owner = doc["agent"]
        emit(txn, cfg, shard, "approval.decision_submitted", approval_id, new,
             Vote(approver, decision, now, comment))  # fmt: skip
        detail = f"{approver}: {decision}" + (f" ({comment})" if comment else "")
        record(txn, cfg, owner, {"ev": "vote", "aid": approval_id, "code": decision,
                                 "detail": detail})  # fmt: skip
        txn.result = {"doc": new}
        if decided.status is ApprovalStatus.PENDING:
            return
        txn.ttl[name] = cfg.keep_closed_ms
        txn.index.append((keys.pending_index(owner), approval_id, None))
        txn.index.append((keys.PENDING, approval_id, None))
        hold_name = keys.reservation(doc["hold"])
        hold = view.doc(hold_name)
        if hold is None:  # pragma: no cover - written together with the approval
            raise NotFoundError("the approval's hold is missing", code=ErrorCode.INTERNAL)
        head = Head.read(view, owner)
        if decided.status is ApprovalStatus.DENIED:
            _close(txn, cfg, head, doc["hold"], hold, "released", now_us)
            record(txn, cfg, owner, {"ev": "approval_denied", "aid": approval_id})
            emit(txn, cfg, shard, "approval.denied", approval_id, new)
        else:
            expires = now_us + cfg.reservation_ttl
            txn.put[hold_name] = {**hold, "st": "reserved", "x": expires, "u": now_us}
            txn.ttl[hold_name] = cfg.reservation_ttl // 1000 + cfg.keep_closed_ms
            txn.index.append((keys.open_index(owner), doc["hold"], expires))
            head.lower_due(expires)
            record(txn, cfg, owner, {"ev": "approval_approved", "aid": approval_id,
                                     "rid": doc["hold"], "x": expires})  # fmt: skip
            emit(txn, cfg, shard, "approval.approved", approval_id, new)
        head.write(txn)

    return step


def expire(cfg: LedgerConfig, shard: str, agent: str, now: datetime) -> Step:
    """Expire what of the agent is due.

    The result is ``{"head": the head after it, "expired": [[id, reservation]],
    "lapsed": [[id, approval]]}``.
    """
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        expired, lapsed = expire_due(view, txn, cfg, shard, head, now_us)
        head.write(txn)
        txn.result = {"head": head.body, "expired": expired, "lapsed": lapsed}

    return step


def put_policy(cfg: LedgerConfig, agent: str, policy: dict[str, Any], now: datetime) -> Step:
    """Store a new version of the agent's policy (its JSON form); the result is the version."""
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        version = head.body["pv"] + 1
        txn.put[keys.policy(agent, version)] = {"policy": policy, "at": now_us}
        head.set("pv", version)
        head.write(txn)
        txn.index.append((keys.AGENTS, agent, 0))
        record(txn, cfg, agent, {"ev": "policy_set", "pv": version})
        txn.result = version

    return step
