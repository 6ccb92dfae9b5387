"""AsyncPolicyEngine: the methods of :class:`~agentpolicy.PolicyEngine` as coroutines.

Agent frameworks are async; a guard that blocks the event loop while a store
answers stalls every other task of the agent. Every call of
:class:`~agentpolicy.PolicyEngine` that touches the store is a *flow*
(:mod:`agentpolicy.ledger.flows`): a generator of storage requests. An
:class:`AsyncPolicyEngine` runs the very same flows:

- on Redis and PostgreSQL, natively: each request is awaited on an async
  client (``redis.asyncio``, psycopg's async pool; see
  :func:`~agentpolicy.storage.open_async_storage`), and ledger steps run
  through :func:`~agentpolicy.ledger.arunner.arun`;
- on memory and SQLite, which have no async client, in a thread pool that
  belongs to this engine (its size bounds how many calls run at once).

Either way the rules, checks and answers are those of the sync engine, and
no call blocks the event loop. A sync twin of the store stays open beside
the async one for what runs in the background (webhook delivery, the
outbox) and for the calls that are not flows.

A call whose task is cancelled while it runs in the pool still completes
there (an ``authorize`` may reserve; its reservation then expires by its
TTL); one that has not started yet does not start. A native call cancelled
while it awaits the store stops there: a commit already sent may or may not
apply, as after a timeout. ``async with aengine.payment(request)`` releases
what a cancelled entry reserved (see
:class:`~agentpolicy.guard.AsyncPaymentGuard`).

What the guard goes on with after a cancellation (the release of what a
cancelled entry reserved, a confirm or release under way when its task was
cancelled) runs in tasks that the engine keeps: :meth:`AsyncPolicyEngine.close`
waits for them, and for payment blocks under way to leave, before it closes
the stores.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
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
from agentpolicy.ledger.flows import Flow, adrive, drive
from agentpolicy.policy import AgentPolicy
from agentpolicy.records import (
    Approval,
    ApprovalLink,
    Approver,
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
from agentpolicy.storage import AsyncStorage, Storage, open_async_storage
from agentpolicy.versions import PolicyChange, PolicyVersion
from agentpolicy.webhooks import WebhookEndpoint
from agentpolicy.windows import Period

__all__ = ["AsyncPolicyEngine"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_log = logging.getLogger("agentpolicy.aio")

_WARN_AFTER = 5.0
"""Seconds close() waits for payment blocks under way before it says so in the log."""

_SETTLING: contextvars.ContextVar[AsyncPolicyEngine | None] = contextvars.ContextVar(
    "agentpolicy_aio_settling", default=None
)
"""Set inside a settling task of an engine (see :meth:`AsyncPolicyEngine._spawn`)."""


class AsyncPolicyEngine:
    """The stateful guard of :class:`~agentpolicy.PolicyEngine`, for asyncio.

    Takes the same arguments as :class:`~agentpolicy.PolicyEngine` (and
    ``max_workers``, the most calls that run at once in threads; default:
    as :class:`~concurrent.futures.ThreadPoolExecutor`); or wrap an engine
    you have with :meth:`from_engine`. Given a Redis or PostgreSQL URL, its
    calls run natively on an async client of the same store; given a
    :class:`~agentpolicy.storage.Storage` object, pass ``async_storage``
    (an :class:`~agentpolicy.storage.AsyncStorage` of the same store) for
    that, else its calls run in threads. Every method of ``PolicyEngine`` is
    here as a coroutine with the same arguments, answers and errors, and
    none blocks the event loop. ``payment(request)`` is used as ``async
    with``. Close it with ``await aengine.close()`` or ``async with
    AsyncPolicyEngine(...) as aengine:``: that waits for calls in flight
    and for what the payment guard goes on with in the background after a
    cancellation, closes the engine it made (not one given to
    :meth:`from_engine`) and stops its threads; a call after it began raises
    ``STORAGE_UNAVAILABLE``.
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
        max_workers: int | None = None,
        async_storage: AsyncStorage | None = None,
    ) -> None:
        _check_workers(max_workers)
        _check_async_storage(async_storage)
        if not isinstance(storage, str):  # a store given, or None (memory)
            _check_same_store(storage, async_storage)
        if async_storage is None and isinstance(storage, str):
            async_storage = open_async_storage(storage)
        owned_async = async_storage is not None  # closed with this engine, as the storage is
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
            link_secret=link_secret,
        )
        if isinstance(storage, str):  # the store this engine opened from the URL
            try:
                _check_same_store(engine.storage, async_storage)
            except PolicyValidationError:
                engine.close()
                raise
        self._adopt(engine, owned=True, max_workers=max_workers)
        self._astorage = async_storage
        self._owns_astorage = owned_async

    @classmethod
    def from_engine(
        cls,
        engine: PolicyEngine,
        *,
        max_workers: int | None = None,
        async_storage: AsyncStorage | None = None,
    ) -> AsyncPolicyEngine:
        """Run the calls of an existing engine off the event loop.

        ``async_storage`` (an async client of the engine's own store, such as
        ``open_async_storage(url)``) makes the calls native; it stays yours
        to close, as ``engine`` does. Closing the async engine stops its
        threads.
        """
        if not isinstance(engine, PolicyEngine):
            raise PolicyValidationError.single("$.engine", "must be a PolicyEngine")
        _check_workers(max_workers)
        _check_async_storage(async_storage)
        _check_same_store(engine.storage, async_storage)
        self = cls.__new__(cls)
        self._adopt(engine, owned=False, max_workers=max_workers)
        self._astorage = async_storage
        self._owns_astorage = False
        return self

    def _adopt(self, engine: PolicyEngine, *, owned: bool, max_workers: int | None) -> None:
        self._engine = engine
        self._owned = owned
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="agentpolicy-aio")
        self._running: set[Future[Any]] = set()
        """Calls running in the pool; each leaves from the thread that ran it, so the set is
        only touched under ``_running_lock`` (close() reads it on the event loop's thread)."""
        self._running_lock = threading.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        """Background work started for this engine (see :meth:`_spawn`); close awaits it."""
        self._blocks: dict[object, tuple[asyncio.Task[Any] | None, asyncio.Future[None]]] = {}
        """Payment blocks inside ``async with aengine.payment(...)``: their task, and a future
        done when they leave."""
        self._closing = False
        """close() began: calls are refused, except the background work it waits for."""
        self._closed = False
        """close() has drained the background work: everything is refused."""
        self._closer: asyncio.Task[None] | None = None
        """The task that drains and closes, started by the first close(); its callers await it
        shielded, so a close() that is cancelled (a shutdown deadline) still closes."""
        self._closers: set[asyncio.Task[Any] | None] = set()
        """Tasks awaiting close(): the drain never waits for them (nor for their blocks)."""
        self._wake: asyncio.Future[None] | None = None
        """Set when the drain should look again (no native call left, a new close() caller)."""
        self._inflight = 0

    @property
    def native(self) -> bool:
        """Whether calls run on an async client of the store (else in threads)."""
        return self._astorage is not None

    # -- execution --------------------------------------------------------------------------

    def _check_open(self) -> None:
        """Refuse a call once close() began, unless it is background work close waits for."""
        if self._closed or (self._closing and _SETTLING.get() is not self):
            raise StorageUnavailableError("this AsyncPolicyEngine is closed")

    def _spawn(self, call: Awaitable[_T], *, settling: bool) -> asyncio.Task[_T]:
        """Run ``call`` in a task that :meth:`close` waits for.

        ``settling`` marks work that must go on while the engine closes (a
        confirm or release that a cancelled payment block leaves behind): its
        calls are admitted until close() has drained every such task. Other
        work is tracked as well, but its calls are refused once close began.
        Once the engine is closed nothing is started: ``call`` is closed and
        ``STORAGE_UNAVAILABLE`` raised.
        """
        if self._closed or (self._closing and not settling):
            if inspect.iscoroutine(call):
                call.close()
            raise StorageUnavailableError("this AsyncPolicyEngine is closed")

        async def run() -> _T:
            if settling:
                _SETTLING.set(self)  # this task's own context: nothing else sees it
            return await call

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._poke()
        return task

    def _poke(self) -> None:
        """Make a draining close() look again at what it waits for."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _enter_block(self, block: object) -> None:
        """A payment block starts: close() waits for it to leave."""
        self._blocks[block] = (
            asyncio.current_task(),
            asyncio.get_running_loop().create_future(),
        )

    def _leave_block(self, block: object) -> None:
        """A payment block left (its confirm or release, if any, is under way or done)."""
        entry = self._blocks.pop(block, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(None)

    async def _flow(
        self, make: Callable[_P, Flow[_T]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run one of the engine's flows: natively on the async store, else in a thread."""
        if self._astorage is None:
            return await self._run(_drive_in_thread, self._engine.storage, make, *args, **kwargs)
        self._check_open()
        self._inflight += 1
        try:
            return await adrive(self._astorage, make(*args, **kwargs))
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._poke()

    async def _run(self, call: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run one engine call off the event loop and await its answer."""
        self._check_open()
        context = contextvars.copy_context()
        future = self._pool.submit(context.run, functools.partial(call, *args, **kwargs))
        with self._running_lock:
            self._running.add(future)
        future.add_done_callback(self._ran)
        return await asyncio.wrap_future(future)

    def _ran(self, future: Future[Any]) -> None:
        """A call in the pool ended (called in the thread that ran it)."""
        with self._running_lock:
            self._running.discard(future)

    @property
    def reservation_ttl(self) -> timedelta:
        """How long an allowed payment's reservation waits for confirm or release."""
        return self._engine.reservation_ttl

    # -- policies -----------------------------------------------------------------------------

    async def set_policy(self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]) -> int:
        """Store a policy and return its new version (:meth:`PolicyEngine.set_policy`)."""
        return await self._flow(self._engine._set_policy, agent_id, policy)

    async def get_policy(self, agent_id: str) -> StoredPolicy | None:
        """The agent's current policy and version, or ``None``."""
        return await self._flow(self._engine._get_policy, agent_id)

    async def list_policies(self, org_id: str | None = None) -> list[StoredPolicy]:
        """Every stored policy, or those of agents whose id starts with ``"{org_id}:"``."""
        return await self._flow(self._engine._list_policies, org_id)

    # -- versions, shadows and what-if ------------------------------------------------------

    async def policy_versions(
        self, agent_id: str, limit: int = 100, *, before: int | None = None
    ) -> list[PolicyVersion]:
        """The agent's policy versions, newest first (:meth:`PolicyEngine.policy_versions`)."""
        return await self._flow(self._engine._policy_versions, agent_id, limit, before=before)

    async def get_policy_version(self, agent_id: str, version: int) -> PolicyVersion:
        """One version of the agent's policy (``POLICY_VERSION_NOT_FOUND`` if none)."""
        return await self._flow(self._engine._get_policy_version, agent_id, version)

    async def diff_policy_versions(
        self, agent_id: str, before: int, after: int
    ) -> tuple[PolicyChange, ...]:
        """What changed between two versions (:meth:`PolicyEngine.diff_policy_versions`)."""
        return await self._flow(self._engine._diff_policy_versions, agent_id, before, after)

    async def rollback_policy(self, agent_id: str, version: int) -> int:
        """Make an old version live again as a new version; return the new version."""
        return await self._flow(self._engine._rollback_policy, agent_id, version)

    async def set_shadow_policy(
        self, agent_id: str, policy: AgentPolicy | Mapping[str, Any]
    ) -> ShadowPolicy:
        """Judge a candidate beside the live policy (:meth:`PolicyEngine.set_shadow_policy`)."""
        return await self._flow(self._engine._set_shadow_policy, agent_id, policy)

    async def get_shadow_policy(self, agent_id: str) -> ShadowPolicy | None:
        """The agent's shadow policy, or ``None``."""
        return await self._flow(self._engine._get_shadow_policy, agent_id)

    async def shadow_report(self, agent_id: str, limit: int = 100) -> ShadowReport:
        """What the shadow would have decided (:meth:`PolicyEngine.shadow_report`)."""
        return await self._flow(self._engine._shadow_report, agent_id, limit)

    async def promote_shadow_policy(
        self, agent_id: str, *, force: bool = False, set_at: datetime | None = None
    ) -> int:
        """Make the shadow the live policy; return the new version.

        Refused with ``SHADOW_OUTDATED`` when another version went live after
        the shadow was set, unless ``force`` (:meth:`PolicyEngine.promote_shadow_policy`).
        """
        return await self._flow(
            self._engine._promote_shadow_policy, agent_id, force=force, set_at=set_at
        )

    async def clear_shadow_policy(self, agent_id: str) -> ShadowReport:
        """Remove the shadow policy; return its last report."""
        return await self._flow(self._engine._clear_shadow_policy, agent_id)

    async def simulate(
        self,
        agent_id: str,
        candidate: AgentPolicy | Mapping[str, Any],
        *,
        since: datetime | timedelta,
    ) -> SimulationReport:
        """Replay recorded payments against a candidate (:meth:`PolicyEngine.simulate`)."""
        return await self._flow(self._engine._simulate, agent_id, candidate, since=since)

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
        return await self._flow(
            self._engine._delegate,
            parent_id,
            child_id,
            policy,
            expires_at=expires_at,
            by_parent=by_parent,
        )

    async def delegation(self, agent_id: str) -> Delegation | None:
        """How the agent's budget was delegated, or ``None``."""
        return await self._flow(self._engine._delegation, agent_id)

    async def revoke(self, agent_id: str, *, by: str | None = None) -> Delegation:
        """Revoke a delegated budget (:meth:`PolicyEngine.revoke`)."""
        return await self._flow(self._engine._revoke, agent_id, by=by)

    # -- payments -----------------------------------------------------------------------------

    async def authorize(
        self,
        request: PaymentRequest,
        *,
        dry_run: bool = False,
        requested_by: str | None = None,
        holder: str | None = None,
    ) -> Decision:
        """Decide a payment; hold its amount when allowed (:meth:`PolicyEngine.authorize`)."""
        return await self._flow(
            self._engine._authorize,
            request,
            dry_run=dry_run,
            requested_by=requested_by,
            holder=holder,
        )

    async def confirm(self, reservation_id: str, *, holder: str | None = None) -> Reservation:
        """Turn a reservation into spending (:meth:`PolicyEngine.confirm`)."""
        return await self._flow(self._engine._settle, reservation_id, "confirm", holder)

    async def release(self, reservation_id: str, *, holder: str | None = None) -> Reservation:
        """Give a reservation's budget back (:meth:`PolicyEngine.release`)."""
        return await self._flow(self._engine._settle, reservation_id, "release", holder)

    def payment(self, request: PaymentRequest, approval_id: str | None = None) -> AsyncPaymentGuard:
        """``async with aengine.payment(request) as p:`` runs the block only if allowed.

        See :class:`~agentpolicy.guard.AsyncPaymentGuard` and
        :meth:`PolicyEngine.payment`.
        """
        return AsyncPaymentGuard(self, request, approval_id)

    async def claim(self, reservation_id: str, holder: str) -> Reservation:
        """Take the right to make a reservation's payment (:meth:`PolicyEngine.claim`)."""
        return await self._flow(self._engine._claim, reservation_id, holder)

    async def mark_sent(self, reservation_id: str, *, holder: str | None = None) -> Reservation:
        """Say that a reservation's payment is leaving now (:meth:`PolicyEngine.mark_sent`)."""
        return await self._flow(self._engine._mark_sent, reservation_id, holder)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        """A reservation by id (``RESERVATION_NOT_FOUND`` if there is none)."""
        return await self._flow(self._engine._get_reservation, reservation_id)

    async def budget(self, agent_id: str, period: Period | str | None = None) -> Budget:
        """What the agent has spent, reserved and has left (:meth:`PolicyEngine.budget`)."""
        return await self._flow(self._engine._budget, agent_id, period)

    # -- approvals ----------------------------------------------------------------------------

    async def get_approval(self, approval_id: str) -> Approval:
        """An approval by id, with its expiry applied."""
        return await self._flow(self._engine._get_approval, approval_id)

    async def list_approvals(
        self, agent_id: str | None = None, *, expire: bool = True
    ) -> list[Approval]:
        """Pending approvals, oldest first (:meth:`PolicyEngine.list_approvals`)."""
        return await self._flow(self._engine._list_approvals, agent_id, expire=expire)

    async def open_reservations(self, limit: int = 100_000) -> int:
        """How many reservations and holds are open now (:meth:`PolicyEngine.open_reservations`)."""
        return await self._flow(self._engine._open_reservations, limit)

    async def decide(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None = None,
        *,
        signature: str | None = None,
        signed_at: datetime | None = None,
    ) -> Approval:
        """Submit an approver's ``"approve"`` or ``"deny"`` (:meth:`PolicyEngine.decide`)."""
        return await self._flow(
            self._engine._decide, approval_id, approver, decision, comment,
            signature=signature, signed_at=signed_at,
        )  # fmt: skip

    # -- approvers and links (docs/approvals.md) ----------------------------------------------

    async def register_approver(self, name: str, public_key: str) -> Approver:
        """Register an approver's public key (:meth:`PolicyEngine.register_approver`)."""
        return await self._flow(self._engine._register_approver, name, public_key)

    async def rotate_approver(self, name: str, public_key: str) -> Approver:
        """Give an approver a new key (:meth:`PolicyEngine.rotate_approver`)."""
        return await self._flow(self._engine._rotate_approver, name, public_key)

    async def remove_approver(self, name: str) -> Approver:
        """Retire an approver's key (:meth:`PolicyEngine.remove_approver`)."""
        return await self._flow(self._engine._remove_approver, name)

    async def get_approver(self, name: str) -> Approver | None:
        """A registered (or removed) approver, or ``None``."""
        return await self._flow(self._engine._get_approver, name)

    async def list_approvers(self) -> list[Approver]:
        """Every approver ever registered, by name."""
        return await self._flow(self._engine._list_approvers)

    async def store_id(self) -> str:
        """The store's id, which every signed vote names (:meth:`PolicyEngine.store_id`)."""
        return await self._flow(self._engine._store_id)

    async def vote_message(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        signed_at: datetime,
        comment: str | None = None,
    ) -> bytes:
        """The bytes an approver signs to vote (:meth:`PolicyEngine.vote_message`)."""
        return await self._flow(
            self._engine._vote_message, approval_id, approver, decision, signed_at, comment
        )

    async def approval_links(self, approval_id: str) -> list[ApprovalLink]:
        """An approval's one-time links (:meth:`PolicyEngine.approval_links`)."""
        return await self._flow(self._engine._approval_links, approval_id)

    async def inspect_link(self, token: str) -> tuple[ApprovalLink, Approval]:
        """What a link token would do, without redeeming it."""
        return await self._flow(self._engine._inspect_link, token)

    async def redeem_link(
        self, token: str, *, approval_id: str | None = None, comment: str | None = None
    ) -> Approval:
        """Cast the vote of a one-time link (:meth:`PolicyEngine.redeem_link`)."""
        return await self._flow(
            self._engine._redeem_link, token, approval_id=approval_id, comment=comment
        )

    # -- audit and housekeeping ---------------------------------------------------------------

    async def history(
        self, agent_id: str, limit: int = 100, *, version: int | None = None
    ) -> list[HistoryRecord]:
        """The agent's decisions and state changes, newest first."""
        return await self._flow(self._engine._history, agent_id, limit, version=version)

    async def sweep(self) -> SweepResult:
        """Apply every due expiry now; return what it expired."""
        return await self._flow(self._engine._sweep)

    async def flush_webhooks(self, timeout: float = 10.0) -> bool:
        """Wait (off the loop) until the webhook outbox is empty, or ``timeout`` seconds."""
        return await self._run(self._engine.flush_webhooks, timeout)

    async def webhook_deliveries(
        self, status: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Deliveries in the outbox, newest first."""
        return await self._run(self._engine.webhook_deliveries, status, limit)

    async def close(self) -> None:
        """Wait for calls in flight and background work, close the engine made here, stop threads.

        From the moment it is called, new calls raise ``STORAGE_UNAVAILABLE``.
        It waits for the calls in flight, for what the payment guard goes on
        with in the background after a cancellation (the release of what a
        cancelled entry reserved, a confirm or release whose task was
        cancelled; a release a cancelled block starts while it waits is
        waited for too), and for payment blocks under way to leave (their
        confirm or release is admitted; any other call they make, ``mark_sent``
        included, is refused, so no payment starts once closing began; a block
        not cancelled is waited for at most ``reservation_ttl``, and a wait
        past 5 s is logged on ``agentpolicy.aio``); only then does it close
        the stores. Closing again (or at the
        same time, from any task, even one whose payment block is cancelled)
        waits for the first close to end. A close() that is cancelled (a
        shutdown deadline) stops waiting, but the closing goes on: the
        background work is still admitted, then the stores are closed.
        """
        caller = asyncio.current_task()
        self._closing = True
        self._closers.add(caller)
        self._poke()  # a drain under way must not wait for this caller (nor for its block)
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close())
        try:
            await asyncio.shield(self._closer)
        finally:
            self._closers.discard(caller)
            self._poke()  # a caller that stopped waiting may be waited for again

    async def _close(self) -> None:
        """Drain, then close the stores and stop the threads (in a task of its own)."""
        try:
            await self._drain()
            self._closed = True
            try:
                if self._owns_astorage and self._astorage is not None:
                    await self._astorage.aclose()
                if self._owned:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._pool, self._engine.close)
            finally:
                self._pool.shutdown(wait=False)
        finally:
            self._closed = True

    async def _drain(self) -> None:
        """Wait until no call, background task or payment block of this engine is left.

        Background work may start more (an entry's authorize, once done, starts
        a release), so this looks again whenever anything it waits for ends.
        Tasks awaiting close() (and their blocks) are never waited for: they
        wait for this.
        """
        loop = asyncio.get_running_loop()
        bound = self._engine.reservation_ttl.total_seconds()
        deadline = loop.time() + bound
        warn_at: float | None = loop.time() + min(_WARN_AFTER, bound / 2)
        while True:
            skip = self._closers
            now = loop.time()
            waits: list[asyncio.Future[Any]] = [t for t in self._tasks if t not in skip]
            with self._running_lock:  # worker threads remove theirs meanwhile
                running = list(self._running)
            waits += [asyncio.wrap_future(f) for f in running]
            blocks = [
                left
                for task, left in self._blocks.values()
                if task is not None
                and task not in skip
                and not task.done()
                and (task.cancelling() or now < deadline)  # a block not cancelled: until its TTL
            ]
            if not waits and not blocks and not self._inflight:  # (native calls in flight)
                return
            timeout = None
            if blocks and warn_at is not None and now >= warn_at:
                warn_at = None
                _log.warning(
                    "agentpolicy: close() is waiting for %d payment block(s) under way, for at "
                    "most %g s (by then their reservations have expired); cancel or finish the "
                    "tasks that run them before closing the engine",
                    len(blocks),
                    bound,
                )
            if blocks:
                timeout = max(0.0, (deadline if warn_at is None else warn_at) - now)
            self._wake = wake = loop.create_future()
            try:
                await asyncio.wait(
                    [*waits, *blocks, wake], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self._wake = None

    async def __aenter__(self) -> AsyncPolicyEngine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _drive_in_thread(
    storage: Storage, make: Callable[..., Flow[_T]], /, *args: Any, **kwargs: Any
) -> _T:
    return drive(storage, make(*args, **kwargs))


def _check_async_storage(async_storage: object) -> None:
    if async_storage is not None and not isinstance(async_storage, AsyncStorage):
        raise PolicyValidationError.single(
            "$.asyncStorage", "must be an AsyncStorage (see open_async_storage)"
        )


def _check_same_store(storage: object, async_storage: AsyncStorage | None) -> None:
    """Refuse an async store that is certainly not ``storage``'s store (no I/O).

    Another kind of store, another Redis key prefix or another PostgreSQL
    schema is another store. Two clients that agree on those may still reach
    different servers: that is not checked (it would take a round trip of
    each client, and the sync one in a thread).
    """
    if async_storage is None:
        return
    why = None
    module = type(async_storage).__module__
    if module == "agentpolicy.storage.redis_async":  # redis is installed: imports are safe
        from agentpolicy.storage.redis import RedisStorage  # noqa: PLC0415 - the extra
        from agentpolicy.storage.redis_async import AsyncRedisStorage  # noqa: PLC0415

        assert isinstance(async_storage, AsyncRedisStorage)  # noqa: S101 - its module's class
        if not isinstance(storage, RedisStorage):
            why = "it is a Redis store, and the engine's storage is not"
        elif storage.key_prefix != async_storage.key_prefix:
            why = (f"its Redis key prefix is {async_storage.key_prefix!r}, the engine's "
                   f"storage's {storage.key_prefix!r}")  # fmt: skip
    elif module == "agentpolicy.storage.postgres_async":  # psycopg is installed
        from agentpolicy.storage.postgres import PostgresStorage  # noqa: PLC0415 - the extra
        from agentpolicy.storage.postgres_async import AsyncPostgresStorage  # noqa: PLC0415

        assert isinstance(async_storage, AsyncPostgresStorage)  # noqa: S101 - its module's class
        if not isinstance(storage, PostgresStorage):
            why = "it is a PostgreSQL store, and the engine's storage is not"
        elif storage.schema != async_storage.schema:
            why = (f"its PostgreSQL schema is {async_storage.schema}, the engine's storage's "
                   f"{storage.schema}")  # fmt: skip
    if why is not None:
        raise PolicyValidationError.single(
            "$.asyncStorage",
            f"must be an async client of the engine's own store: {why}. The calls would "
            "write to one store while webhook delivery, the outbox and the calls in threads "
            "use the other",
        )


def _check_workers(max_workers: object) -> None:
    if max_workers is not None:
        raise_if(check_int(max_workers, "$.maxWorkers", 1, 1024))
