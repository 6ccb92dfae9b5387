"""The atomic operations of a storage, written once over a small transaction interface.

The memory and SQLite storages differ only in how they read and write rows
inside one transaction (:class:`Transaction`); every rule about
reservations, approvals, expiry and idempotency lives here. Each operation
checks everything before it writes, and runs inside one transaction that is
rolled back if anything raises, so a refused call changes nothing.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Protocol

import attrs

from agentpolicy import approvals
from agentpolicy.amounts import Amount, over_limit
from agentpolicy.decisions import Code
from agentpolicy.errors import ConflictError, ErrorCode, NotFoundError
from agentpolicy.records import (
    Approval,
    ApprovalStatus,
    AuthorizeOutcome,
    AuthorizePlan,
    Counter,
    HistoryRecord,
    PolicyRecord,
    Reservation,
    ReservationStatus,
    SweepResult,
    Vote,
    WebhookDelivery,
)
from agentpolicy.views import approval_data, vote_data

__all__ = ["IdempotencyEntry", "Transaction", "TransactionalStorage"]


@attrs.frozen
class IdempotencyEntry:
    """The first decision made under an idempotency key, with the request's fingerprint."""

    agent_id: str
    key: str
    fingerprint: str
    created_at: datetime
    record: HistoryRecord


class Transaction(Protocol):
    """Row access inside one atomic transaction of a storage."""

    def get_policy(self, agent_id: str, version: int | None = None) -> PolicyRecord | None:
        """The current policy (or the given version), if any."""

    def put_policy(self, record: PolicyRecord) -> None:
        """Make ``record`` the current policy and keep it as a version."""

    def policy_version(self, agent_id: str) -> int:
        """The current policy's version, 0 when there is none."""

    def list_policies(self, prefix: str | None) -> list[PolicyRecord]:
        """Current policies of agents whose id starts with ``prefix``."""

    def counters(self, agent_id: str, keys: Iterable[str]) -> dict[str, Counter]:
        """The counters that exist for these window keys."""

    def put_counters(self, agent_id: str, counters: Iterable[Counter]) -> None:
        """Write counters."""

    def prune_counters(self, agent_id: str, now: datetime) -> None:
        """Drop counters of windows that ended at or before ``now``."""

    def get_reservation(self, reservation_id: str) -> Reservation | None:
        """A reservation by id."""

    def put_reservation(self, reservation: Reservation) -> None:
        """Write a reservation."""

    def due_reservations(self, agent_id: str | None, now: datetime) -> list[Reservation]:
        """Open reservations whose time is up, of one agent or of all."""

    def get_approval(self, approval_id: str) -> Approval | None:
        """An approval by id."""

    def put_approval(self, approval: Approval) -> None:
        """Write an approval."""

    def pending_approvals(self, agent_id: str | None) -> list[Approval]:
        """Pending approvals, oldest first."""

    def add_history(self, record: HistoryRecord) -> None:
        """Append to an agent's history."""

    def history(self, agent_id: str, limit: int) -> list[HistoryRecord]:
        """An agent's newest history records first."""

    def get_idempotency(self, agent_id: str, key: str) -> IdempotencyEntry | None:
        """The entry for an agent's idempotency key."""

    def put_idempotency(self, entry: IdempotencyEntry) -> None:
        """Write an idempotency entry."""

    def drop_idempotency(self, agent_id: str, before: datetime) -> None:
        """Forget an agent's idempotency entries created before ``before``."""

    def new_id(self, kind: str, agent_id: str) -> str:
        """A new opaque id for a reservation (``res``) or approval (``apr``)."""

    def add_outbox(self, delivery: WebhookDelivery) -> None:
        """Append a delivery to the outbox, giving it the next ``seq``."""

    def put_outbox(self, delivery: WebhookDelivery) -> None:
        """Update a delivery (by id)."""

    def pending_outbox(self, endpoint_ids: Iterable[str]) -> list[WebhookDelivery]:
        """Pending deliveries of these endpoints, in ``seq`` order."""

    def list_outbox(self, status: str | None, limit: int) -> list[WebhookDelivery]:
        """Deliveries, newest first, optionally of one status."""


Route = tuple[str, frozenset[str]]
"""A webhook endpoint's id and the events it wants (empty: all)."""


def _emit(
    tx: Transaction,
    routes: tuple[Route, ...],
    event: str,
    approval: Approval,
    now: datetime,
    decision: Vote | None = None,
) -> None:
    """Write ``event`` to the outbox for every endpoint that wants it (same transaction)."""
    wanting = [endpoint for endpoint, events in routes if not events or event in events]
    if not wanting:
        return
    event_id = f"evt_{uuid.uuid4().hex}"
    payload: dict[str, Any] = {"id": event_id, "event": event, "approval": approval_data(approval)}
    if decision is not None:
        payload["decision"] = vote_data(decision)
    for endpoint in wanting:
        tx.add_outbox(
            WebhookDelivery(
                id=f"{event_id}.{endpoint}", event_id=event_id, endpoint_id=endpoint,
                event=event, agent_id=approval.agent_id, approval_id=approval.id,
                created_at=now, payload=payload,
            )
        )  # fmt: skip


def claim_outbox(
    tx: Transaction, endpoint_ids: list[str], now: float, lease: float, limit: int
) -> list[WebhookDelivery]:
    """Claim due deliveries: only the oldest pending one per endpoint and approval.

    Claiming pushes ``next_attempt_at`` out by ``lease`` seconds, so no other
    worker sends the same delivery meanwhile; events of one approval reach an
    endpoint in the order they were created.
    """
    heads: dict[tuple[str, str], WebhookDelivery] = {}
    for d in tx.pending_outbox(endpoint_ids):
        heads.setdefault((d.endpoint_id, d.approval_id), d)
    claimed: list[WebhookDelivery] = []
    for d in sorted(heads.values(), key=lambda d: d.seq):
        if d.next_attempt_at <= now and len(claimed) < limit:
            leased = attrs.evolve(d, next_attempt_at=now + lease)
            tx.put_outbox(leased)
            claimed.append(leased)
    return claimed


def _history(tx: Transaction, agent_id: str, at: datetime, event: str, **kw: Any) -> None:
    tx.add_history(HistoryRecord(agent_id=agent_id, at=at, event=event, **kw))


def _give_back(tx: Transaction, r: Reservation) -> None:
    # Windows that already ended may have been pruned: nothing to give back there.
    counters = tx.counters(r.agent_id, r.window_keys)
    tx.put_counters(r.agent_id, [c.unreserve(r.amount) for c in counters.values()])


def _close(
    tx: Transaction, r: Reservation, status: ReservationStatus, now: datetime
) -> Reservation:
    _give_back(tx, r)
    closed = attrs.evolve(r, status=status, updated_at=now)
    tx.put_reservation(closed)
    event = "expire" if status is ReservationStatus.EXPIRED else "release"
    _history(
        tx, r.agent_id, now, event, reservation_id=r.id, approval_id=r.approval_id,
        policy_version=r.policy_version,
    )  # fmt: skip
    return closed


def expire_due(
    tx: Transaction, agent_id: str | None, now: datetime, routes: tuple[Route, ...] = ()
) -> SweepResult:
    """Expire every open reservation whose time is up, and the approvals they held for."""
    expired: list[Reservation] = []
    lapsed: list[Approval] = []
    for r in tx.due_reservations(agent_id, now):
        expired.append(_close(tx, r, ReservationStatus.EXPIRED, now))
        if r.status is ReservationStatus.HELD and r.approval_id is not None:
            approval = tx.get_approval(r.approval_id)
            if approval is not None and approval.status is ApprovalStatus.PENDING:
                gone = approvals.expire(approval, now)
                tx.put_approval(gone)
                lapsed.append(gone)
                _emit(tx, routes, "approval.expired", gone, now)
                _history(tx, r.agent_id, now, "approval_expired", approval_id=approval.id)
    return SweepResult(tuple(expired), tuple(lapsed))


def _check_limits(plan: AuthorizePlan, usage: dict[str, Amount]) -> Code:
    if plan.on_pass not in (Code.ALLOWED, Code.APPROVAL_REQUIRED):
        return plan.on_pass
    amount = plan.request.asset_amount
    for limit in plan.limits:
        if over_limit(usage.get(limit.key), amount, limit.limit):
            return limit.code
    return plan.on_pass


def authorize(
    tx: Transaction, plan: AuthorizePlan, routes: tuple[Route, ...] = ()
) -> AuthorizeOutcome:
    """Carry out an :class:`AuthorizePlan` (see there for the steps)."""
    request, now = plan.request, plan.now
    agent = request.agent_id
    if tx.policy_version(agent) != plan.policy_version:
        return AuthorizeOutcome(stale=True)
    key = request.idempotency_key
    fingerprint = request.fingerprint() if key is not None else ""
    if key is not None:
        entry = tx.get_idempotency(agent, key)
        if entry is not None and now - entry.created_at < timedelta(
            seconds=plan.idempotency_ttl_seconds
        ):
            if entry.fingerprint != fingerprint:
                raise ConflictError(
                    f"idempotency key {key!r} was used for a different request",
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                )
            return AuthorizeOutcome(record=entry.record, replayed=True)
    expire_due(tx, agent, now, routes)
    counters = tx.counters(agent, [w.key for w in plan.windows])
    if len(counters) < len(plan.windows):  # a window began: drop counters of ended ones
        tx.prune_counters(agent, now)
    symbol = request.symbol
    usage = {k: Amount(c.spent + c.reserved, c.decimals, symbol) for k, c in counters.items()}
    code = _check_limits(plan, usage)
    reservation_id = approval_id = expires_at = None
    if code in (Code.ALLOWED, Code.APPROVAL_REQUIRED):
        held = code is Code.APPROVAL_REQUIRED
        hold_id = tx.new_id("res", agent)
        expires_at = plan.reservation_expires_at
        if held:
            assert plan.approval is not None  # noqa: S101 - the engine sets terms with the code
            approval_id = tx.new_id("apr", agent)
            expires_at = plan.approval.expires_at
            approval = Approval(
                id=approval_id, agent_id=agent, status=ApprovalStatus.PENDING,
                request=request, required_approvers=plan.approval.required_approvers,
                approvers=plan.approval.approvers, votes=(), created_at=now,
                expires_at=expires_at, hold_id=hold_id, policy_version=plan.policy_version,
            )  # fmt: skip
            tx.put_approval(approval)
            _emit(tx, routes, "approval.created", approval, now)
        else:
            reservation_id = hold_id
        amount = request.asset_amount
        tx.put_reservation(
            Reservation(
                id=hold_id, agent_id=agent,
                status=ReservationStatus.HELD if held else ReservationStatus.RESERVED,
                amount=amount, window_keys=tuple(w.key for w in plan.windows),
                created_at=now, expires_at=expires_at, updated_at=now, request=request,
                policy_version=plan.policy_version, approval_id=approval_id,
            )
        )  # fmt: skip
        tx.put_counters(
            agent,
            [counters.get(w.key, Counter(w.key, w.end)).reserve(amount) for w in plan.windows],
        )
    record = HistoryRecord(
        agent_id=agent, at=now, event="decision", code=code.value,
        policy_version=plan.policy_version, request=request, reservation_id=reservation_id,
        approval_id=approval_id, expires_at=expires_at, usage=usage,
    )  # fmt: skip
    tx.add_history(record)
    if key is not None:
        tx.drop_idempotency(agent, now - timedelta(seconds=plan.idempotency_ttl_seconds))
        tx.put_idempotency(IdempotencyEntry(agent, key, fingerprint, now, record))
    return AuthorizeOutcome(record=record)


def _usable(tx: Transaction, reservation_id: str) -> Reservation:
    r = tx.get_reservation(reservation_id)
    if r is None or r.status is ReservationStatus.HELD:
        raise NotFoundError(
            f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
        )
    return r


def confirm(tx: Transaction, reservation_id: str, now: datetime) -> Reservation:
    """Turn a reservation into spending; confirming again reports the same reservation."""
    r = _usable(tx, reservation_id)
    if r.status is ReservationStatus.CONFIRMED:
        return r
    if r.status is ReservationStatus.RELEASED:
        raise ConflictError(f"reservation {r.id} was released", code=ErrorCode.RESERVATION_RELEASED)
    if r.status is ReservationStatus.EXPIRED or r.due(now):
        raise ConflictError(
            f"reservation {r.id} expired at {r.expires_at.isoformat()}",
            code=ErrorCode.RESERVATION_EXPIRED,
        )
    counters = tx.counters(r.agent_id, r.window_keys)
    tx.put_counters(r.agent_id, [c.settle(r.amount) for c in counters.values()])
    done = attrs.evolve(r, status=ReservationStatus.CONFIRMED, updated_at=now)
    tx.put_reservation(done)
    _history(
        tx, r.agent_id, now, "confirm", reservation_id=r.id, approval_id=r.approval_id,
        policy_version=r.policy_version,
    )  # fmt: skip
    return done


def release(tx: Transaction, reservation_id: str, now: datetime) -> Reservation:
    """Give a reservation's budget back; releasing again (or after expiry) changes nothing."""
    r = _usable(tx, reservation_id)
    if r.status is ReservationStatus.CONFIRMED:
        raise ConflictError(
            f"reservation {r.id} is already confirmed",
            code=ErrorCode.RESERVATION_ALREADY_CONFIRMED,
        )
    if r.status in (ReservationStatus.RELEASED, ReservationStatus.EXPIRED):
        return r
    status = ReservationStatus.EXPIRED if r.due(now) else ReservationStatus.RELEASED
    return _close(tx, r, status, now)


def vote(
    tx: Transaction,
    approval_id: str,
    approver: str,
    decision: str,
    comment: str | None,
    now: datetime,
    reservation_ttl: timedelta,
    routes: tuple[Route, ...] = (),
) -> Approval:
    """Record an approver's decision; approving enough turns the hold into a reservation."""
    approval = tx.get_approval(approval_id)
    if approval is None:
        raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
    decided = approvals.cast_vote(approval, approver, decision, now, comment)
    tx.put_approval(decided)
    _emit(tx, routes, "approval.decision_submitted", decided, now, decided.votes[-1])
    agent = approval.agent_id
    _history(
        tx, agent, now, "vote", approval_id=approval.id, code=decision,
        detail=f"{approver}: {decision}" + (f" ({comment})" if comment else ""),
    )  # fmt: skip
    hold = tx.get_reservation(approval.hold_id)
    if hold is None:  # pragma: no cover - written together with the approval
        raise NotFoundError("the approval's hold is missing", code=ErrorCode.INTERNAL)
    if decided.status is ApprovalStatus.DENIED:
        _close(tx, hold, ReservationStatus.RELEASED, now)
        _history(tx, agent, now, "approval_denied", approval_id=approval.id)
        _emit(tx, routes, "approval.denied", decided, now)
    elif decided.status is ApprovalStatus.APPROVED:
        tx.put_reservation(
            attrs.evolve(
                hold,
                status=ReservationStatus.RESERVED,
                expires_at=now + reservation_ttl,
                updated_at=now,
            )
        )
        _history(
            tx, agent, now, "approval_approved", approval_id=approval.id,
            reservation_id=hold.id, expires_at=now + reservation_ttl,
        )  # fmt: skip
        _emit(tx, routes, "approval.approved", decided, now)
    return decided


class TransactionalStorage:
    """A storage whose every operation runs the shared rules inside one transaction.

    Subclasses provide :meth:`_transaction`, a context manager that yields a
    :class:`Transaction`, commits when the block ends and rolls back when it
    raises. ``write=False`` marks a block that only reads, which a storage
    may run without taking its write lock.
    """

    webhook_routes: tuple[Route, ...] = ()

    def _transaction(
        self, agent_id: str | None = None, *, write: bool = True
    ) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def set_webhook_routes(self, routes: tuple[Route, ...]) -> None:
        """Which endpoints want which events: approval events go to their outbox from now on."""
        self.webhook_routes = tuple(routes)

    def claim_webhooks(
        self, endpoint_ids: list[str], now: float, lease: float, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Claim due deliveries for these endpoints (see :func:`claim_outbox`)."""
        with self._transaction() as tx:
            return claim_outbox(tx, endpoint_ids, now, lease, limit)

    def finish_webhook(self, delivery: WebhookDelivery) -> None:
        """Record the outcome of an attempt (delivered, failed, or the next attempt's time)."""
        with self._transaction() as tx:
            tx.put_outbox(delivery)

    def pending_webhooks(self, endpoint_ids: list[str]) -> int:
        """How many deliveries for these endpoints are still pending."""
        with self._transaction(write=False) as tx:
            return len(tx.pending_outbox(endpoint_ids))

    def webhook_deliveries(
        self, status: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Deliveries in the outbox, newest first, optionally of one status."""
        with self._transaction(write=False) as tx:
            result: list[WebhookDelivery] = tx.list_outbox(status, limit)
            return result

    def put_policy(self, agent_id: str, policy: dict[str, Any], now: datetime) -> PolicyRecord:
        """Store a new version of an agent's policy (JSON form) and return it."""
        with self._transaction(agent_id) as tx:
            current = tx.get_policy(agent_id)
            record = PolicyRecord(agent_id, (current.version if current else 0) + 1, policy, now)
            tx.put_policy(record)
            _history(tx, agent_id, now, "policy_set", policy_version=record.version)
            return record

    def get_policy(self, agent_id: str, version: int | None = None) -> PolicyRecord | None:
        """The current policy, or a given version of it."""
        with self._transaction(agent_id, write=False) as tx:
            result: PolicyRecord | None = tx.get_policy(agent_id, version)
            return result

    def list_policies(self, prefix: str | None = None) -> list[PolicyRecord]:
        """Current policies of agents whose id starts with ``prefix`` (all when ``None``)."""
        with self._transaction(write=False) as tx:
            result: list[PolicyRecord] = tx.list_policies(prefix)
            return result

    def authorize(self, plan: AuthorizePlan) -> AuthorizeOutcome:
        """Carry out ``plan`` atomically."""
        with self._transaction(plan.request.agent_id) as tx:
            return authorize(tx, plan, self.webhook_routes)

    def confirm(self, reservation_id: str, now: datetime) -> Reservation:
        """Confirm a reservation atomically."""
        with self._transaction() as tx:
            return confirm(tx, reservation_id, now)

    def release(self, reservation_id: str, now: datetime) -> Reservation:
        """Release a reservation atomically."""
        with self._transaction() as tx:
            return release(tx, reservation_id, now)

    def vote(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None,
        now: datetime,
        reservation_ttl: timedelta,
    ) -> Approval:
        """Record an approver's decision atomically."""
        with self._transaction() as tx:
            return vote(
                tx, approval_id, approver, decision, comment, now, reservation_ttl,
                self.webhook_routes,
            )  # fmt: skip

    def get_reservation(self, reservation_id: str, now: datetime) -> Reservation | None:
        """A reservation, with its expiry applied if its time is up."""
        with self._transaction() as tx:
            r: Reservation | None = tx.get_reservation(reservation_id)
            if r is not None and r.due(now):
                expire_due(tx, r.agent_id, now, self.webhook_routes)
                r = tx.get_reservation(reservation_id)
            return r

    def get_approval(self, approval_id: str, now: datetime) -> Approval | None:
        """An approval, with its expiry applied if its time is up."""
        with self._transaction() as tx:
            a: Approval | None = tx.get_approval(approval_id)
            if a is not None and a.status is ApprovalStatus.PENDING and now >= a.expires_at:
                expire_due(tx, a.agent_id, now, self.webhook_routes)
                a = tx.get_approval(approval_id)
            return a

    def list_approvals(self, agent_id: str | None, now: datetime) -> list[Approval]:
        """Pending approvals (of one agent, or all), after applying due expiries."""
        with self._transaction(agent_id) as tx:
            expire_due(tx, agent_id, now, self.webhook_routes)
            result: list[Approval] = tx.pending_approvals(agent_id)
            return result

    def usage(self, agent_id: str, keys: Iterable[str], now: datetime) -> dict[str, Counter]:
        """An agent's counters for these window keys, after applying due expiries."""
        with self._transaction(agent_id) as tx:
            expire_due(tx, agent_id, now, self.webhook_routes)
            result: dict[str, Counter] = tx.counters(agent_id, keys)
            return result

    def history(self, agent_id: str, limit: int = 100) -> list[HistoryRecord]:
        """An agent's history, newest first."""
        with self._transaction(agent_id, write=False) as tx:
            result: list[HistoryRecord] = tx.history(agent_id, limit)
            return result

    def sweep(self, now: datetime) -> SweepResult:
        """Expire every due reservation and approval of every agent."""
        with self._transaction() as tx:
            return expire_due(tx, None, now, self.webhook_routes)
