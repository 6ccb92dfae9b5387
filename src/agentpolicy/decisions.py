"""Decisions: the answer to a payment request, with its stable code and every check that ran."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attrs

from agentpolicy.amounts import Amount
from agentpolicy.policy import ApprovalThreshold
from agentpolicy.windows import Period, Window

__all__ = ["Code", "Decision", "Evaluation", "Headroom", "Outcome"]


class Code(enum.StrEnum):
    """Stable decision codes (docs/semantics.md section 2).

    A ``StrEnum``: ``decision.code == "DAILY_LIMIT"`` holds.
    """

    ALLOWED = "ALLOWED"
    NO_POLICY = "NO_POLICY"
    POLICY_DISABLED = "POLICY_DISABLED"
    DELEGATION_REVOKED = "DELEGATION_REVOKED"
    DELEGATION_EXPIRED = "DELEGATION_EXPIRED"
    BLOCKED_PERIOD = "BLOCKED_PERIOD"
    OUTSIDE_ALLOWED_WINDOW = "OUTSIDE_ALLOWED_WINDOW"
    RECIPIENT_BLOCKED = "RECIPIENT_BLOCKED"
    RECIPIENT_NOT_WHITELISTED = "RECIPIENT_NOT_WHITELISTED"
    NETWORK_BLOCKED = "NETWORK_BLOCKED"
    NETWORK_NOT_ALLOWED = "NETWORK_NOT_ALLOWED"
    CATEGORY_REQUIRED = "CATEGORY_REQUIRED"
    CATEGORY_BLOCKED = "CATEGORY_BLOCKED"
    CATEGORY_NOT_ALLOWED = "CATEGORY_NOT_ALLOWED"
    ASSET_MISMATCH = "ASSET_MISMATCH"
    PER_TRANSACTION_LIMIT = "PER_TRANSACTION_LIMIT"
    HOURLY_LIMIT = "HOURLY_LIMIT"
    DAILY_LIMIT = "DAILY_LIMIT"
    WEEKLY_LIMIT = "WEEKLY_LIMIT"
    MONTHLY_LIMIT = "MONTHLY_LIMIT"
    YEARLY_LIMIT = "YEARLY_LIMIT"
    LIFETIME_LIMIT = "LIFETIME_LIMIT"
    ROLLING_LIMIT = "ROLLING_LIMIT"
    COUNT_LIMIT = "COUNT_LIMIT"
    SCOPED_LIMIT = "SCOPED_LIMIT"
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"

    @classmethod
    def for_period(cls, period: Period) -> Code:
        """The code of a window limit: ``Period.DAILY -> Code.DAILY_LIMIT``."""
        return _PERIOD_CODES[period]


_PERIOD_CODES = {p: Code(f"{p.value.upper()}_LIMIT") for p in Period}


class Outcome(enum.StrEnum):
    """How one check ended."""

    PASS = "pass"  # noqa: S105 - not a password
    FAIL = "fail"
    SKIP = "skip"
    """The policy sets nothing for this check, or it could not apply."""
    APPROVAL = "approval"
    """Not a denial: the payment needs human approval."""


@attrs.frozen
class Evaluation:
    """One check that ran: its ``name``, ``outcome``, the ``code`` it would decide, a ``detail``."""

    name: str
    outcome: Outcome
    code: Code | None
    detail: str

    @property
    def failed(self) -> bool:
        """Whether this check denies the payment."""
        return self.outcome is Outcome.FAIL


@attrs.frozen
class Headroom:
    """One limit a payment counts against, and what the payment would leave in it.

    A dry run (``engine.authorize(request, dry_run=True)``) lists one per
    limit of every budget the payment counts in: the agent's own and every
    budget above it (``budget_id``). ``kind`` is ``amount`` or ``count``;
    ``window`` a calendar period (``daily``, ``lifetime``) or a rolling
    duration (``24h``); ``scope`` and ``group`` name a scoped limit and its
    group. For an amount: ``limit``, ``used`` (spent plus reserved before the
    payment, rounded up to the limit's decimals) and ``remaining`` (what is
    left once the payment counts, rounded down; zero when it does not fit).
    For a count: ``max_count``, ``count`` (payments so far) and
    ``remaining_count`` (after this one). ``fits`` says whether the payment
    fits this limit. A calendar window has ``window_start`` and
    ``window_end``. ``symbol`` is the token whose payments the limit counts
    (as the request spells it), ``None`` for a count of every token's.
    """

    budget_id: str
    kind: str
    window: str
    fits: bool
    scope: str | None = None
    group: str | None = None
    limit: Amount | None = None
    used: Amount | None = None
    remaining: Amount | None = None
    max_count: int | None = None
    count: int | None = None
    remaining_count: int | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    symbol: str | None = None


def _worded(value: Any) -> Any:
    """A detail given as a function is written out when first compared or read."""
    return value() if callable(value) else value


@attrs.frozen
class Decision:
    """The answer to a payment request.

    ``allowed`` is true only for code ``ALLOWED``. A payment that needs human
    approval has ``allowed=False``, ``requires_approval=True`` and code
    ``APPROVAL_REQUIRED``; ``threshold`` is the approval threshold that
    matched. ``evaluations`` lists every check that ran, in order.
    ``windows`` are the spending windows the payment counts in.

    ``reason`` and ``evaluations`` may be given as functions that write them:
    they are written on first read, so a decision nobody explains costs no
    formatting. Either way they read (and compare) as a string and a tuple.

    ``budget_id`` names the budget whose rule decided a payment that was not
    allowed: the agent's own id, or the id of an ancestor budget (a fleet's
    ``DAILY_LIMIT`` denies with ``budget_id="acme-fleet"``); ``None`` when
    allowed.

    The pure :func:`~agentpolicy.evaluate` leaves the engine's fields
    (``reservation_id``, ``approval_id``, ``expires_at``, ``policy_version``,
    ``decided_at``) unset; :class:`~agentpolicy.PolicyEngine` fills them in.

    A dry run (``engine.authorize(request, dry_run=True)``) has ``dry_run``
    true, no ids, and ``headroom``: every limit the payment counts against
    with what it would leave there (see :class:`Headroom`).
    """

    allowed: bool
    code: Code
    _reason: str | Callable[[], str] = attrs.field(alias="reason", eq=_worded, repr=False)
    requires_approval: bool = False
    threshold: ApprovalThreshold | None = None
    _evaluations: tuple[Evaluation, ...] | Callable[[], tuple[Evaluation, ...]] = attrs.field(
        alias="evaluations", default=(), eq=_worded, repr=False
    )
    windows: tuple[Window, ...] = ()
    reservation_id: str | None = None
    approval_id: str | None = None
    expires_at: datetime | None = None
    policy_version: int | None = None
    decided_at: datetime | None = None
    budget_id: str | None = None
    dry_run: bool = False
    headroom: tuple[Headroom, ...] = ()

    @property
    def reason(self) -> str:
        """Why, in words: the detail of the check that decided (may change; codes do not)."""
        value = self._reason
        if callable(value):
            value = value()
            object.__setattr__(self, "_reason", value)
        return value

    @property
    def evaluations(self) -> tuple[Evaluation, ...]:
        """Every check that ran, in order, with its outcome, code and detail."""
        value = self._evaluations
        if callable(value):
            value = value()
            object.__setattr__(self, "_evaluations", value)
        return value

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed!r}, code={self.code!r}, reason={self.reason!r}, "
            f"reservation_id={self.reservation_id!r}, approval_id={self.approval_id!r}, "
            f"policy_version={self.policy_version!r})"
        )
