"""PolicyEngine: turns pure decisions into a stateful guard over a storage.

An allowed payment holds its amount in a reservation until the agent
confirms or releases it (or it expires); a payment above an approval
threshold holds its amount while named humans decide. Every change runs as
one step of the ledger (:mod:`agentpolicy.ledger`), committed atomically by
the storage, so no number of processes sharing it can overspend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import attrs

from agentpolicy._checks import (
    check_identifier,
    check_int,
    check_person,
    check_record_id,
    check_text,
    raise_if,
)
from agentpolicy.amounts import Amount, scale_units
from agentpolicy.approvals import DECISIONS, VoteProof
from agentpolicy.codec import dump_policy, load_policy
from agentpolicy.decisions import Code, Decision
from agentpolicy.delivery import WebhookDispatcher
from agentpolicy.durations import MAX_DURATION
from agentpolicy.errors import (
    ConflictError,
    ErrorCode,
    InternalError,
    NotFoundError,
    PolicyError,
    PolicyValidationError,
    Problem,
)
from agentpolicy.guard import PaymentGuard
from agentpolicy.ledger import claims, keys, operations, recorded, rollout, trees
from agentpolicy.ledger.docs import (
    Body,
    Known,
    approval_record,
    delegation_record,
    history_record,
    request_of,
    reservation_record,
)
from agentpolicy.ledger.flows import UNREADABLE, Flow, Log, Read, Run, Scan, drive, unreadable
from agentpolicy.ledger.outbox import LedgerOutbox
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import MAX_SCORE, ClockBehindError, LedgerConfig
from agentpolicy.links import link_key
from agentpolicy.policy import MAX_TREE_DEPTH, AgentPolicy, SpendingLimits
from agentpolicy.records import (
    Approval,
    Budget,
    Delegation,
    HistoryRecord,
    LimitBudget,
    Reservation,
    SweepResult,
    WebhookDelivery,
    WindowBudget,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.rules import Assessment, assess, conclude, headroom, judge, windows_for
from agentpolicy.shadow import ShadowDifference, ShadowPolicy, ShadowReport, tally_pairs
from agentpolicy.signing import signature_problems
from agentpolicy.simulation import SimulationReport, replay
from agentpolicy.storage import Storage, open_storage
from agentpolicy.storage._time import instant, micros
from agentpolicy.versions import PolicyChange, PolicyVersion, diff_policies
from agentpolicy.voting import Voting
from agentpolicy.webhooks import WebhookEndpoint, to_endpoints
from agentpolicy.windows import Period, Window

__all__ = ["DEFAULT_RESERVATION_TTL", "PolicyEngine", "StoredPolicy"]

T = TypeVar("T")

DEFAULT_RESERVATION_TTL = timedelta(minutes=5)
"""How long an allowed payment's reservation waits for confirm or release."""

DEFAULT_COUNTER_GRACE = timedelta(hours=1)
"""How long counters of a window are kept after it ends (the clock skew tolerated)."""

_CLOCK_RETRIES = 3

_BEFORE_PLACED = 2**62
"""Taken from the sequence numbers of what an agent's own shard kept from before its placement."""
_HANDOFFS = 1_024  # requests kept for reservations not yet settled here


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


def _stored_policy(doc: Body, where: str) -> AgentPolicy:
    """A policy read back from the store; one that does not load is damaged stored data."""
    try:
        return load_policy(doc["policy"])
    except (PolicyValidationError, *UNREADABLE) as exc:
        raise unreadable(where, exc) from None


def _ceil_to(value: int, decimals: int, to: int) -> int:
    if decimals <= to:
        return scale_units(value, decimals, to)
    step = scale_units(1, to, decimals)
    return -(-value // step)


def _floor_to(value: int, decimals: int, to: int) -> int:
    if decimals <= to:
        return scale_units(value, decimals, to)
    return value // scale_units(1, to, decimals)


def _amounts(counter: Any, limit: Amount) -> tuple[Amount, Amount, Amount]:
    """Spent, reserved and remaining of a counter, in the limit's units, never overstating."""
    if counter is None:
        decimals, spent, reserved = 0, 0, 0
    elif isinstance(counter, list):
        decimals, spent, reserved = counter[1], counter[2], counter[3]
    else:
        decimals, spent, reserved = counter["d"], counter["s"], counter["r"]
    d = limit.decimals
    scale = max(d, decimals)
    left = max(0, limit.scaled_to(scale) - (spent + reserved) * 10 ** (scale - decimals))
    return (
        Amount(_ceil_to(spent, decimals, d), d, limit.symbol),
        Amount(_ceil_to(reserved, decimals, d), d, limit.symbol),
        Amount(_floor_to(left, scale, d), d, limit.symbol),
    )


def _split(counters: dict[str, Any], held: dict[str, tuple[int, int]] | None) -> dict[str, Any]:
    """A book's calendar counters as spent and reserved, for a budget.

    A calendar counter counts an amount from its reserve on; ``held`` is what
    the open reservations hold in each (``operations.refresh``): that much
    of its usage is reserved, the rest spent. Rolling counters are as kept.
    """
    split: dict[str, Any] = {}
    for key, c in counters.items():
        if not isinstance(c, list):
            split[key] = c
            continue
        d, used, reserved = c[1], c[2] + c[3], 0
        found = None if held is None else held.get(key)
        if found is not None:
            d = max(d, found[1])
            used = scale_units(used, c[1], d)
            reserved = min(scale_units(found[0], found[1], d), used)
        split[key] = [c[0], d, used - reserved, reserved, *c[4:]]
    return split


def _window_budget(w: Window, limit: Amount | None, counter: Any, symbol: str) -> WindowBudget:
    if limit is None:
        d, spent, reserved = (counter[1], counter[2], counter[3]) if counter else (0, 0, 0)
        return WindowBudget(
            w.period, w, None, Amount(spent, d, symbol), Amount(reserved, d, symbol), None
        )
    spent_amount, reserved_amount, remaining = _amounts(counter, limit)
    return WindowBudget(w.period, w, limit, spent_amount, reserved_amount, remaining)


def _limit_budgets(
    block: SpendingLimits,
    token: str,
    symbol: str | None,
    counters: dict[str, Any],
    windows: tuple[Window, ...],
    scope: str | None = None,
    group: str | None = None,
) -> list[LimitBudget]:
    """Every limit of one block of limits, read from the counters of one book.

    ``token`` is the key its counters are kept under; ``symbol`` the token whose
    payments it counts as the policy spells it (``None``: every token together).
    """
    out: list[LimitBudget] = []
    by_period = {w.period: w for w in windows}

    def calendar(period: Period) -> tuple[Any, Window]:
        w = by_period[period]
        return counters.get(f"{token}|{w.key}"), w

    def rolling(seconds: int) -> tuple[Any, datetime | None]:
        c = counters.get(f"{token}|roll:{seconds}")
        oldest = None if c is None else c.get("o")
        return c, None if oldest is None else instant(oldest + seconds * 1_000_000)

    for period, limit in block.windowed:
        c, w = calendar(period)
        spent, reserved, remaining = _amounts(c, limit)
        out.append(LimitBudget(
            "amount", period.value, scope, group, limit, spent, reserved, remaining,
            window_start=w.start, window_end=w.end,
            frees_at=w.end if spent.value or reserved.value else None, symbol=limit.symbol,
        ))  # fmt: skip
    for r in block.rolling:
        c, frees = rolling(r.seconds)
        spent, reserved, remaining = _amounts(c, r.amount)
        out.append(LimitBudget("amount", r.window, scope, group, r.amount, spent, reserved,
                               remaining, frees_at=frees, symbol=r.amount.symbol))  # fmt: skip
    for n in block.counts:
        if n.period is not None:
            c, w = calendar(n.period)
            count = 0 if c is None else (c[4] if len(c) > 4 else 0)
            out.append(LimitBudget(
                "count", n.window, scope, group, max_count=n.max, count=count,
                remaining_count=max(0, n.max - count), window_start=w.start, window_end=w.end,
                frees_at=w.end if count else None, symbol=symbol,
            ))  # fmt: skip
        else:
            c, frees = rolling(n.seconds or 0)
            count = 0 if c is None else c["n"]
            out.append(LimitBudget(
                "count", n.window, scope, group, max_count=n.max, count=count,
                remaining_count=max(0, n.max - count), frees_at=frees, symbol=symbol,
            ))  # fmt: skip
    return out


def _duration(value: object, path: str, *, positive: bool = True) -> int:
    if not isinstance(value, timedelta) or (positive and value <= timedelta(0)):
        raise PolicyValidationError.single(path, "must be a positive duration")
    return value // timedelta(microseconds=1)


def _seconds_problems(value: object, path: str) -> list[Problem]:
    """A positive, finite number of seconds of at most a day (a webhook retry's delay)."""
    if type(value) not in (int, float) or not 0 < value <= 86_400:  # type: ignore[operator]
        return [Problem(path, "must be a number of seconds above 0 and at most 86400")]
    return []


class PolicyEngine(Voting):
    """The stateful guard: policies, reservations, approvals and history over a storage.

    ``storage`` is a :class:`~agentpolicy.storage.Storage`, a URL for
    :func:`~agentpolicy.open_storage`, or ``None`` for a fresh in-memory
    storage. ``clock`` returns the current time as an aware datetime (default:
    the real UTC clock); it is the only clock the engine reads.

    ``webhook_endpoints`` (objects or dicts, see
    :func:`agentpolicy.webhooks.to_endpoints`) turn on signed approval events:
    they are written to the storage's outbox in the same commit as the
    change and delivered by a background thread; ``webhook_backoff`` and
    ``webhook_backoff_cap`` (seconds, real time) shape its retries.

    ``history_retention`` keeps history records for that long (``None``: for
    ever; default: the storage's own default, see ``docs/storage.md``);
    denied decisions are kept apart, at most ``max_denials`` per agent, so a
    flood of them never evicts a state change. ``counter_grace`` is how long
    a window's counters outlive the window: an engine whose clock is further
    behind than that is refused (``STORAGE_UNAVAILABLE``) rather than
    checked against a window whose usage is gone.

    ``link_secret`` (at least 32 characters; keep it out of the store) turns
    on one-time approval links: ``approval.created`` events carry them and
    :meth:`redeem_link` casts their votes. The approver registry, signed
    votes and links are described in ``docs/approvals.md``.

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
        history_retention: timedelta | str | None = "default",
        max_denials: int = 10_000,
        counter_grace: timedelta = DEFAULT_COUNTER_GRACE,
        link_secret: str | None = None,
    ) -> None:
        self._link_key = None if link_secret is None else link_key(link_secret)
        self._store: str | None = None
        ttl = _duration(reservation_ttl, "$.reservationTtl")
        grace = _duration(counter_grace, "$.counterGrace")
        raise_if(check_int(max_denials, "$.maxDenials", 1, 10_000_000))
        raise_if(_seconds_problems(webhook_backoff, "$.webhookBackoff")
                 + _seconds_problems(webhook_backoff_cap, "$.webhookBackoffCap"))  # fmt: skip
        endpoints = to_endpoints(webhook_endpoints)
        if storage is None:
            storage = "memory://"
        if isinstance(storage, str):
            storage = open_storage(storage)
        elif not isinstance(storage, Storage):
            raise PolicyValidationError.single(
                "$.storage", "must be a Storage, a storage URL such as 'memory://', or None"
            )
        self.storage: Storage = storage
        if history_retention == "default":
            retention = storage.default_history_retention
        elif history_retention is None:
            retention = None
        else:
            retention = _duration(history_retention, "$.historyRetention")
        self.clock: Callable[[], datetime] = clock or utc_now
        self.reservation_ttl = reservation_ttl
        self.config = LedgerConfig(
            reservation_ttl=ttl,
            counter_grace=grace,
            history_retention=retention,
            max_denials=max_denials,
            routes=tuple((e.id, e.events) for e in endpoints),
        )
        self._policies: dict[tuple[str, int], AgentPolicy] = {}
        self._shadows: dict[tuple[str, str], AgentPolicy] = {}
        self._homes: dict[str, str] = {}
        # agents placed in a tree: when the newest key their own shard keeps was used (or None)
        self._behind: dict[str, int | None] = {}
        # reservation id -> (its stored request, the request it was authorized for, instants
        # held as datetimes): confirm and release report them instead of rebuilding them
        self._requests: dict[str, Known] = {}
        self._policies_lock = threading.Lock()
        self.outbox = LedgerOutbox(self.storage, self._now_us, self._shard_now)
        self.webhooks: WebhookDispatcher | None = None
        if endpoints:
            self.webhooks = WebhookDispatcher(
                self.outbox,
                endpoints,
                backoff=webhook_backoff,
                backoff_cap=webhook_backoff_cap,
                housekeeping=self.sweep,
                enrich=None if self._link_key is None else self._with_links,
            )
            self.webhooks.start()

    # -- plumbing ---------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self.clock()
        if type(now) is datetime and now.tzinfo is UTC:
            return now
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise InternalError("the engine's clock must return a timezone-aware datetime")
        return now

    def _now_us(self) -> int:
        return micros(self._now())

    def _drive(self, flow: Flow[T]) -> T:
        """Run one of the engine's flows on its (sync) store."""
        return drive(self.storage, flow)

    def _shard_now(self, agent_id: str) -> str:
        """:meth:`_shard`, driven at once (for the webhook worker)."""
        return self._drive(self._shard(agent_id))

    def _shard(self, agent_id: str) -> Flow[str]:
        """The shard (unit of atomicity) of an agent's state: its own, or its tree's.

        An agent set up below a parent lives in the parent's tree, as a
        document in its own shard records (written once, so it is cached for
        good); an agent with a policy in its own shard lives there for good.
        """
        found = self._homes.get(agent_id)
        if found is not None:
            return found
        pointer, head = yield Read(agent_id, [keys.home(agent_id), keys.head(agent_id)])
        placed = trees.placed_in(pointer)
        if placed is not None:
            found = placed
        elif head is not None and head["pv"] > 0:
            found = agent_id
        else:
            return agent_id  # no policy yet: it may still be placed in a tree
        with self._policies_lock:
            if len(self._homes) > 100_000:
                self._homes.clear()
            self._homes[agent_id] = found
        return found

    def _shard_of_id(self, some_id: str) -> Flow[str]:
        agent = keys.agent_of_id(some_id)
        if agent is None:
            return ""
        return (yield from self._shard(agent))

    def _policy(self, agent_id: str, version: int, view: View) -> AgentPolicy | None:
        """The agent's policy at ``version`` (``None`` for 0), parsed once per process."""
        if version == 0:
            return None
        found = self._policies.get((agent_id, version))
        if found is not None:
            return found
        return self._parsed(agent_id, version, view.doc(keys.policy(agent_id, version)))

    def _parsed(self, agent_id: str, version: int, doc: Body | None) -> AgentPolicy:
        """A stored policy version, parsed and kept."""
        if doc is None:
            raise InternalError(f"policy version {version} of {agent_id} is missing")
        policy = _stored_policy(doc, f"of policy version {version} of agent {agent_id!r}")
        with self._policies_lock:
            if len(self._policies) > 10_000:
                self._policies.clear()
            self._policies[(agent_id, version)] = policy
        return policy

    def _load_policy(self, agent_id: str, version: int) -> Flow[AgentPolicy | None]:
        """:meth:`_policy`, reading the version from the store when this process has not."""
        if version == 0:
            return None
        found = self._policies.get((agent_id, version))
        if found is not None:
            return found
        shard = yield from self._shard(agent_id)
        (doc,) = yield Read(shard, [keys.policy(agent_id, version)])
        return self._parsed(agent_id, version, doc)

    def _expire(self, agent_id: str, now: datetime) -> Flow[Body]:
        """Apply every due expiry of the agent, a batch a step; return what they expired."""
        shard = yield from self._shard(agent_id)
        expired: list[Any] = []
        lapsed: list[Any] = []
        while True:
            step = operations.expire(self.config, shard, agent_id, now)
            result: Body = yield Run(shard, step, at=micros(now), write=False)
            expired += result["expired"]
            lapsed += result["lapsed"]
            if not result["more"]:
                break
        if lapsed:
            self._wake_webhooks()
        return {**result, "expired": expired, "lapsed": lapsed}

    # -- policies -----------------------------------------------------------------------

    def set_policy(self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]) -> int:
        """Store a policy for ``agent_id`` and return its new version (1, 2, ...).

        ``policy`` is an :class:`~agentpolicy.AgentPolicy` or its JSON form;
        invalid input raises :class:`~agentpolicy.PolicyValidationError`
        with paths below ``$.policy`` and stores nothing.
        """
        return self._drive(self._set_policy(agent_id, policy))

    def _set_policy(self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]) -> Flow[int]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        if not isinstance(policy, AgentPolicy):
            try:
                policy = load_policy(policy)
            except PolicyValidationError as err:
                raise err.under("$.policy") from None
        return (yield from self._put_policy(agent_id, policy))

    def _put_policy(
        self,
        agent_id: str,
        policy: AgentPolicy,
        grant: trees.Grant | None = None,
        origin: dict[str, Any] | None = None,
    ) -> Flow[int]:
        now = self._now()
        data = dump_policy(policy)

        def step(shard: str, check_only: bool = False) -> operations.Step:
            return trees.put_policy(
                self.config, agent_id, policy, data, now, self._policy, grant,
                shard=shard, check_only=check_only, origin=origin,
            )  # fmt: skip

        shard = yield from self._place(
            agent_id,
            policy.parent,
            lambda tree: step(tree, check_only=True),
            None if grant is None else grant.parent,
        )
        try:
            version: int = yield Run(shard, step(shard), at=micros(now))
        except trees.RelocatedError as moved:  # placed in a tree by another caller meanwhile
            with self._policies_lock:
                self._homes[agent_id] = shard = moved.shard
            version = yield Run(shard, step(shard), at=micros(now))
        with self._policies_lock:
            self._policies[(agent_id, version)] = policy
            self._homes[agent_id] = shard  # it has a policy there now: it lives there for good
        return version

    def _place(
        self,
        agent_id: str,
        parent: str | None,
        check: Callable[[str], operations.Step],
        delegated_by: str | None = None,
    ) -> Flow[str]:
        """The shard the agent's policy goes to: with a parent, the parent's tree.

        Placing an agent in a tree is written once and for good, so the
        policy's checks run first (in the tree, writing nothing): a policy
        refused for its parent leaves the agent where it was.
        ``delegated_by`` is the parent of a delegation being made.
        """
        shard = yield from self._shard(agent_id)
        if parent is None:
            return shard
        tree = yield from self._shard(parent)
        if shard == tree:
            return shard
        now = self._now()
        yield Run(tree, check(tree), at=micros(now), write=False)
        placed: str = yield Run(agent_id, trees.place(agent_id, tree), at=micros(now))
        if placed == agent_id and delegated_by is not None:  # a budget of its own, kept there
            raise ConflictError(  # as the check says where the tree can see the agent's head
                f"agent {agent_id} already has a budget that {delegated_by} did not delegate",
                code=ErrorCode.BUDGET_CONFLICT,
            )
        if placed != tree:
            raise ConflictError(
                f"the budget of {agent_id} is kept with another tree than {parent}'s; "
                "a budget cannot move between trees (set up the agent under a new id, "
                "or choose a parent in its tree)",
                code=ErrorCode.BUDGET_CONFLICT,
            )
        with self._policies_lock:
            self._homes[agent_id] = tree
        return tree

    # -- shared budgets and delegation ---------------------------------------------------

    def delegate(
        self,
        parent_id: str,
        child_id: str,
        policy: AgentPolicy | Mapping[str, Any],
        *,
        expires_at: datetime | None = None,
        by_parent: bool = False,
    ) -> Delegation:
        """Create (or update) a budget for ``child_id`` under ``parent_id``'s own budget.

        The child's payments must pass its own policy and every budget above
        it, and count in all of them, so a child can never spend more than
        its parent has left. Its limits may not exceed the parent's (same
        kind, window and token: ``INVALID_INPUT``), it ends at ``expires_at``
        (never after its parent's own delegation) and can be revoked
        (:meth:`revoke`). ``by_parent=True`` when the parent agent itself
        asks: its policy must allow it (``"delegation": {"allowed": true}``),
        no budget above may be deeper than its ``maxDepth`` allows, and agents
        may delegate at most ``maxChildren`` budgets (and ten versions per
        one) below it (``FORBIDDEN``); the policy may be at most
        :data:`~agentpolicy.policy.MAX_DELEGATED_POLICY_BYTES` of JSON
        (``INVALID_INPUT``). ``child_id`` must be new, or a budget this parent
        delegated before (``BUDGET_CONFLICT``). Returns the delegation.
        """
        return self._drive(
            self._delegate(parent_id, child_id, policy, expires_at=expires_at, by_parent=by_parent)
        )

    def _delegate(
        self,
        parent_id: str,
        child_id: str,
        policy: AgentPolicy | Mapping[str, Any],
        *,
        expires_at: datetime | None = None,
        by_parent: bool = False,
    ) -> Flow[Delegation]:
        problems = check_identifier(parent_id, "$.parentId")
        problems += check_identifier(child_id, "$.agentId")
        if expires_at is not None and (
            not isinstance(expires_at, datetime) or expires_at.utcoffset() is None
        ):
            problems += PolicyValidationError.single(
                "$.expiresAt", "must be a timezone-aware datetime"
            ).problems
        raise_if(problems)
        if not isinstance(policy, AgentPolicy):
            try:
                policy = load_policy(policy)
            except PolicyValidationError as err:
                raise err.under("$.policy") from None
        if policy.parent not in (None, parent_id):
            raise PolicyValidationError.single(
                "$.policy.parent", f"a budget delegated by {parent_id} has it as parent"
            )
        policy = attrs.evolve(policy, parent=parent_id)
        expires = None if expires_at is None else micros(expires_at)
        yield from self._put_policy(child_id, policy, trees.Grant(parent_id, expires, by_parent))
        found = yield from self._delegation(child_id)
        assert found is not None  # noqa: S101 - just written
        return found

    def delegation(self, agent_id: str) -> Delegation | None:
        """How the agent's budget was delegated, or ``None`` if it was not."""
        return self._drive(self._delegation(agent_id))

    def _delegation(self, agent_id: str) -> Flow[Delegation | None]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        shard = yield from self._shard(agent_id)
        (head,) = yield Read(shard, [keys.head(agent_id)])
        return delegation_record(agent_id, head)

    def revoke(self, agent_id: str, *, by: str | None = None) -> Delegation:
        """Revoke a delegated budget: it and every budget below it stop allowing payments.

        Their held approvals expire in the same step; reservations already
        handed out (payments under way) count until confirmed or expired.
        ``by`` (when given) must be a budget above it, else ``FORBIDDEN``.
        Revoking again changes nothing. Raises ``NO_POLICY`` or
        ``DELEGATION_NOT_FOUND`` for a budget that was not delegated.
        Returns the delegation, with ``revoked_at``.
        """
        return self._drive(self._revoke(agent_id, by=by))

    def _revoke(self, agent_id: str, *, by: str | None = None) -> Flow[Delegation]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        if by is not None:
            raise_if(check_identifier(by, "$.by"))
        now = self._now()
        shard = yield from self._shard(agent_id)
        step = trees.revoke(self.config, shard, agent_id, by, now, self._policy)
        result: Body = yield Run(shard, step, at=micros(now))
        if result["lapsed"]:
            self._wake_webhooks()
        found = delegation_record(agent_id, result["head"])
        assert found is not None  # noqa: S101 - revoke refuses an undelegated budget
        return found

    def _stored(self, agent_id: str, version: int | None = None) -> Flow[StoredPolicy | None]:
        shard = yield from self._shard(agent_id)
        if version is None:
            (head,) = yield Read(shard, [keys.head(agent_id)])
            version = 0 if head is None else head["pv"]
            if not version:
                return None
        (doc,) = yield Read(shard, [keys.policy(agent_id, version)])
        if doc is None:
            return None
        policy = self._policies.get((agent_id, version)) or self._parsed(agent_id, version, doc)
        return StoredPolicy(agent_id, policy, version, instant(doc["at"]))

    def get_policy(self, agent_id: str) -> StoredPolicy | None:
        """The agent's current policy and version, or ``None``."""
        return self._drive(self._get_policy(agent_id))

    def _get_policy(self, agent_id: str) -> Flow[StoredPolicy | None]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        return (yield from self._stored(agent_id))

    def list_policies(self, org_id: str | None = None) -> list[StoredPolicy]:
        """Every stored policy, or those of agents whose id starts with ``"{org_id}:"``."""
        return self._drive(self._list_policies(org_id))

    def _list_policies(self, org_id: str | None = None) -> Flow[list[StoredPolicy]]:
        if org_id is not None:
            raise_if(check_identifier(org_id, "$.orgId"))
        prefix = None if org_id is None else f"{org_id}:"
        members = yield Scan("@", keys.AGENTS, MAX_SCORE, 10_000_000)
        agents = sorted(m for m, _ in members)
        found = []
        for agent in agents:
            if prefix is None or agent.startswith(prefix):
                stored = yield from self._stored(agent)
                if stored is not None:
                    found.append(stored)
        return found

    # -- payments -----------------------------------------------------------------------

    def _assessment(
        self, rec: Body, request: PaymentRequest, *, chain: bool = True
    ) -> Flow[Assessment]:
        """The assessment a stored decision record was made with (``chain``: with its ancestors)."""
        grants = rec.get("dg", {})
        agent = request.agent_id
        ancestors = []
        for who, pv in rec.get("up", ()) if chain else ():
            above = yield from self._load_policy(who, pv)
            ancestors.append((who, above, delegation_record(who, {"dg": grants.get(who)})))
        policy = yield from self._load_policy(agent, rec["pv"])
        return assess(
            policy,
            request,
            instant(rec["at"]),
            grant=delegation_record(agent, {"dg": grants.get(agent)}),
            ancestors=ancestors,
        )

    def _key_before(self, request: PaymentRequest, shard: str) -> Flow[Body | None]:
        """The entry of the request's key kept from before the agent was placed in ``shard``.

        An agent with no policy is decided in its own shard, which keeps the
        idempotency keys of those decisions; once the agent is placed in a
        tree (``shard``), its own shard changes no more, so the authorize
        step in the tree answers with an entry found there when the tree has
        none of its own (:func:`operations.authorize`, ``before``). When the
        newest such key was used is read once per agent and process: no key
        is read once it is older than the idempotency window.
        """
        agent, key = request.agent_id, request.idempotency_key
        if shard == agent or key is None:
            return None
        if agent in self._behind:
            last = self._behind[agent]
        else:
            (pointer,) = yield Read(agent, [keys.home(agent)])
            last = trees.last_key_at(pointer)
            if last is not None and not (yield from self._apart(agent, shard)):
                last = None  # the tree's shard reads the same keys
            if trees.placed_in(pointer) is not None:  # else not placed yet: ask again later
                with self._policies_lock:
                    if len(self._behind) > 100_000:
                        self._behind.clear()
                    self._behind[agent] = last
        if last is None or self._now_us() - last >= self.config.idempotency_ttl:
            return None
        (entry,) = yield Read(agent, [keys.idempotency(agent, key)])
        found: Body | None = entry
        return found

    def _apart(self, agent: str, shard: str) -> Flow[bool]:
        """Whether the tree's ``shard`` does not see what the agent's own shard keeps.

        On memory and Redis a shard holds its own documents and logs; SQLite
        and PostgreSQL keep one namespace, where the tree's shard reads the
        agent's pointer (kept in its own shard) as its own shard does.
        """
        (seen,) = yield Read(shard, [keys.home(agent)])
        return seen is None

    def _replayed(self, rec: Body, request: PaymentRequest) -> Flow[Decision]:
        """The decision a stored record was made with, rebuilt from its policy version."""
        version = rec["pv"]
        at = instant(rec["at"])
        assessment = yield from self._assessment(rec, request)
        expires = rec.get("x")
        decision = conclude(
            assessment,
            rec["use"],
            reservation_id=rec.get("rid"),
            approval_id=rec.get("aid"),
            expires_at=None if expires is None else instant(expires),
            policy_version=version or None,
            decided_at=at,
        )
        if decision.code != rec["code"]:
            raise InternalError(
                f"the ledger decided {rec['code']} but the policy gives {decision.code}"
            )
        return decision

    def authorize(
        self,
        request: PaymentRequest,
        *,
        dry_run: bool = False,
        requested_by: str | None = None,
        holder: str | None = None,
    ) -> Decision:
        """Decide a payment; hold its amount when it is allowed or needs approval.

        Returns a :class:`~agentpolicy.Decision`. Allowed: ``reservation_id``
        names the reservation to confirm or release before ``expires_at``.
        Needs approval: ``requires_approval`` and ``approval_id``; the amount
        is held until the approval is decided or expires. A repeated
        ``idempotency_key`` with the same request returns the first decision
        (counted once); with a different request it raises
        :class:`~agentpolicy.errors.ConflictError` (``IDEMPOTENCY_CONFLICT``).

        ``dry_run=True`` decides exactly as authorize would at this instant
        and writes nothing: no reservation, hold, history, event or
        idempotency entry. The decision has ``dry_run`` set, no ids, and
        ``headroom``: every limit the payment counts against (the agent's
        and every budget's above it) with what it would leave there. A
        request whose idempotency key was used before answers that first
        decision, as authorize would (and, counting nothing, no headroom).

        ``requested_by`` names an operator asking on the agent's behalf: it
        is recorded with the decision and its approval, and neither it nor the
        agent may vote on that approval.

        ``holder`` claims the reservation of an allowed payment as it is made
        (as :meth:`claim` would, in the same atomic step): while it is open,
        only ``confirm``/``release`` with that ``holder`` settle it. The
        payment guard and the x402 guard pass their own, so nobody else (the
        governed agent's own tools included) can release a payment they are
        making.
        """
        return self._drive(
            self._authorize(request, dry_run=dry_run, requested_by=requested_by, holder=holder)
        )

    def _authorize(
        self,
        request: PaymentRequest,
        *,
        dry_run: bool = False,
        requested_by: str | None = None,
        holder: str | None = None,
    ) -> Flow[Decision]:
        if not isinstance(request, PaymentRequest):
            raise PolicyValidationError.single("$", "must be a PaymentRequest")
        if type(dry_run) is not bool:
            raise PolicyValidationError.single("$.dryRun", "must be true or false")
        if requested_by is not None:
            raise_if(check_identifier(requested_by, "$.requestedBy"))
        if holder is not None:
            raise_if(check_identifier(holder, "$.holder"))
        if dry_run:
            return (yield from self._dry_run(request))
        agent = request.agent_id  # a known agent's shard is found without starting a flow
        shard = self._homes.get(agent) or (yield from self._shard(agent))
        before = None if shard == agent else (yield from self._key_before(request, shard))
        attempt = 0
        while attempt < _CLOCK_RETRIES:
            now = self._now()
            seen: list[Decision] = []
            step = operations.authorize(
                self.config,
                shard,
                request,
                now,
                self._policy,
                seen,
                shadows=self._shadow,
                requested_by=requested_by,
                holder=holder,
                before=before,
            )
            try:
                result: Body = yield Run(shard, step, at=micros(now))
            except ClockBehindError:
                attempt += 1
                if attempt == _CLOCK_RETRIES:
                    raise
                continue
            except trees.RelocatedError as moved:  # placed in a tree by another caller meanwhile
                with self._policies_lock:
                    self._homes[agent] = shard = moved.shard
                before = yield from self._key_before(request, shard)
                continue
            if "more" in result:  # a batch of due expiries was committed: decide after the rest
                continue
            rec = result["rec"]
            if result.get("replayed") or not seen or seen[-1].code != rec["code"]:
                return (yield from self._replayed(rec, request))  # an earlier decision again
            if "aid" in rec:
                self._wake_webhooks()
            elif "rid" in rec and type(request) is PaymentRequest:
                if len(self._requests) >= _HANDOFFS:
                    self._requests.clear()  # reservations never settled here: start again
                expires = seen[-1].expires_at
                instants = {} if expires is None else {rec["x"]: expires}
                if now.tzinfo is UTC:  # as the ledger's instants read back
                    instants[rec["at"]] = now
                self._requests[rec["rid"]] = (rec["req"], request, instants)
            return seen[-1]
        raise InternalError("unreachable")  # pragma: no cover

    def _dry_run(self, request: PaymentRequest) -> Flow[Decision]:
        """The authorize step on a transaction that is never committed (a reading session)."""
        shard = yield from self._shard(request.agent_id)
        before = yield from self._key_before(request, shard)
        attempt = 0
        while attempt < _CLOCK_RETRIES:
            now = self._now()
            step = operations.authorize(self.config, shard, request, now, self._policy, [],
                                        before=before, batches=False)  # fmt: skip
            try:
                result: Body = yield Run(shard, rollout.dry_run(step), at=micros(now), write=False)
            except ClockBehindError:
                attempt += 1
                if attempt == _CLOCK_RETRIES:
                    raise
                continue
            except trees.RelocatedError as moved:  # placed in a tree meanwhile: decide there
                shard = moved.shard
                before = yield from self._key_before(request, shard)
                continue
            for agent in result.get("more", ()):  # due expiries past one batch: as a read does
                yield from self._expire(agent, now)
            if "more" in result:
                result = yield Run(shard, rollout.dry_run(step), at=micros(now), write=False)
            rec = result["rec"]
            if result.get("replayed"):
                first = yield from self._replayed(rec, request)
                return attrs.evolve(first, dry_run=True)
            assessment = yield from self._assessment(rec, request)
            decision = conclude(assessment, rec["use"], policy_version=rec["pv"] or None,
                                decided_at=now)  # fmt: skip
            if decision.code != rec["code"]:
                raise InternalError(
                    f"the ledger decided {rec['code']} but the policy gives {decision.code}"
                )
            return attrs.evolve(decision, dry_run=True, headroom=headroom(assessment, rec["use"]))
        raise InternalError("unreachable")  # pragma: no cover

    def _shadow(self, agent_id: str, doc: Body) -> AgentPolicy:
        """An agent's shadow policy from its document, parsed once per process."""
        key = (agent_id, doc["id"])
        found = self._shadows.get(key)
        if found is None:
            found = _stored_policy(doc, f"of the shadow policy of agent {agent_id!r}")
            with self._policies_lock:
                if len(self._shadows) > 10_000:
                    self._shadows.clear()
                self._shadows[key] = found
        return found

    def confirm(self, reservation_id: str, *, holder: str | None = None) -> Reservation:
        """Turn a reservation into spending; confirming again reports it unchanged.

        Raises ``RESERVATION_NOT_FOUND``, ``RESERVATION_RELEASED`` or
        ``RESERVATION_EXPIRED`` (as :class:`~agentpolicy.PolicyError`); and
        ``RESERVATION_CLAIMED`` for a reservation another caller claimed
        (:meth:`claim`) unless ``holder`` is that caller.
        """
        return self._drive(self._settle(reservation_id, "confirm", holder))

    def release(self, reservation_id: str, *, holder: str | None = None) -> Reservation:
        """Give a reservation's budget back; releasing again, or after expiry, is a no-op.

        Raises ``RESERVATION_NOT_FOUND`` or ``RESERVATION_ALREADY_CONFIRMED``;
        ``RESERVATION_CLAIMED`` as :meth:`confirm` does.
        """
        return self._drive(self._settle(reservation_id, "release", holder))

    def payment(self, request: PaymentRequest, approval_id: str | None = None) -> PaymentGuard:
        """``with engine.payment(request) as p:`` runs the block only for an allowed payment.

        Entering authorizes (raising :class:`~agentpolicy.PaymentDenied` or
        :class:`~agentpolicy.ApprovalRequired`); with ``approval_id`` it
        resumes an approved approval on its reservation. Leaving the block
        confirms; an exception in it releases (and goes on). See
        :class:`~agentpolicy.guard.PaymentGuard` and docs/engine.md.
        """
        return PaymentGuard(self, request, approval_id)

    def _settle(
        self,
        reservation_id: str,
        action: str,
        holder: str | None = None,
        *,
        keep_sent: bool = False,
    ) -> Flow[Reservation]:
        problems = check_record_id(reservation_id, "$.reservationId")
        if holder is not None:
            problems += check_identifier(holder, "$.holder")
        raise_if(problems)
        now = self._now()
        agent = keys.agent_of_id(reservation_id)
        step = operations.settle(
            self.config, reservation_id, action, now, holder, agent, keep_sent=keep_sent
        )
        # a known agent's shard is found without starting a flow (the payment path)
        shard = "" if agent is None else self._homes.get(agent) or (yield from self._shard(agent))
        at = micros(now)
        result: Body = yield Run(shard, step, at=at)
        known = self._requests.pop(reservation_id, None)
        if known is not None and now.tzinfo is UTC:
            known[2][at] = now
        return reservation_record(reservation_id, result["doc"], known)

    def claim(self, reservation_id: str, holder: str) -> Reservation:
        """Take the right to make a reservation's payment, for ``holder`` alone.

        A reservation id can reach more than one caller (a repeated
        idempotency key answers the first decision again; anyone may resume
        an approved approval): whoever is about to pay claims it first, and
        of two claimants exactly one succeeds, in any number of processes.
        Claiming again as the same ``holder`` (an opaque id of the caller)
        changes nothing. Raises ``RESERVATION_CLAIMED`` (another holder has
        it), ``RESERVATION_NOT_FOUND``, ``RESERVATION_ALREADY_CONFIRMED``,
        ``RESERVATION_RELEASED`` or ``RESERVATION_EXPIRED``. The payment
        guard (:meth:`payment`) claims for you. Returns the reservation.
        """
        return self._drive(self._claim(reservation_id, holder))

    def _claim(self, reservation_id: str, holder: str) -> Flow[Reservation]:
        return self._by_holder(claims.claim, reservation_id, holder)

    def mark_sent(self, reservation_id: str, *, holder: str | None = None) -> Reservation:
        """Say that a reservation's payment is leaving now: unsettled, it expires as spent.

        Call it just before the payment is sent (a signed payload handed to
        the network, a transfer submitted). From then on the payee may be
        paid whether or not an answer comes back, so if nobody confirms or
        releases the reservation before its TTL, it counts as spent when it
        expires (history event ``expire`` with a ``detail`` that says so),
        not given back. Confirm and release work as before. Marking again
        changes nothing. Raises as :meth:`claim` does (``holder`` must be the
        caller that claimed it, if any). Returns the reservation, with its
        ``sent_at``.
        """
        return self._drive(self._mark_sent(reservation_id, holder))

    def _mark_sent(self, reservation_id: str, holder: str | None) -> Flow[Reservation]:
        return self._by_holder(claims.mark_sent, reservation_id, holder)

    def _by_holder(
        self, make: Callable[..., operations.Step], reservation_id: str, holder: str | None
    ) -> Flow[Reservation]:
        """Run ``make(config, reservation_id, holder, now)``'s step on the reservation's shard."""
        problems = check_record_id(reservation_id, "$.reservationId")
        if holder is not None:
            problems += check_identifier(holder, "$.holder")
        raise_if(problems)
        now = self._now()
        shard = yield from self._shard_of_id(reservation_id)
        result: Body = yield Run(
            shard, make(self.config, reservation_id, holder, now), at=micros(now)
        )
        return reservation_record(reservation_id, result["doc"])

    def get_reservation(self, reservation_id: str) -> Reservation:
        """A reservation by id (``RESERVATION_NOT_FOUND`` if there is none)."""
        return self._drive(self._get_reservation(reservation_id))

    def _get_reservation(self, reservation_id: str) -> Flow[Reservation]:
        raise_if(check_record_id(reservation_id, "$.reservationId"))
        now = self._now()
        shard = yield from self._shard_of_id(reservation_id)
        name = keys.reservation(reservation_id)
        (doc,) = yield Read(shard, [name])
        if doc is not None and doc["st"] in ("held", "reserved") and micros(now) >= doc["x"]:
            yield from self._expire(doc["agent"], now)
            (doc,) = yield Read(shard, [name])
        if doc is None:
            raise NotFoundError(
                f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
            )
        return reservation_record(reservation_id, doc)

    def budget(self, agent_id: str, period: Period | str | None = None) -> Budget:
        """What the agent has spent, reserved and has left under every limit now.

        ``periods`` has the calendar windows of the policy's main token that
        it limits (with ``period``, only that window, reported even without a
        limit); ``limits`` has every limit of every kind: calendar, rolling
        and count limits of every token, and of every scope and group.
        ``ancestors`` has the budgets above the agent (its parent first),
        each with its own windows and limits: a payment must fit every one.
        Raises ``NO_POLICY`` for an agent without a policy.
        """
        return self._drive(self._budget(agent_id, period))

    def _budget(self, agent_id: str, period: Period | str | None = None) -> Flow[Budget]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        wanted = None
        if period is not None:
            try:
                wanted = Period(period)
            except ValueError:
                names = ", ".join(p.value for p in Period)
                raise PolicyValidationError.single("$.period", f"must be one of {names}") from None
        now = self._now()
        own, policy = yield from self._budget_of(agent_id, now, wanted)
        ancestors: list[Budget] = []
        parent = policy.parent
        while parent is not None and len(ancestors) < MAX_TREE_DEPTH - 1:
            found, above = yield from self._budget_of(parent, now, None)
            ancestors.append(found)
            parent = above.parent
        return attrs.evolve(own, ancestors=tuple(ancestors))

    def _budget_of(
        self, agent_id: str, now: datetime, wanted: Period | None
    ) -> Flow[tuple[Budget, AgentPolicy]]:
        """One budget's own windows and limits (no ancestors), with its policy."""
        shard = yield from self._shard(agent_id)
        (head,) = yield Read(shard, [keys.head(agent_id)])
        policy = yield from self._load_policy(agent_id, 0 if head is None else head["pv"])
        if policy is None:
            raise NotFoundError(f"no policy is set for agent {agent_id}", code=ErrorCode.NO_POLICY)
        # each block with the token its counters are kept under (an asset's block of counts
        # alone counts that asset's payments; the top-level one, every token's)
        blocks = [(b.token, b.symbol, b) for b in (policy.limits,) if b is not None]
        blocks += [(a.symbol.casefold(), a.symbol, a.limits) for a in policy.assets]
        rolling = [(f"{t}|roll:{sec}", sec) for t, _, b in blocks for sec in b.rolling_seconds]
        scopes = {sc.name: [(f"{sc.token}|roll:{sec}", sec) for sec in sc.limits.rolling_seconds]
                  for sc in policy.scoped_limits}  # fmt: skip
        windows = windows_for(policy, now)
        in_force = windows
        if head is not None and "sh" in head:  # its shadow's counters are kept too
            doc = yield from self._shadow_doc(agent_id)
            if doc is not None:
                in_force += windows_for(self._shadow(agent_id, doc), now)
        read_under = (0, None) if head is None else (head["pv"], head.get("sh"))
        step = operations.refresh(self.config, shard, agent_id, now, rolling, scopes, in_force,
                                  read_under)  # fmt: skip
        result = yield from self._refreshed(shard, agent_id, step, micros(now))
        books, held = result["books"], result["open"]
        counters = _split(books[keys.head(agent_id)]["c"], held.get(keys.head(agent_id)))
        token = (policy.symbol or "USDT").casefold()
        periods: dict[Period, WindowBudget] = {}
        for w in windows:
            limit = policy.limits.for_period(w.period) if policy.limits else None
            if w.period is wanted or (wanted is None and limit is not None):
                periods[w.period] = _window_budget(
                    w, limit, counters.get(f"{token}|{w.key}"), policy.symbol or "USDT"
                )
        limits: list[LimitBudget] = []
        for token_key, symbol, block in blocks:
            limits += _limit_budgets(block, token_key, symbol, counters, windows)
        for name, (scope_name, group) in sorted(result["groups"].items()):
            scope = next((sc for sc in policy.scoped_limits if sc.name == scope_name), None)
            if scope is not None:
                limits += _limit_budgets(scope.limits, scope.token, scope.limits.symbol,
                                         _split(books[name]["c"], held.get(name)), windows,
                                         scope_name, group)  # fmt: skip
        delegation = delegation_record(agent_id, books[keys.head(agent_id)])
        more = tuple(result["more_groups"])
        return Budget(agent_id, now, periods, tuple(limits), (), delegation, more), policy

    def _refreshed(self, shard: str, agent_id: str, step: operations.Step, at: int) -> Flow[Body]:
        """Run a budget's refresh step until its books and open reservations are of one moment.

        The step reads the agent's head, then its open reservations; a store
        whose reading session takes no lock and holds no snapshot (Redis,
        PostgreSQL) may let a payment land in between. Every change to what
        a budget shows writes the head (a confirm moves no counter and needs
        none), so the head read again unchanged says both were of one moment;
        else the step runs again as a writer (under the shard's lock where the
        store has one), up to three times.
        """
        lapsed, write = False, False
        for _ in range(3):
            result: Body = yield Run(shard, step, at=at, write=write)
            lapsed = lapsed or bool(result["lapsed"])
            while "more" in result:  # a batch of due expiries was committed: the rest next
                result = yield Run(shard, step, at=at, write=write)
                lapsed = lapsed or bool(result["lapsed"])
            (head,) = yield Read(shard, [keys.head(agent_id)])
            if head == result["books"][keys.head(agent_id)]:
                break
            write = True
        if lapsed:
            self._wake_webhooks()
        return result

    # -- approvals ----------------------------------------------------------------------

    def get_approval(self, approval_id: str) -> Approval:
        """An approval by id, with its expiry applied (``APPROVAL_NOT_FOUND`` if none)."""
        return self._drive(self._get_approval(approval_id))

    def _get_approval(self, approval_id: str) -> Flow[Approval]:
        raise_if(check_record_id(approval_id, "$.approvalId"))
        now = self._now()
        shard = yield from self._shard_of_id(approval_id)
        name = keys.approval(approval_id)
        (doc,) = yield Read(shard, [name])
        if doc is not None and doc["st"] == "pending" and micros(now) >= doc["x"]:
            yield from self._expire(doc["agent"], now)
            (doc,) = yield Read(shard, [name])
        if doc is None:
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        return approval_record(approval_id, doc)

    def list_approvals(self, agent_id: str | None = None, *, expire: bool = True) -> list[Approval]:
        """Pending approvals, oldest first, of one agent or of every agent.

        Approvals whose time is up are expired first (a write, giving their
        held budget back); with ``expire=False`` they are left alone and
        left out, and nothing is written (for a page or a metric that polls).
        """
        return self._drive(self._list_approvals(agent_id, expire=expire))

    def _list_approvals(
        self, agent_id: str | None = None, *, expire: bool = True
    ) -> Flow[list[Approval]]:
        if type(expire) is not bool:
            raise PolicyValidationError.single("$.expire", "must be true or false")
        now = self._now()
        if agent_id is not None:
            raise_if(check_identifier(agent_id, "$.agentId"))
            if expire:
                yield from self._expire(agent_id, now)
            index = keys.pending_index(agent_id)
            shard = yield from self._shard(agent_id)
        else:
            if expire:
                yield from self._sweep()
            index, shard = keys.PENDING, "@"
        ids = yield Scan(shard, index, MAX_SCORE, 1_000_000)
        found = []
        for approval_id, _ in ids:
            where = yield from self._shard_of_id(approval_id)
            (doc,) = yield Read(where, [keys.approval(approval_id)])
            if doc is not None and doc["st"] == "pending" and micros(now) < doc["x"]:
                found.append(approval_record(approval_id, doc))
        return sorted(found, key=lambda a: (a.created_at, a.id))

    def open_reservations(self, limit: int = 100_000) -> int:
        """How many reservations and approval holds are open now, over the whole store.

        Read only (what is due to expire still counts until something
        expires it). At most ``limit`` (1 to 1,000,000) agents with something
        open are looked at; a reservation counts once, also in a budget tree
        (where it is listed under the agent and every budget above it).
        """
        return self._drive(self._open_reservations(limit))

    def _open_reservations(self, limit: int = 100_000) -> Flow[int]:
        raise_if(check_int(limit, "$.limit", 1, 1_000_000))
        agents = yield Scan("@", keys.DUE, MAX_SCORE, limit)
        found: set[str] = set()
        for agent, _ in agents:
            shard = yield from self._shard(agent)
            members = yield Scan(shard, keys.open_index(agent), MAX_SCORE, 10_000_000)
            found.update(m for m, _ in members)
        return len(found)

    def decide(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None = None,
        *,
        signature: str | None = None,
        signed_at: datetime | None = None,
    ) -> Approval:
        """Submit an approver's ``"approve"`` or ``"deny"``; return the approval after it.

        One deny denies at once and gives the held budget back; enough
        approvals approve, and the approval then carries a ``reservation_id``
        whose TTL counts from now. A registered approver's vote, and every
        vote on an approval that requires signed votes, needs ``signature``
        (base64url Ed25519) over :meth:`vote_message` made at ``signed_at``
        (within 5 minutes of the engine's clock); the agent and whoever
        asked for the payment may not vote on it. Raises
        ``APPROVAL_NOT_FOUND``, ``APPROVAL_NOT_PENDING``,
        ``APPROVER_NOT_AUTHORIZED`` or ``DUPLICATE_DECISION``; nothing
        changes when it raises.
        """
        return self._drive(
            self._decide(
                approval_id, approver, decision, comment, signature=signature, signed_at=signed_at
            )
        )

    def _decide(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None = None,
        *,
        signature: str | None = None,
        signed_at: datetime | None = None,
    ) -> Flow[Approval]:
        problems = check_record_id(approval_id, "$.approvalId")
        problems += check_person(approver, "$.approver")
        if decision not in DECISIONS:
            problems += PolicyValidationError.single(
                "$.decision", "must be 'approve' or 'deny'"
            ).problems
        if comment is not None:
            problems += check_text(comment, "$.comment")
        if signature is not None:
            problems += signature_problems(signature, "$.signature")
            if not isinstance(signed_at, datetime) or signed_at.utcoffset() is None:
                problems += PolicyValidationError.single(
                    "$.signedAt", "must be the timezone-aware instant the vote was signed at"
                ).problems
        elif signed_at is not None:
            problems += PolicyValidationError.single(
                "$.signedAt", "is given without a signature"
            ).problems
        raise_if(problems)
        now = self._now()
        proof = yield from self._vote_proof(
            approval_id, approver, decision, comment, signature, signed_at, now
        )
        return (yield from self._cast(approval_id, approver, decision, comment, proof, now))

    def _cast(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None,
        proof: VoteProof,
        now: datetime,
    ) -> Flow[Approval]:
        """Run the vote step with a proof checked before it."""
        shard = yield from self._shard_of_id(approval_id)
        step = operations.vote(
            self.config, shard, approval_id, approver, decision, comment, now, proof
        )
        result: Body = yield Run(shard, step, at=micros(now))
        self._wake_webhooks()
        return approval_record(approval_id, result["doc"])

    # -- audit and housekeeping ---------------------------------------------------------

    def history(
        self, agent_id: str, limit: int = 100, *, version: int | None = None
    ) -> list[HistoryRecord]:
        """The agent's decisions and state changes, newest first (at most ``limit``).

        ``version`` keeps only the records that name that policy version:
        decisions it made, the confirm, release and expiry of reservations
        made under it, and the ``policy_set`` (and shadow) records of it.
        """
        return self._drive(self._history(agent_id, limit, version=version))

    def _history(
        self, agent_id: str, limit: int = 100, *, version: int | None = None
    ) -> Flow[list[HistoryRecord]]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        if type(limit) is not int or not 1 <= limit <= 10_000:
            raise PolicyValidationError.single("$.limit", "must be an integer from 1 to 10000")
        if version is not None:
            raise_if(check_int(version, "$.version", 1, MAX_SCORE))
        shard = yield from self._shard(agent_id)
        entries = yield from self._newest(shard, agent_id, limit, version)
        if shard != agent_id and len(entries) < limit and (yield from self._apart(agent_id, shard)):
            # placed in a tree: what its own shard recorded before (frozen since) is older
            entries += yield from self._newest(agent_id, agent_id, limit - len(entries), version)
        return [history_record(agent_id, seq, at, entry) for seq, at, entry in entries]

    def _newest(
        self, shard: str, agent_id: str, limit: int, version: int | None
    ) -> Flow[list[tuple[int, int, Any]]]:
        """The newest ``limit`` entries of an agent's logs in one shard, newest first."""
        names = (keys.changes_log(agent_id), keys.denials_log(agent_id))
        batch = limit
        while True:
            logs = []
            for name in names:
                logs.append((yield Log(shard, name, batch)))
            entries = [e for log in logs for e in log
                       if version is None or e[2].get("pv") == version]  # fmt: skip
            entries.sort(key=lambda e: e[0], reverse=True)
            # every log read to its end, or each holds nothing newer than what is kept
            cut = entries[limit - 1][0] if len(entries) >= limit else None
            if all(len(log) < batch or (cut is not None and log[-1][0] <= cut) for log in logs):
                return entries[:limit]
            batch *= 4

    def sweep(self) -> SweepResult:
        """Apply every due expiry now; return the reservations and approvals it expired."""
        return self._drive(self._sweep())

    def _sweep(self) -> Flow[SweepResult]:
        now = self._now()
        due = yield Scan("@", keys.DUE, micros(now), 1_000_000)
        reservations: list[Reservation] = []
        lapsed: list[Approval] = []
        for agent, _ in due:
            result = yield from self._expire(agent, now)
            reservations += [reservation_record(i, d) for i, d in result["expired"]]
            lapsed += [approval_record(i, d) for i, d in result["lapsed"]]
        return SweepResult(tuple(reservations), tuple(lapsed))

    # -- safe rollout: versions, shadow policies, what-if ----------------------------------

    def _current(self, agent_id: str) -> Flow[tuple[str, int]]:
        """The agent's shard and current version (``NO_POLICY`` if it has none)."""
        raise_if(check_identifier(agent_id, "$.agentId"))
        shard = yield from self._shard(agent_id)
        (head,) = yield Read(shard, [keys.head(agent_id)])
        current = 0 if head is None else head["pv"]
        if not current:
            raise NotFoundError(f"no policy is set for agent {agent_id}", code=ErrorCode.NO_POLICY)
        return shard, current

    def _versions(self, agent_id: str, wanted: list[int]) -> Flow[tuple[int, list[PolicyVersion]]]:
        """The versions ``wanted`` (each with its changes) and the current version."""
        shard, current = yield from self._current(agent_id)
        missing = [v for v in wanted if not 1 <= v <= current]
        if missing:
            raise NotFoundError(
                f"agent {agent_id} has no policy version {missing[0]} (versions 1 to {current})",
                code=ErrorCode.POLICY_VERSION_NOT_FOUND,
            )
        numbers = sorted({n for v in wanted for n in (v, v - 1) if n >= 1})
        read = yield Read(shard, [keys.policy(agent_id, n) for n in numbers])
        docs = dict(zip(numbers, read, strict=True))
        found = []
        for v in wanted:
            doc, before = docs[v], docs.get(v - 1)
            if doc is None:
                raise InternalError(f"policy version {v} of {agent_id} is missing")
            via = doc.get("via") or {"op": "set"}
            policy = self._policies.get((agent_id, v)) or self._parsed(agent_id, v, doc)
            found.append(PolicyVersion(
                agent_id, v, policy, instant(doc["at"]), via["op"], via.get("from"),
                v == current, () if before is None else diff_policies(before["policy"],
                                                                      doc["policy"]),
            ))  # fmt: skip
        return current, found

    def policy_versions(
        self, agent_id: str, limit: int = 100, *, before: int | None = None
    ) -> list[PolicyVersion]:
        """The agent's policy versions, newest first: when each was set, how, and what changed.

        At most ``limit`` (1 to 10000) versions older than ``before`` (when
        given). Each :class:`~agentpolicy.PolicyVersion` lists its changes
        from the version before it. Raises ``NO_POLICY``.
        """
        return self._drive(self._policy_versions(agent_id, limit, before=before))

    def _policy_versions(
        self, agent_id: str, limit: int = 100, *, before: int | None = None
    ) -> Flow[list[PolicyVersion]]:
        problems = check_int(limit, "$.limit", 1, 10_000)
        if before is not None:
            problems += check_int(before, "$.before", 1, MAX_SCORE)
        raise_if(problems)
        _, current = yield from self._current(agent_id)
        top = current if before is None else min(current, before - 1)
        _, found = yield from self._versions(agent_id, list(range(top, max(0, top - limit), -1)))
        return found

    def get_policy_version(self, agent_id: str, version: int) -> PolicyVersion:
        """Version ``version`` of the agent's policy (``POLICY_VERSION_NOT_FOUND`` if none)."""
        return self._drive(self._get_policy_version(agent_id, version))

    def _get_policy_version(self, agent_id: str, version: int) -> Flow[PolicyVersion]:
        raise_if(check_int(version, "$.version", 1, MAX_SCORE))
        _, found = yield from self._versions(agent_id, [version])
        return found[0]

    def diff_policy_versions(
        self, agent_id: str, before: int, after: int
    ) -> tuple[PolicyChange, ...]:
        """Every field that differs from version ``before`` to version ``after``, readable.

        ``str(change)`` reads ``limits.daily.value: 1000000000 -> 500000000``.
        """
        return self._drive(self._diff_policy_versions(agent_id, before, after))

    def _diff_policy_versions(
        self, agent_id: str, before: int, after: int
    ) -> Flow[tuple[PolicyChange, ...]]:
        problems = check_int(before, "$.before", 1, MAX_SCORE)
        problems += check_int(after, "$.after", 1, MAX_SCORE)
        raise_if(problems)
        _, (a, b) = yield from self._versions(agent_id, [before, after])
        return diff_policies(a.policy, b.policy)

    def rollback_policy(self, agent_id: str, version: int) -> int:
        """Make version ``version`` live again, as a new version equal to it; return the new one.

        Checked like :meth:`set_policy` (a parent that has no policy, a
        cycle, a tree too deep, another tree: refused, nothing changes).
        """
        return self._drive(self._rollback_policy(agent_id, version))

    def _rollback_policy(self, agent_id: str, version: int) -> Flow[int]:
        old = yield from self._get_policy_version(agent_id, version)
        origin = {"op": "rollback", "from": version}
        return (yield from self._put_policy(agent_id, old.policy, origin=origin))

    def get_shadow_policy(self, agent_id: str) -> ShadowPolicy | None:
        """The agent's shadow policy, or ``None``."""
        return self._drive(self._get_shadow_policy(agent_id))

    def _get_shadow_policy(self, agent_id: str) -> Flow[ShadowPolicy | None]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        doc = yield from self._shadow_doc(agent_id)
        return None if doc is None else self._shadow_record(agent_id, doc)

    def _shadow_doc(self, agent_id: str) -> Flow[Body | None]:
        shard = yield from self._shard(agent_id)
        head, doc = yield Read(shard, [keys.head(agent_id), keys.shadow(agent_id)])
        if head is None or doc is None or head.get("sh") != doc["id"]:
            return None
        return dict(doc)

    def _shadow_record(self, agent_id: str, doc: Body) -> ShadowPolicy:
        return ShadowPolicy(agent_id, self._shadow(agent_id, doc), instant(doc["at"]), doc["pv"])

    def set_shadow_policy(
        self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]
    ) -> ShadowPolicy:
        """Judge every payment of the agent (and of budgets below it) by ``policy`` too.

        The live policy stays the one enforced; the shadow's decisions are
        tallied beside it, and the payments it would decide differently are
        logged (:meth:`shadow_report`). Setting a shadow again replaces it
        and starts its tallies afresh. The shadow keeps the live policy's
        parent (``INVALID_INPUT`` at ``$.policy.parent`` otherwise). Raises
        ``NO_POLICY`` for an agent without a live policy.
        """
        return self._drive(self._set_shadow_policy(agent_id, policy))

    def _set_shadow_policy(
        self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]
    ) -> Flow[ShadowPolicy]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        if not isinstance(policy, AgentPolicy):
            try:
                policy = load_policy(policy)
            except PolicyValidationError as err:
                raise err.under("$.policy") from None
        now = self._now()
        step = rollout.set_shadow(self.config, agent_id, policy, dump_policy(policy), now,
                                  self._policy)  # fmt: skip
        shard = yield from self._shard(agent_id)
        doc: Body = dict((yield Run(shard, step, at=micros(now))))
        with self._policies_lock:
            self._shadows[(agent_id, doc["id"])] = policy
        return self._shadow_record(agent_id, doc)

    def shadow_report(self, agent_id: str, limit: int = 100) -> ShadowReport:
        """What the agent's shadow policy would have decided since it was set.

        Counts by code and by outcome (live and shadow), the flips, and the
        newest ``limit`` (1 to 10000) payments it would have decided
        differently. Raises ``SHADOW_NOT_FOUND``.
        """
        return self._drive(self._shadow_report(agent_id, limit))

    def _shadow_report(self, agent_id: str, limit: int = 100) -> Flow[ShadowReport]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        raise_if(check_int(limit, "$.limit", 1, 10_000))
        doc = yield from self._shadow_doc(agent_id)
        if doc is None:
            raise NotFoundError(
                f"agent {agent_id} has no shadow policy", code=ErrorCode.SHADOW_NOT_FOUND
            )
        return (yield from self._report(agent_id, doc, limit))

    def _report(self, agent_id: str, doc: Body, limit: int) -> Flow[ShadowReport]:
        live, shadow, flips, total = tally_pairs(doc.get("n", {}))
        shard = yield from self._shard(agent_id)
        entries = yield Log(shard, keys.shadow_log(agent_id), limit)
        differences = tuple(
            ShadowDifference(instant(e["at"]), request_of(e["req"]), Code(e["live"]),
                             Code(e["shadow"]), e.get("pv") or None)
            for _, _, e in entries if e.get("id") == doc["id"]
        )  # fmt: skip
        return ShadowReport(
            self._shadow_record(agent_id, doc), total, live, shadow, flips, differences
        )

    def promote_shadow_policy(
        self, agent_id: str, *, force: bool = False, set_at: datetime | None = None
    ) -> int:
        """Make the shadow the live policy (a new version) and remove it, in one commit.

        Returns the new version. Checked like :meth:`set_policy`. Raises
        ``SHADOW_NOT_FOUND``; and ``SHADOW_OUTDATED`` (a
        :class:`~agentpolicy.errors.ConflictError`) when another version went
        live after the shadow was set (a ``set_policy``, a rollback, a
        delegation), since promoting would silently undo that version (an
        emergency ``"enabled": false``, say). ``force=True`` promotes anyway.
        ``set_at`` (the ``set_at`` of the shadow that was reviewed) promotes
        only that shadow: one set since, by another administrator, is
        ``SHADOW_OUTDATED`` too, ``force`` or not.
        """
        return self._drive(self._promote_shadow_policy(agent_id, force=force, set_at=set_at))

    def _promote_shadow_policy(
        self, agent_id: str, *, force: bool = False, set_at: datetime | None = None
    ) -> Flow[int]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        if type(force) is not bool:
            raise PolicyValidationError.single("$.force", "must be true or false")
        if set_at is not None and not (
            isinstance(set_at, datetime) and set_at.utcoffset() is not None
        ):
            raise PolicyValidationError.single("$.setAt", "must be a timezone-aware datetime")
        now = self._now()
        shard = yield from self._shard(agent_id)
        step = rollout.promote_shadow(
            self.config, shard, agent_id, now, self._policy, self._shadow, force=force,
            set_at=None if set_at is None else micros(set_at),
        )  # fmt: skip
        result: Body = yield Run(shard, step, at=micros(now))
        version: int = result["version"]
        with self._policies_lock:
            self._policies[(agent_id, version)] = self._shadow(agent_id, result["doc"])
        return version

    def clear_shadow_policy(self, agent_id: str) -> ShadowReport:
        """Remove the agent's shadow policy; return its last report. Raises ``SHADOW_NOT_FOUND``."""
        return self._drive(self._clear_shadow_policy(agent_id))

    def _clear_shadow_policy(self, agent_id: str) -> Flow[ShadowReport]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        now = self._now()
        step = rollout.clear_shadow(self.config, agent_id)
        shard = yield from self._shard(agent_id)
        doc: Body = dict((yield Run(shard, step, at=micros(now))))
        return (yield from self._report(agent_id, doc, 100))

    def simulate(
        self,
        agent_id: str,
        candidate: AgentPolicy | Mapping[str, Any],
        *,
        since: datetime | timedelta,
    ) -> SimulationReport:
        """Replay the agent's recorded payments since ``since`` against ``candidate``.

        ``since`` is an instant or a duration back from now. The payments
        of the agent and of every budget below it (which count in its
        budget) are judged by the candidate in time order, with counters of
        its own; live state is not touched. See
        :mod:`agentpolicy.simulation` and docs/rollout.md for the rules
        (what happens to the money of each payment, what history keeps).
        Raises ``NO_POLICY``.
        """
        return self._drive(self._simulate(agent_id, candidate, since=since))

    def _simulate(
        self,
        agent_id: str,
        candidate: AgentPolicy | Mapping[str, Any],
        *,
        since: datetime | timedelta,
    ) -> Flow[SimulationReport]:
        raise_if(check_identifier(agent_id, "$.agentId"))
        if not isinstance(candidate, AgentPolicy):
            try:
                candidate = load_policy(candidate)
            except PolicyValidationError as err:
                raise err.under("$.policy") from None
        now = self._now()
        if isinstance(since, timedelta):
            if not timedelta(0) <= since <= MAX_DURATION:
                raise PolicyValidationError.single(
                    "$.since", "must be a duration from zero to 36525 days back"
                )
            start = now - since
        elif isinstance(since, datetime) and since.utcoffset() is not None:
            start = since
            if start > now:  # nothing to replay: a report from then to now would run backwards
                raise PolicyValidationError.single(
                    "$.since", f"must not be after now ({now.isoformat()} on this engine's clock)"
                )
        else:
            raise PolicyValidationError.single(
                "$.since", "must be a timezone-aware datetime or a timedelta"
            )
        shard, _ = yield from self._current(agent_id)
        # what is due expires first, so that history says how (a sent payment's is spent)
        yield from self._expire(agent_id, now)
        logs: dict[str, list[recorded.Entry]] = {}
        notes: list[str] = []
        retention = self.config.history_retention
        if retention is not None and micros(start) < micros(now) - retention:
            notes.append(
                f"history is kept for {timedelta(microseconds=retention)}: payments before "
                f"{instant(micros(now) - retention).isoformat()} are gone and not replayed"
            )
        for agent in (yield from self._subtree(shard, agent_id)):
            logs[agent] = yield from self._logs_since(shard, agent, micros(start), notes)
            if agent != shard and (yield from self._apart(agent, shard)):
                # what it was asked before it was placed in the tree, kept in its own shard (whose
                # sequence is its own: numbered below the tree's, as it all came before)
                own = yield from self._logs_since(agent, agent, micros(start), notes)
                logs[agent] += [(seq - _BEFORE_PLACED, at, e) for seq, at, e in own]
        yield from self._load_chains(logs)
        events = recorded.events_of(agent_id, logs, micros(now), self._level_codes)
        return replay(agent_id, candidate, events, since=start, until=now, notes=notes)

    def _load_chains(self, logs: dict[str, list[recorded.Entry]]) -> Flow[None]:
        """Read every policy version the recorded decisions name (then judged without I/O)."""
        wanted: set[tuple[str, int]] = set()
        for agent, entries in logs.items():
            for _, _, entry in entries:
                if "pv" in entry:
                    wanted.add((agent, entry["pv"]))
                wanted.update((who, pv) for who, pv in entry.get("up", ()))
        for who, pv in sorted(wanted):
            yield from self._load_policy(who, pv)

    def _level_codes(self, rec: Body, request: PaymentRequest) -> list[Code]:
        """The code each budget of a recorded decision's chain gives, judged alone (payer first)."""
        usage = rec.get("use", {})
        own = self._drive(self._assessment(rec, request, chain=False))  # policies are loaded
        codes = [judge(own, usage).code]
        if own.early is None and rec.get("up"):
            chain = self._drive(self._assessment(rec, request))
            codes += [judge(p, usage).code for p in chain.parents]
        return codes

    def _subtree(self, shard: str, agent_id: str) -> Flow[list[str]]:
        """The agent and every budget below it (they share its shard)."""
        found, level = [agent_id], [agent_id]
        while level and len(found) < 100_000:
            below = []
            for a in level:
                members = yield Scan(shard, keys.children(a), MAX_SCORE, 100_000)
                below += [m for m, _ in members if m not in found]
            level = below
            found += level
        return found

    def _logs_since(
        self, shard: str, agent: str, since: int, notes: list[str]
    ) -> Flow[list[recorded.Entry]]:
        """An agent's changes and denials in ``shard`` from ``since`` on (notes: denials cut)."""
        changes = yield from self._log_since(shard, keys.changes_log(agent), since)
        denials = yield from self._log_since(shard, keys.denials_log(agent), since)
        if len(denials) >= self.config.max_denials:
            notes.append(
                f"only the newest {self.config.max_denials} denied payments of {agent} are "
                f"kept: denials before {instant(denials[0][1]).isoformat()} are not replayed"
            )
        return changes + denials

    def _log_since(self, shard: str, name: str, since: int) -> Flow[list[recorded.Entry]]:
        """A log's entries from ``since`` (microseconds) on, oldest first."""
        batch = 1_000
        while True:
            entries = yield Log(shard, name, batch)
            if len(entries) < batch or entries[-1][1] < since:
                break
            batch *= 4
        return [e for e in reversed(entries) if e[1] >= since]

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

    def webhook_deliveries(
        self, status: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Deliveries in the outbox, newest first (``status``: pending, delivered, failed)."""
        problems = check_int(limit, "$.limit", 1, 10_000)
        if status is not None and status not in ("pending", "delivered", "failed"):
            problems += PolicyValidationError.single(
                "$.status", "must be pending, delivered or failed"
            ).problems
        raise_if(problems)
        try:
            return self.outbox.webhook_deliveries(status, limit)
        except PolicyError:
            raise
        except UNREADABLE as exc:
            raise unreadable("of the webhook outbox", exc) from exc

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
