"""Stored state: policies with versions, usage counters, reservations, approvals, history.

These are plain frozen values. Storages keep them; the engine and the
approval state machine compute new ones from old ones.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import attrs

from agentpolicy.amounts import Amount
from agentpolicy.requests import PaymentRequest
from agentpolicy.windows import Period, Window

__all__ = [
    "Approval",
    "ApprovalGroup",
    "ApprovalLink",
    "ApprovalStatus",
    "Approver",
    "ApproverKeyVersion",
    "Budget",
    "Delegation",
    "DeliveryStatus",
    "HistoryRecord",
    "LimitBudget",
    "Reservation",
    "ReservationStatus",
    "SweepResult",
    "Vote",
    "WindowBudget",
    "WebhookDelivery",
]


class ReservationStatus(enum.StrEnum):
    """Where a reservation is in its life."""

    HELD = "held"
    """Held for a pending approval; not yet usable by the agent."""
    RESERVED = "reserved"
    CONFIRMED = "confirmed"
    RELEASED = "released"
    EXPIRED = "expired"

    @property
    def is_open(self) -> bool:
        """Whether the amount still counts as reserved in its windows."""
        return self in (ReservationStatus.HELD, ReservationStatus.RESERVED)


class ApprovalStatus(enum.StrEnum):
    """Statuses of an approval: pending, then approved, denied or expired."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


@attrs.frozen
class Reservation:
    """Budget held for one payment until it is confirmed, released or expires.

    ``sent_at`` is when its payment was marked sent
    (:meth:`~agentpolicy.PolicyEngine.mark_sent`), else ``None``: a sent
    reservation that expires unsettled counts as spent, since the payee
    may have been paid; one never sent gives its amount back.
    """

    id: str
    agent_id: str
    status: ReservationStatus
    amount: Amount
    window_keys: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    updated_at: datetime
    request: PaymentRequest
    policy_version: int
    approval_id: str | None = None
    sent_at: datetime | None = None

    def due(self, now: datetime) -> bool:
        """Whether the reservation is open and its time is up (``now >= expires_at``)."""
        return self.status.is_open and now >= self.expires_at


@attrs.frozen
class Vote:
    """One approver's decision on an approval.

    ``via`` says what proved who cast it: ``"signature"`` (signed with the
    approver's registered key, whose version is ``key_version``),
    ``"link"`` (a one-time approval link the engine signed), or ``None``
    (an unsigned call: it proves only the caller's access to the admin
    surface; see ``docs/approvals.md``). A signed vote keeps its
    ``signature`` and the ``signed_at`` instant it names, so an audit can
    verify it again (:func:`agentpolicy.signing.verify_vote`).
    """

    approver: str
    decision: str
    at: datetime
    comment: str | None = None
    via: str | None = None
    key_version: int | None = None
    signature: str | None = None
    signed_at: datetime | None = None


@attrs.frozen
class ApprovalGroup:
    """One group of an approval's approvers: ``required`` of ``approvers`` must approve.

    ``budget`` is the budget (agent id) whose approval threshold the payment
    met. A threshold without groups gives one group named after its budget
    (when several budgets of a tree ask for approval); a threshold with
    ``groups`` gives one group per group, under its own ``name``.
    """

    name: str
    required: int
    approvers: tuple[str, ...]
    budget: str | None = None


@attrs.frozen
class Approval:
    """A payment waiting for humans; its amount is held in the windows from creation on.

    ``groups`` is set when the threshold met has approver groups, or when
    more than one budget of a tree asks for approval (the agent's and an
    ancestor's thresholds both met): each group must reach its own count,
    an approver in two budgets' groups counts in both, and any deny denies.
    Then ``approvers`` lists everyone in any group and
    ``required_approvers`` is the sum of the groups' counts.

    ``requested_by`` is who asked for the payment on the agent's behalf (an
    operator), if anyone did; neither it nor the agent may vote on it.
    ``require_signed_votes`` is set when a budget whose threshold was met
    requires signed votes. ``budgets_above`` are the budgets the agent's
    budget was delegated from, nearest first (empty for an agent with a
    budget of its own): they asked for the payment too (the budget above
    made the one that pays), so none of them may vote on it either.
    """

    id: str
    agent_id: str
    status: ApprovalStatus
    request: PaymentRequest
    required_approvers: int
    approvers: tuple[str, ...]
    votes: tuple[Vote, ...]
    created_at: datetime
    expires_at: datetime
    hold_id: str
    policy_version: int
    decided_at: datetime | None = None
    groups: tuple[ApprovalGroup, ...] = ()
    requested_by: str | None = None
    require_signed_votes: bool = False
    budgets_above: tuple[str, ...] = ()

    @property
    def amount(self) -> Amount:
        """The amount of the payment that waits."""
        return self.request.asset_amount

    @property
    def reservation_id(self) -> str | None:
        """The reservation the agent confirms or releases, once approved."""
        return self.hold_id if self.status is ApprovalStatus.APPROVED else None

    @property
    def approvals(self) -> int:
        """How many approvers approved so far."""
        return sum(1 for v in self.votes if v.decision == "approve")

    @property
    def requesters(self) -> tuple[str, ...]:
        """Who asked for the payment (never its approvers).

        The agent, every budget above it, and ``requested_by`` if set.
        """
        asked = (self.agent_id, *self.budgets_above)
        return asked if self.requested_by is None else (*asked, self.requested_by)

    @property
    def every_approver(self) -> tuple[str, ...]:
        """Everyone who may vote: ``approvers``, or every group's, without repeats."""
        if not self.groups:
            return self.approvers
        return tuple(dict.fromkeys(a for g in self.groups for a in g.approvers))


@attrs.frozen
class ApproverKeyVersion:
    """One version of an approver's public key in the registry.

    ``retired_at`` is when it stopped verifying votes, and ``retired_by``
    why: ``"rotation"`` (a newer version replaced it) or ``"removal"``.
    """

    version: int
    public_key: str
    added_at: datetime
    retired_at: datetime | None = None
    retired_by: str | None = None


@attrs.frozen
class Approver:
    """A registered approver: a name and every version of its public key, oldest first.

    The current key (the last, unless retired) verifies the approver's
    votes; a removed approver has none.
    """

    name: str
    keys: tuple[ApproverKeyVersion, ...]

    @property
    def current(self) -> ApproverKeyVersion | None:
        """The key that verifies votes now, or ``None`` when the approver was removed."""
        last = self.keys[-1] if self.keys else None
        return last if last is not None and last.retired_at is None else None

    @property
    def public_key(self) -> str | None:
        """The current public key (``ed25519:...``), or ``None``."""
        current = self.current
        return None if current is None else current.public_key

    @property
    def version(self) -> int | None:
        """The current key's version (1, 2, ...), or ``None``."""
        current = self.current
        return None if current is None else current.version


@attrs.frozen
class ApprovalLink:
    """A one-time link token: approve or deny ``approval_id`` as ``approver`` until ``expires_at``.

    See :meth:`agentpolicy.PolicyEngine.redeem_link`. The token is a bearer
    credential: it never appears in a repr.
    """

    approval_id: str
    approver: str
    decision: str
    expires_at: datetime
    token: str = attrs.field(repr=False)


@attrs.frozen
class HistoryRecord:
    """One entry of an agent's audit trail: a decision or a state change.

    ``event`` is ``decision``, ``confirm``, ``release``, ``expire``, ``vote``,
    ``approval_approved``, ``approval_denied``, ``approval_expired`` or
    ``policy_set``. A decision records the request, the code, the policy
    version and the usage it was decided against, which is enough to
    recompute the full decision.
    """

    agent_id: str
    at: datetime
    event: str
    code: str | None = None
    policy_version: int | None = None
    request: PaymentRequest | None = None
    reservation_id: str | None = None
    approval_id: str | None = None
    expires_at: datetime | None = None
    usage: dict[str, Amount] | None = None
    detail: str | None = None
    seq: int | None = None
    requested_by: str | None = None
    """Who asked for the payment on the agent's behalf (a decision), when anyone did."""


@attrs.frozen
class WindowBudget:
    """One window of a budget, in the units of its limit.

    ``spent`` and ``reserved`` round up and ``remaining`` rounds down when
    payments used finer decimals than the limit, so a report never
    overstates what is left. Without a limit, ``limit`` and ``remaining`` are
    ``None``.
    """

    period: Period
    window: Window
    limit: Amount | None
    spent: Amount
    reserved: Amount
    remaining: Amount | None


@attrs.frozen
class LimitBudget:
    """One limit of an agent's budget now: what it allows, what is used, what is left.

    ``kind`` is ``amount`` (``limit``, ``spent``, ``reserved`` and
    ``remaining`` are amounts in the limit's units, rounded as in
    :class:`WindowBudget`) or ``count`` (``max_count``, ``count`` and
    ``remaining_count`` are numbers of payments). ``window`` is a calendar
    period (``daily``, ``lifetime``) or a rolling duration (``24h``);
    ``scope`` and ``group`` name a scoped limit and its group. A calendar
    window has ``window_start`` and ``window_end``; ``frees_at`` is when the
    next payment stops counting (the window's end, or for a rolling window the
    instant its oldest payment leaves), ``None`` when nothing counts. ``symbol``
    is the token whose payments the limit counts, as the policy spells it: the
    limit's own token for an amount, the token of the block a count limit is in
    (an asset's, a scope's), or ``None`` for counts of every token together.
    """

    kind: str
    window: str
    scope: str | None = None
    group: str | None = None
    limit: Amount | None = None
    spent: Amount | None = None
    reserved: Amount | None = None
    remaining: Amount | None = None
    max_count: int | None = None
    count: int | None = None
    remaining_count: int | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    frees_at: datetime | None = None
    symbol: str | None = None


@attrs.frozen
class Budget:
    """An agent's budget at an instant.

    ``periods`` are the calendar windows of the policy's main token (as in
    0.1); ``limits`` lists every limit of every kind, token and scope group.
    """

    agent_id: str
    at: datetime
    periods: dict[Period, WindowBudget]
    limits: tuple[LimitBudget, ...] = ()
    ancestors: tuple[Budget, ...] = ()
    """The budgets above this one (its parent first): a payment must fit each of them too."""
    delegation: Delegation | None = None
    """How this budget was delegated, when it was."""
    more_groups: tuple[str, ...] = ()
    """The scopes with groups ``limits`` leaves out: a budget lists at most 200 groups in all.

    Each scope's groups are listed in the order of their keys (its recipients,
    networks or categories, as kept), scope after scope in the policy's order.
    """


@attrs.frozen
class Delegation:
    """A budget handed down by its parent (:meth:`~agentpolicy.PolicyEngine.delegate`).

    It stops allowing payments at ``expires_at`` (if set) or once revoked
    (``revoked_at``); so do the budgets below it.
    """

    agent_id: str
    parent_id: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        """Whether the delegation still allows payments at ``now``."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


@attrs.frozen
class SweepResult:
    """What a sweep expired."""

    reservations: tuple[Reservation, ...] = ()
    approvals: tuple[Approval, ...] = ()


class DeliveryStatus(enum.StrEnum):
    """Where one webhook delivery is."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@attrs.frozen
class WebhookDelivery:
    """One event for one endpoint, kept in the storage's outbox until delivered or failed.

    Written in the same transaction as the state change that caused it.
    ``seq`` orders events as they were created; ``next_attempt_at`` and the
    back-off run on real time (Unix seconds), not on the engine's clock.
    """

    id: str
    event_id: str
    endpoint_id: str
    event: str
    agent_id: str
    approval_id: str
    created_at: datetime
    payload: dict[str, Any]
    seq: int = 0
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
