"""AsyncPolicyEngine: the methods of :class:`~agentpolicy.PolicyEngine` as coroutines.

Agent frameworks are async; a guard that blocks the event loop while a store
answers stalls every other task of the agent. Each call of an
:class:`AsyncPolicyEngine` runs off the event loop: today, the
:class:`~agentpolicy.PolicyEngine` call runs in a thread pool that belongs
to this engine (its size bounds how many calls run at once), so every store
works (memory, SQLite, Redis, PostgreSQL) with the same ledger, the same
atomicity and the same answers. The event loop only awaits.

Every method is one line that hands its call to :meth:`AsyncPolicyEngine._run`
(the execution); the interface and its tests do not depend on how a call is
executed, so stores can move to native async clients (``redis.asyncio``,
psycopg's async pool) behind the same methods.

A call whose task is cancelled while it runs in the pool still completes
there (an ``authorize`` may reserve; its reservation then expires by its
TTL); one that has not started yet does not start. ``async with
aengine.payment(request)`` releases what a cancelled entry reserved (see
:class:`~agentpolicy.guard.AsyncPaymentGuard`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from agentpolicy._checks import check_int, raise_if
from agentpolicy.decisions import Decision
from agentpolicy.engine import (
    DEFAULT_COUNTER_GRACE,
    DEFAULT_RESERVATION_TTL,
    PolicyEngine,
    StoredPolicy,
)
from agentpolicy.errors import PolicyValidationError, StorageUnavailableError
from agentpolicy.guard import AsyncPaymentGuard
from agentpolicy.policy import AgentPolicy
from agentpolicy.records import (
    Approval,
    Budget,
    Delegation,
    HistoryRecord,
    Reservation,
    SweepResult,
    WebhookDelivery,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.shadow import ShadowPolicy, ShadowReport
from agentpolicy.simulation import SimulationReport
from agentpolicy.storage import Storage
from agentpolicy.versions import PolicyChange, PolicyVersion
from agentpolicy.webhooks import WebhookEndpoint
from agentpolicy.windows import Period

__all__ = ["AsyncPolicyEngine"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class AsyncPolicyEngine:
    """The stateful guard of :class:`~agentpolicy.PolicyEngine`, for asyncio.

    Takes the same arguments as :class:`~agentpolicy.PolicyEngine` (and
    ``max_workers``, the most calls that run at once; default: as
    :class:`~concurrent.futures.ThreadPoolExecutor`); or wrap an engine
    you have with :meth:`from_engine`. Every method of ``PolicyEngine`` is
    here as a coroutine with the same arguments, answers and errors, and
    none blocks the event loop. ``payment(request)`` is used as ``async
    with``. Close it with ``await aengine.close()`` or ``async with
    AsyncPolicyEngine(...) as aengine:``: that waits for calls in flight,
    closes the engine it made (not one given to :meth:`from_engine`) and
    stops its threads; a call after it raises ``STORAGE_UNAVAILABLE``.
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
        max_workers: int | None = None,
    ) -> None:
        _check_workers(max_workers)
        engine = PolicyEngine(
            storage,
            clock,
            reservation_ttl,
            webhook_endpoints,
            webhook_backoff=webhook_backoff,
            webhook_backoff_cap=webhook_backoff_cap,
            history_retention=history_retention,
            max_denials=max_denials,
            counter_grace=counter_grace,
        )
        self._adopt(engine, owned=True, max_workers=max_workers)

    @classmethod
    def from_engine(
        cls, engine: PolicyEngine, *, max_workers: int | None = None
    ) -> AsyncPolicyEngine:
        """Run the calls of an existing engine off the event loop.

        Closing the async engine stops its threads but leaves ``engine``
        open: it is yours to close.
        """
        if not isinstance(engine, PolicyEngine):
            raise PolicyValidationError.single("$.engine", "must be a PolicyEngine")
        _check_workers(max_workers)
        self = cls.__new__(cls)
        self._adopt(engine, owned=False, max_workers=max_workers)
        return self

    def _adopt(self, engine: PolicyEngine, *, owned: bool, max_workers: int | None) -> None:
        self._engine = engine
        self._owned = owned
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="agentpolicy-aio")
        self._running: set[Future[Any]] = set()
        self._closed = False

    # -- execution --------------------------------------------------------------------------

    async def _run(self, call: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run one engine call off the event loop and await its answer."""
        if self._closed:
            raise StorageUnavailableError("this AsyncPolicyEngine is closed")
        context = contextvars.copy_context()
        future = self._pool.submit(context.run, functools.partial(call, *args, **kwargs))
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return await asyncio.wrap_future(future)

    @property
    def reservation_ttl(self) -> timedelta:
        """How long an allowed payment's reservation waits for confirm or release."""
        return self._engine.reservation_ttl

    # -- policies -----------------------------------------------------------------------------

    async def set_policy(self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]) -> int:
        """Store a policy and return its new version (:meth:`PolicyEngine.set_policy`)."""
        return await self._run(self._engine.set_policy, agent_id, policy)

    async def get_policy(self, agent_id: str) -> StoredPolicy | None:
        """The agent's current policy and version, or ``None``."""
        return await self._run(self._engine.get_policy, agent_id)

    async def list_policies(self, org_id: str | None = None) -> list[StoredPolicy]:
        """Every stored policy, or those of agents whose id starts with ``"{org_id}:"``."""
        return await self._run(self._engine.list_policies, org_id)

    # -- versions, shadows and what-if ------------------------------------------------------

    async def policy_versions(
        self, agent_id: str, limit: int = 100, *, before: int | None = None
    ) -> list[PolicyVersion]:
        """The agent's policy versions, newest first (:meth:`PolicyEngine.policy_versions`)."""
        return await self._run(self._engine.policy_versions, agent_id, limit, before=before)

    async def get_policy_version(self, agent_id: str, version: int) -> PolicyVersion:
        """One version of the agent's policy (``POLICY_VERSION_NOT_FOUND`` if none)."""
        return await self._run(self._engine.get_policy_version, agent_id, version)

    async def diff_policy_versions(
        self, agent_id: str, before: int, after: int
    ) -> tuple[PolicyChange, ...]:
        """What changed between two versions (:meth:`PolicyEngine.diff_policy_versions`)."""
        return await self._run(self._engine.diff_policy_versions, agent_id, before, after)

    async def rollback_policy(self, agent_id: str, version: int) -> int:
        """Make an old version live again as a new version; return the new version."""
        return await self._run(self._engine.rollback_policy, agent_id, version)

    async def set_shadow_policy(
        self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]
    ) -> ShadowPolicy:
        """Judge a candidate beside the live policy (:meth:`PolicyEngine.set_shadow_policy`)."""
        return await self._run(self._engine.set_shadow_policy, agent_id, policy)

    async def get_shadow_policy(self, agent_id: str) -> ShadowPolicy | None:
        """The agent's shadow policy, or ``None``."""
        return await self._run(self._engine.get_shadow_policy, agent_id)

    async def shadow_report(self, agent_id: str, limit: int = 100) -> ShadowReport:
        """What the shadow would have decided (:meth:`PolicyEngine.shadow_report`)."""
        return await self._run(self._engine.shadow_report, agent_id, limit)

    async def promote_shadow_policy(self, agent_id: str) -> int:
        """Make the shadow the live policy; return the new version."""
        return await self._run(self._engine.promote_shadow_policy, agent_id)

    async def clear_shadow_policy(self, agent_id: str) -> ShadowReport:
        """Remove the shadow policy; return its last report."""
        return await self._run(self._engine.clear_shadow_policy, agent_id)

    async def simulate(
        self,
        agent_id: str,
        candidate: AgentPolicy | Mapping[str, Any],
        *,
        since: datetime | timedelta,
    ) -> SimulationReport:
        """Replay recorded payments against a candidate (:meth:`PolicyEngine.simulate`)."""
        return await self._run(self._engine.simulate, agent_id, candidate, since=since)

    # -- shared budgets -----------------------------------------------------------------------

    async def delegate(
        self,
        parent_id: str,
        child_id: str,
        policy: AgentPolicy | Mapping[str, Any],
        *,
        expires_at: datetime | None = None,
        by_parent: bool = False,
    ) -> Delegation:
        """Create or update a budget under a parent's (:meth:`PolicyEngine.delegate`)."""
        return await self._run(
            self._engine.delegate,
            parent_id,
            child_id,
            policy,
            expires_at=expires_at,
            by_parent=by_parent,
        )

    async def delegation(self, agent_id: str) -> Delegation | None:
        """How the agent's budget was delegated, or ``None``."""
        return await self._run(self._engine.delegation, agent_id)

    async def revoke(self, agent_id: str, *, by: str | None = None) -> Delegation:
        """Revoke a delegated budget (:meth:`PolicyEngine.revoke`)."""
        return await self._run(self._engine.revoke, agent_id, by=by)

    # -- payments -----------------------------------------------------------------------------

    async def authorize(self, request: PaymentRequest, *, dry_run: bool = False) -> Decision:
        """Decide a payment; hold its amount when allowed (:meth:`PolicyEngine.authorize`)."""
        return await self._run(self._engine.authorize, request, dry_run=dry_run)

    async def confirm(self, reservation_id: str) -> Reservation:
        """Turn a reservation into spending (:meth:`PolicyEngine.confirm`)."""
        return await self._run(self._engine.confirm, reservation_id)

    async def release(self, reservation_id: str) -> Reservation:
        """Give a reservation's budget back (:meth:`PolicyEngine.release`)."""
        return await self._run(self._engine.release, reservation_id)

    def payment(self, request: PaymentRequest, approval_id: str | None = None) -> AsyncPaymentGuard:
        """``async with aengine.payment(request) as p:`` runs the block only if allowed.

        See :class:`~agentpolicy.guard.AsyncPaymentGuard` and
        :meth:`PolicyEngine.payment`.
        """
        return AsyncPaymentGuard(self, request, approval_id)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        """A reservation by id (``RESERVATION_NOT_FOUND`` if there is none)."""
        return await self._run(self._engine.get_reservation, reservation_id)

    async def budget(self, agent_id: str, period: Period | str | None = None) -> Budget:
        """What the agent has spent, reserved and has left (:meth:`PolicyEngine.budget`)."""
        return await self._run(self._engine.budget, agent_id, period)

    # -- approvals ----------------------------------------------------------------------------

    async def get_approval(self, approval_id: str) -> Approval:
        """An approval by id, with its expiry applied."""
        return await self._run(self._engine.get_approval, approval_id)

    async def list_approvals(self, agent_id: str | None = None) -> list[Approval]:
        """Pending approvals, oldest first, of one agent or of every agent."""
        return await self._run(self._engine.list_approvals, agent_id)

    async def decide(
        self, approval_id: str, approver: str, decision: str, comment: str | None = None
    ) -> Approval:
        """Submit an approver's ``"approve"`` or ``"deny"`` (:meth:`PolicyEngine.decide`)."""
        return await self._run(self._engine.decide, approval_id, approver, decision, comment)

    # -- audit and housekeeping ---------------------------------------------------------------

    async def history(
        self, agent_id: str, limit: int = 100, *, version: int | None = None
    ) -> list[HistoryRecord]:
        """The agent's decisions and state changes, newest first."""
        return await self._run(self._engine.history, agent_id, limit, version=version)

    async def sweep(self) -> SweepResult:
        """Apply every due expiry now; return what it expired."""
        return await self._run(self._engine.sweep)

    async def flush_webhooks(self, timeout: float = 10.0) -> bool:
        """Wait (off the loop) until the webhook outbox is empty, or ``timeout`` seconds."""
        return await self._run(self._engine.flush_webhooks, timeout)

    async def webhook_deliveries(
        self, status: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Deliveries in the outbox, newest first."""
        return await self._run(self._engine.webhook_deliveries, status, limit)

    async def close(self) -> None:
        """Wait for calls in flight, close the engine made here, stop the threads.

        Closing again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        running = list(self._running)
        if running:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in running), return_exceptions=True)
        try:
            if self._owned:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._pool, self._engine.close)
        finally:
            self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncPolicyEngine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _check_workers(max_workers: object) -> None:
    if max_workers is not None:
        raise_if(check_int(max_workers, "$.maxWorkers", 1, 1024))
