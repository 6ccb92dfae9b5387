"""PolicyEngine: turns pure decisions into a stateful guard over a storage.

An allowed payment holds its amount in a reservation until the agent
confirms or releases it (or it expires); a payment above an approval
threshold holds its amount while named humans decide. The storage re-checks
every window limit inside its own transaction, so no number of processes
sharing it can overspend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import attrs

from agentpolicy._checks import check_identifier, check_text, raise_if
from agentpolicy.amounts import Amount, scale_units
from agentpolicy.approvals import DECISIONS
from agentpolicy.codec import dump_policy, load_policy
from agentpolicy.decisions import Code, Decision
from agentpolicy.delivery import WebhookDispatcher
from agentpolicy.errors import (
    ErrorCode,
    InternalError,
    NotFoundError,
    PolicyError,
    PolicyValidationError,
    StorageUnavailableError,
)
from agentpolicy.policy import AgentPolicy
from agentpolicy.records import (
    Approval,
    ApprovalTerms,
    AuthorizePlan,
    Budget,
    HistoryRecord,
    Reservation,
    SweepResult,
    WindowBudget,
    WindowLimit,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.rules import Assessment, assess, conclude, windows_for
from agentpolicy.storage import Storage, open_storage
from agentpolicy.webhooks import WebhookEndpoint, to_endpoints
from agentpolicy.windows import Period

__all__ = ["DEFAULT_RESERVATION_TTL", "PolicyEngine", "StoredPolicy"]

DEFAULT_RESERVATION_TTL = timedelta(minutes=5)
"""How long an allowed payment's reservation waits for confirm or release."""

_PASSING = (Code.ALLOWED, Code.APPROVAL_REQUIRED)
_WINDOW_CODES = frozenset(Code.for_period(p) for p in Period)
_STALE_RETRIES = 8


def utc_now() -> datetime:
    """The real time, in UTC: the engine's default clock."""
    return datetime.now(UTC)


@attrs.frozen
class StoredPolicy:
    """An agent's policy as stored: the policy, its version (1, 2, ...) and when it was set."""

    agent_id: str
    policy: AgentPolicy
    version: int
    updated_at: datetime


def _ceil_to(value: int, decimals: int, to: int) -> int:
    if decimals <= to:
        return scale_units(value, decimals, to)
    step = scale_units(1, to, decimals)
    return -(-value // step)


def _floor_to(value: int, decimals: int, to: int) -> int:
    if decimals <= to:
        return scale_units(value, decimals, to)
    return value // scale_units(1, to, decimals)


class PolicyEngine:
    """The stateful guard: policies, reservations, approvals and history over a storage.

    ``storage`` is a :class:`~agentpolicy.storage.Storage`, a URL for
    :func:`~agentpolicy.open_storage`, or ``None`` for a fresh in-memory
    storage. ``clock`` returns the current time as an aware datetime (default:
    the real UTC clock); it is the only clock the engine reads.

    ``webhook_endpoints`` (objects or dicts, see
    :func:`agentpolicy.webhooks.to_endpoints`) turn on signed approval events:
    they are written to the storage's outbox in the same transaction as the
    change and delivered by a background thread; ``webhook_backoff`` and
    ``webhook_backoff_cap`` (seconds, real time) shape its retries.

    Errors that are not decisions raise :class:`~agentpolicy.PolicyError`
    subclasses whose ``.code`` is an :class:`~agentpolicy.ErrorCode`; a
    denied payment is a :class:`~agentpolicy.Decision`, never an exception.
    """

    def __init__(
        self,
        storage: Storage | str | None = None,
        clock: Callable[[], datetime] | None = None,
        reservation_ttl: timedelta = DEFAULT_RESERVATION_TTL,
        webhook_endpoints: Iterable[WebhookEndpoint | Mapping[str, Any]] | None = None,
        *,
        webhook_backoff: float = 1.0,
        webhook_backoff_cap: float = 3600.0,
    ) -> None:
        if not isinstance(reservation_ttl, timedelta) or reservation_ttl <= timedelta(0):
            raise PolicyValidationError.single("$.reservationTtl", "must be a positive duration")
        endpoints = to_endpoints(webhook_endpoints)
        if storage is None:
            storage = "memory://"
        self.storage: Storage = open_storage(storage) if isinstance(storage, str) else storage
        self.clock: Callable[[], datetime] = clock or utc_now
        self.reservation_ttl = reservation_ttl
        self._parsed: dict[tuple[str, int], AgentPolicy | None] = {}
        self._current: dict[str, int] = {}
        self._cache_lock = threading.Lock()
        self.webhooks: WebhookDispatcher | None = None
        if endpoints:
            if not hasattr(self.storage, "set_webhook_routes"):
                raise PolicyError(
                    f"{type(self.storage).__name__} keeps no webhook outbox: use the memory "
                    "or SQLite storage for webhooks",
                    code=ErrorCode.INVALID_INPUT,
                )
            self.storage.set_webhook_routes(tuple((e.id, e.events) for e in endpoints))
            self.webhooks = WebhookDispatcher(
                self.storage,  # type: ignore[arg-type]
                endpoints,
                backoff=webhook_backoff,
                backoff_cap=webhook_backoff_cap,
                housekeeping=self.sweep,
            )
            self.webhooks.start()

    # -- plumbing ---------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self.clock()
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise InternalError("the engine's clock must return a timezone-aware datetime")
        return now

    def _policy_at(self, agent_id: str, version: int) -> AgentPolicy | None:
        key = (agent_id, version)
        with self._cache_lock:
            if key in self._parsed:
                return self._parsed[key]
        if version == 0:
            policy = None
        else:
            record = self.storage.get_policy(agent_id, version)
            if record is None:
                raise InternalError(f"policy version {version} of {agent_id} is missing")
            policy = load_policy(record.policy)
        with self._cache_lock:
            if len(self._parsed) > 10_000:
                self._parsed.clear()
            self._parsed[key] = policy
        return policy

    def _current_policy(self, agent_id: str, *, fresh: bool) -> tuple[int, AgentPolicy | None]:
        version = None if fresh else self._current.get(agent_id)
        if version is None:
            record = self.storage.get_policy(agent_id)
            version = 0 if record is None else record.version
            if record is not None:
                with self._cache_lock:
                    self._parsed.setdefault((agent_id, version), load_policy(record.policy))
            self._current[agent_id] = version
        return version, self._policy_at(agent_id, version)

    # -- policies -----------------------------------------------------------------------

    def set_policy(self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]) -> int:
        """Store a policy for ``agent_id`` and return its new version (1, 2, ...).

        ``policy`` is an :class:`~agentpolicy.AgentPolicy` or the seed's JSON
        form; invalid input raises :class:`~agentpolicy.PolicyValidationError`
        with paths below ``$.policy`` and stores nothing.
        """
        raise_if(check_identifier(agent_id, "$.agentId"))
        if not isinstance(policy, AgentPolicy):
            try:
                policy = load_policy(policy)
            except PolicyValidationError as err:
                raise err.under("$.policy") from None
        record = self.storage.put_policy(agent_id, dump_policy(policy), self._now())
        with self._cache_lock:
            self._parsed[(agent_id, record.version)] = policy
        self._current[agent_id] = record.version
        return record.version

    def get_policy(self, agent_id: str) -> StoredPolicy | None:
        """The agent's current policy and version, or ``None``."""
        raise_if(check_identifier(agent_id, "$.agentId"))
        record = self.storage.get_policy(agent_id)
        if record is None:
            return None
        return StoredPolicy(agent_id, load_policy(record.policy), record.version, record.updated_at)

    def list_policies(self, org_id: str | None = None) -> list[StoredPolicy]:
        """Every stored policy, or those of agents whose id starts with ``"{org_id}:"``."""
        if org_id is not None:
            raise_if(check_identifier(org_id, "$.orgId"))
        records = self.storage.list_policies(None if org_id is None else f"{org_id}:")
        return [
            StoredPolicy(r.agent_id, load_policy(r.policy), r.version, r.updated_at)
            for r in records
        ]

    # -- payments -----------------------------------------------------------------------

    def _plan(self, a: Assessment, version: int) -> AuthorizePlan:
        policy, request, now = a.policy, a.request, a.now
        limits: tuple[WindowLimit, ...] = ()
        terms = None
        if a.early is not None:
            on_pass = a.early.code
        elif a.blocking is not None:
            assert a.blocking.code is not None  # noqa: S101 - failures carry codes
            on_pass = a.blocking.code
        else:
            assert policy is not None  # noqa: S101 - no early decision means a policy
            on_pass = Code.ALLOWED if a.threshold is None else Code.APPROVAL_REQUIRED
            if policy.limits is not None:
                limits = tuple(
                    WindowLimit(w.key, limit, Code.for_period(w.period))
                    for w in a.windows
                    if (limit := policy.limits.for_period(w.period)) is not None
                )
            if a.threshold is not None:
                timeout = policy.approval_config.timeout if policy.approval_config else 0
                terms = ApprovalTerms(
                    a.threshold.required_approvers,
                    a.threshold.approvers,
                    now + timedelta(milliseconds=timeout),
                )
        return AuthorizePlan(
            request=request,
            now=now,
            policy_version=version,
            windows=a.windows,
            limits=limits,
            on_pass=on_pass,
            reservation_expires_at=now + self.reservation_ttl,
            approval=terms,
        )

    def _decision(self, record: HistoryRecord, assessment: Assessment | None = None) -> Decision:
        assert record.request is not None  # noqa: S101 - decision records carry their request
        version = record.policy_version or 0
        if assessment is None:  # a replayed decision: assess what was asked then
            policy = self._policy_at(record.agent_id, version)
            assessment = assess(policy, record.request, record.at)
        decision = conclude(assessment, record.usage or {})
        if decision.code != record.code:
            raise InternalError(
                f"the storage decided {record.code} but the policy gives {decision.code}"
            )
        return attrs.evolve(
            decision,
            reservation_id=record.reservation_id,
            approval_id=record.approval_id,
            expires_at=record.expires_at,
            policy_version=version or None,
            decided_at=record.at,
        )

    def authorize(self, request: PaymentRequest) -> Decision:
        """Decide a payment; hold its amount when it is allowed or needs approval.

        Returns a :class:`~agentpolicy.Decision`. Allowed: ``reservation_id``
        names the reservation to confirm or release before ``expires_at``.
        Needs approval: ``requires_approval`` and ``approval_id``; the amount
        is held until the approval is decided or expires. A repeated
        ``idempotency_key`` with the same request returns the first decision
        (counted once); with a different request it raises
        :class:`~agentpolicy.errors.ConflictError` (``IDEMPOTENCY_CONFLICT``).
        """
        if not isinstance(request, PaymentRequest):
            raise PolicyValidationError.single("$", "must be a PaymentRequest")
        now = self._now()
        fresh = False
        for _ in range(_STALE_RETRIES):
            version, policy = self._current_policy(request.agent_id, fresh=fresh)
            assessment = assess(policy, request, now)
            outcome = self.storage.authorize(self._plan(assessment, version))
            if not outcome.stale:
                record = outcome.record
                assert record is not None  # noqa: S101 - set whenever not stale
                if record.approval_id is not None:
                    self._wake_webhooks()
                return self._decision(record, None if outcome.replayed else assessment)
            fresh = True  # another process changed the policy: read it again
        raise StorageUnavailableError("the policy changed during every attempt to authorize")

    def confirm(self, reservation_id: str) -> Reservation:
        """Turn a reservation into spending; confirming again reports it unchanged.

        Raises ``RESERVATION_NOT_FOUND``, ``RESERVATION_RELEASED`` or
        ``RESERVATION_EXPIRED`` (as :class:`~agentpolicy.PolicyError`).
        """
        raise_if(check_identifier(reservation_id, "$.reservationId"))
        return self.storage.confirm(reservation_id, self._now())

    def release(self, reservation_id: str) -> Reservation:
        """Give a reservation's budget back; releasing again, or after expiry, is a no-op.

        Raises ``RESERVATION_NOT_FOUND`` or ``RESERVATION_ALREADY_CONFIRMED``.
        """
        raise_if(check_identifier(reservation_id, "$.reservationId"))
        return self.storage.release(reservation_id, self._now())

    def get_reservation(self, reservation_id: str) -> Reservation:
        """A reservation by id (``RESERVATION_NOT_FOUND`` if there is none)."""
        raise_if(check_identifier(reservation_id, "$.reservationId"))
        r = self.storage.get_reservation(reservation_id, self._now())
        if r is None:
            raise NotFoundError(
                f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
            )
        return r

    def budget(self, agent_id: str, period: Period | str | None = None) -> Budget:
        """What the agent has spent, reserved and has left in each limited window now.

        With ``period``, only that window (reported even without a limit).
        Raises ``NO_POLICY`` for an agent without a policy.
        """
        raise_if(check_identifier(agent_id, "$.agentId"))
        wanted = None
        if period is not None:
            try:
                wanted = Period(period)
            except ValueError:
                raise PolicyValidationError.single(
                    "$.period", "must be one of hourly, daily, weekly, monthly"
                ) from None
        now = self._now()
        _, policy = self._current_policy(agent_id, fresh=True)
        if policy is None:
            raise NotFoundError(f"no policy is set for agent {agent_id}", code=ErrorCode.NO_POLICY)
        limits = policy.limits
        windows = [
            w
            for w in windows_for(policy, now)
            if (w.period is wanted)
            or (wanted is None and limits is not None and limits.for_period(w.period) is not None)
        ]
        counters = self.storage.usage(agent_id, [w.key for w in windows], now)
        periods: dict[Period, WindowBudget] = {}
        for w in windows:
            limit = limits.for_period(w.period) if limits else None
            c = counters.get(w.key)
            value_decimals = c.decimals if c else 0
            spent, reserved = (c.spent, c.reserved) if c else (0, 0)
            if limit is None:
                d = value_decimals
                symbol = policy.symbol or "USDT"
                periods[w.period] = WindowBudget(
                    w.period, w, None, Amount(spent, d, symbol), Amount(reserved, d, symbol), None
                )
                continue
            d = limit.decimals
            scale = max(d, value_decimals)
            left = max(
                0, limit.scaled_to(scale) - (spent + reserved) * 10 ** (scale - value_decimals)
            )
            periods[w.period] = WindowBudget(
                w.period,
                w,
                limit,
                Amount(_ceil_to(spent, value_decimals, d), d, limit.symbol),
                Amount(_ceil_to(reserved, value_decimals, d), d, limit.symbol),
                Amount(_floor_to(left, scale, d), d, limit.symbol),
            )
        return Budget(agent_id, now, periods)

    # -- approvals ----------------------------------------------------------------------

    def get_approval(self, approval_id: str) -> Approval:
        """An approval by id, with its expiry applied (``APPROVAL_NOT_FOUND`` if none)."""
        raise_if(check_identifier(approval_id, "$.approvalId"))
        approval = self.storage.get_approval(approval_id, self._now())
        if approval is None:
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        return approval

    def list_approvals(self, agent_id: str | None = None) -> list[Approval]:
        """Pending approvals, oldest first, of one agent or of every agent."""
        if agent_id is not None:
            raise_if(check_identifier(agent_id, "$.agentId"))
        return self.storage.list_approvals(agent_id, self._now())

    def decide(
        self, approval_id: str, approver: str, decision: str, comment: str | None = None
    ) -> Approval:
        """Submit an approver's ``"approve"`` or ``"deny"``; return the approval after it.

        One deny denies at once and gives the held budget back; enough
        approvals approve, and the approval then carries a ``reservation_id``
        whose TTL counts from now. Raises ``APPROVAL_NOT_FOUND``,
        ``APPROVAL_NOT_PENDING``, ``APPROVER_NOT_AUTHORIZED`` or
        ``DUPLICATE_DECISION``; nothing changes when it raises.
        """
        problems = check_identifier(approval_id, "$.approvalId")
        problems += check_identifier(approver, "$.approver")
        if decision not in DECISIONS:
            problems += PolicyValidationError.single(
                "$.decision", "must be 'approve' or 'deny'"
            ).problems
        if comment is not None:
            problems += check_text(comment, "$.comment")
        raise_if(problems)
        approval = self.storage.vote(
            approval_id, approver, decision, comment, self._now(), self.reservation_ttl
        )
        self._wake_webhooks()
        return approval

    # -- audit and housekeeping ---------------------------------------------------------

    def history(self, agent_id: str, limit: int = 100) -> list[HistoryRecord]:
        """The agent's decisions and state changes, newest first (at most ``limit``)."""
        raise_if(check_identifier(agent_id, "$.agentId"))
        if type(limit) is not int or not 1 <= limit <= 10_000:
            raise PolicyValidationError.single("$.limit", "must be an integer from 1 to 10000")
        return self.storage.history(agent_id, limit)

    def sweep(self) -> SweepResult:
        """Apply every due expiry now; return the reservations and approvals it expired."""
        result = self.storage.sweep(self._now())
        if result.approvals:
            self._wake_webhooks()
        return result

    # -- webhooks -----------------------------------------------------------------------------

    def _wake_webhooks(self) -> None:
        if self.webhooks is not None:
            self.webhooks.wake()

    def flush_webhooks(self, timeout: float = 10.0) -> bool:
        """Wait until the outbox is empty for this engine's endpoints, or ``timeout`` seconds.

        Returns whether it is empty (deliveries recorded as failed count as
        done). True at once when no endpoints are configured.
        """
        if self.webhooks is None:
            return True
        return self.webhooks.flush(timeout)

    def webhook_deliveries(self, status: str | None = None, limit: int = 100) -> list[Any]:
        """Deliveries in the outbox, newest first (``status``: pending, delivered, failed)."""
        if status is not None and status not in ("pending", "delivered", "failed"):
            raise PolicyValidationError.single("$.status", "must be pending, delivered or failed")
        listing = getattr(self.storage, "webhook_deliveries", None)
        if listing is None:
            return []
        result: list[Any] = listing(status, limit)
        return result

    def close(self) -> None:
        """Stop webhook delivery (what is pending stays in the outbox) and close the storage."""
        if self.webhooks is not None:
            self.webhooks.close()
        self.storage.close()

    def __enter__(self) -> PolicyEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
