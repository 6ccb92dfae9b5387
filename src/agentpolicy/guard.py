"""The payment guard: ``with engine.payment(request) as p:`` pays only what the policy allows.

Entering the block authorizes the payment (or, with ``approval_id``, takes
the reservation of an approved approval); a payment that is not allowed
raises :class:`PaymentDenied` and one that needs humans
:class:`ApprovalRequired`, so the block never runs for them. Leaving the
block normally confirms the reservation; leaving it with an exception (any
exception, ``KeyboardInterrupt`` and ``asyncio.CancelledError`` included)
releases it and lets the exception through.

A block that sends its payment marks it sent first (``p.mark_sent()``):
from then on an exception does not prove the payee was not paid, so the
guard leaves the reservation held instead of releasing it, and it counts
as spent when it expires unless released by whoever learns it was not
paid (``engine.release(p.reservation_id, holder=p.holder)``).

What the guard cannot know it says: when the block completed but the
confirm failed, the confirm's error is raised with a note saying that the
payment may have been made (docs/engine.md, "The payment guard").

The async guard lets a release or confirm go on in the background when its
task is cancelled; that work runs in tasks its
:class:`~agentpolicy.AsyncPolicyEngine` keeps, and the engine's ``close()``
waits for them before it closes the stores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from agentpolicy._checks import check_record_id, raise_if
from agentpolicy.decisions import Code, Decision
from agentpolicy.errors import ConflictError, ErrorCode, PolicyError, PolicyValidationError
from agentpolicy.records import Approval, ApprovalStatus, Reservation
from agentpolicy.requests import PaymentRequest

if TYPE_CHECKING:
    import asyncio

    from agentpolicy.aio import AsyncPolicyEngine
    from agentpolicy.engine import PolicyEngine

__all__ = [
    "ApprovalRequired",
    "AsyncPaymentGuard",
    "PaymentDenied",
    "PaymentGuard",
    "authorize_shielded",
    "settle_shielded",
]

_log = logging.getLogger("agentpolicy.guard")
_T = TypeVar("_T")


class PaymentDenied(PolicyError):  # noqa: N818 - a public name of the issue
    """The guard refused to run the payment block; ``decision`` says why.

    ``code`` is ``PAYMENT_DENIED`` when the policy denied the payment (then
    ``decision.code`` names the rule, such as ``DAILY_LIMIT``), or, when a
    payment resumed with ``approval_id`` cannot go ahead,
    ``APPROVAL_DENIED``, ``APPROVAL_EXPIRED``, ``RESERVATION_EXPIRED``,
    ``RESERVATION_RELEASED`` or ``RESERVATION_ALREADY_CONFIRMED``.
    ``approval`` is the approval, when one was involved. Nothing was paid
    and, for a denial, nothing is held.
    """

    code = ErrorCode.PAYMENT_DENIED

    def __init__(
        self,
        decision: Decision,
        message: str | None = None,
        *,
        code: ErrorCode | None = None,
        approval: Approval | None = None,
    ) -> None:
        self.decision = decision
        self.approval = approval
        super().__init__(message or f"{decision.code}: {decision.reason}", code=code)


class ApprovalRequired(PolicyError):  # noqa: N818 - a public name of the issue
    """The payment waits for humans: ``approval_id`` names the approval to decide.

    Its amount is held until the approval is decided or expires. Once it is
    approved, ``engine.payment(request, approval_id=err.approval_id)`` runs
    the block on the approval's reservation. ``decision`` is the decision
    (code ``APPROVAL_REQUIRED``); ``approval`` the approval when it was
    read (a resume of a still pending approval).
    """

    code = ErrorCode.APPROVAL_REQUIRED

    def __init__(self, decision: Decision, approval: Approval | None = None) -> None:
        self.decision = decision
        self.approval = approval
        self.approval_id: str = decision.approval_id or ""
        super().__init__(
            f"the payment needs approval {self.approval_id}: {decision.reason}; "
            "once approved, resume with engine.payment(request, approval_id=...)"
        )


# -- the rules of the guard (pure) ------------------------------------------------------------


def _check_arguments(request: object, approval_id: object) -> None:
    if not isinstance(request, PaymentRequest):
        raise PolicyValidationError.single("$.request", "must be a PaymentRequest")
    if approval_id is not None:
        raise_if(check_record_id(approval_id, "$.approvalId"))


def _admit(decision: Decision) -> None:
    """Raise unless ``decision`` lets the block run."""
    if decision.allowed and decision.reservation_id:
        return
    if decision.requires_approval and decision.approval_id:
        raise ApprovalRequired(decision)
    raise PaymentDenied(decision)


_REFUSED = {
    ErrorCode.RESERVATION_ALREADY_CONFIRMED: "confirmed",
    ErrorCode.RESERVATION_RELEASED: "released",
    ErrorCode.RESERVATION_EXPIRED: "expired",
    ErrorCode.RESERVATION_CLAIMED: "claimed by another payment block",
}


def _holder() -> str:
    """An opaque id of one guard, for claiming its reservation."""
    return "guard_" + os.urandom(12).hex()


def _refuse(decision: Decision, err: ConflictError) -> PaymentDenied:
    """The refusal of a reservation this block may not pay with.

    A decision answered again for a repeated idempotency key, or an approval
    resumed again, names a reservation that may already be settled, or that
    another block (in any process) is paying with right now: running the
    block would pay twice and count once.
    """
    state = _REFUSED.get(err.code)
    if state is None:
        raise err
    return PaymentDenied(
        decision,
        f"{err.code}: reservation {decision.reservation_id} is {state}: it was settled, or "
        "another block (the same idempotency key or approval) is paying with it; nothing "
        "runs again",
        code=err.code,
    )


def _same_payment(a: PaymentRequest, b: PaymentRequest) -> bool:
    def key(r: PaymentRequest) -> tuple[object, ...]:
        return (r.agent_id, r.amount, r.decimals, r.symbol.casefold(), r.recipient, r.network,
                r.category)  # fmt: skip

    return key(a) == key(b)


def _approval_decision(approval: Approval, request: PaymentRequest) -> Decision:
    """The state of an approval read on resume, as a decision; raise unless approved."""
    if not _same_payment(approval.request, request):
        raise PolicyValidationError.single(
            "$.approvalId",
            f"approval {approval.id} is for another payment "
            f"({approval.amount} to {approval.request.recipient}); resume with its request",
        )
    approvers = ", ".join(v.approver for v in approval.votes if v.decision == "approve")
    base: dict[str, Any] = {
        "approval_id": approval.id,
        "policy_version": approval.policy_version,
        "decided_at": approval.decided_at,
    }
    if approval.status is ApprovalStatus.APPROVED:
        reason = f"approved by {approvers}"
        return Decision(
            allowed=True, code=Code.ALLOWED, reason=reason, reservation_id=approval.hold_id, **base
        )
    if approval.status is ApprovalStatus.PENDING:
        reason = (
            f"approval {approval.id} is still pending "
            f"({approval.approvals} of {approval.required_approvers} approvals)"
        )
        code = None
    elif approval.status is ApprovalStatus.DENIED:
        deniers = ", ".join(v.approver for v in approval.votes if v.decision == "deny")
        reason = f"approval {approval.id} was denied by {deniers}"
        code = ErrorCode.APPROVAL_DENIED
    else:
        reason = (
            f"approval {approval.id} expired at {approval.expires_at.isoformat()} "
            "before enough approvers approved"
        )
        code = ErrorCode.APPROVAL_EXPIRED
    waiting = Decision(
        allowed=False,
        code=Code.APPROVAL_REQUIRED,
        reason=reason,
        requires_approval=True,
        expires_at=approval.expires_at,
        **base,
    )
    if code is None:
        raise ApprovalRequired(waiting, approval)
    raise PaymentDenied(waiting, f"{code}: {reason}", code=code, approval=approval)


def _note_unconfirmed(err: BaseException, reservation_id: str, holder: str, sent: bool) -> None:
    after = (
        "it was marked sent, so once it expires it counts as spent: do not count it again"
        if sent
        else "once it has expired its amount no longer counts: count the payment again "
        "(authorize and confirm it)"
    )
    err.add_note(
        f"agentpolicy: the payment block completed, so the payment may have been made, "
        f"but reservation {reservation_id} was not confirmed. Confirm it with "
        f"engine.confirm({reservation_id!r}, holder={holder!r}) (the block's claim on it) "
        f"before it expires; {after}; and raise reservation_ttl above the time a payment "
        "takes (docs/engine.md)."
    )


def _note_held(err: BaseException, reservation_id: str, holder: str) -> None:
    err.add_note(
        f"agentpolicy: the payment was marked sent, so it may have been made: reservation "
        f"{reservation_id} stays held and counts as spent when it expires. Confirm it "
        f"(engine.confirm({reservation_id!r}, holder={holder!r})) once you know it was paid, "
        "or release it (engine.release(...)) once you know it was not."
    )
    _log.warning("agentpolicy: payment of %s was sent and its block raised; held", reservation_id)


def _note_unreleased(err: BaseException, reservation_id: str, cause: BaseException) -> None:
    if isinstance(cause, ConflictError) and cause.code is ErrorCode.RESERVATION_ALREADY_CONFIRMED:
        err.add_note(
            f"agentpolicy: reservation {reservation_id} was not released: the payment was "
            "already confirmed (the block confirmed it before it raised), so it counts as "
            "spent; do not count it again"
        )
        return
    err.add_note(
        f"agentpolicy: reservation {reservation_id} could not be released ({cause}); "
        "it holds its amount until it expires (reservation_ttl)"
    )


class _Guard:
    """What both guards share: the request, and what entering decided."""

    def __init__(self, request: PaymentRequest, approval_id: str | None) -> None:
        _check_arguments(request, approval_id)
        self.request: PaymentRequest = request
        self.approval_id: str | None = approval_id
        self._decision: Decision | None = None
        self.approval: Approval | None = None
        """The approval the payment resumed (``approval_id`` given), once entered."""
        self.reservation: Reservation | None = None
        """The reservation as the block left it (confirmed or released), once exited."""
        self._used = False
        self._sent = False
        self._holder = _holder()

    @property
    def holder(self) -> str:
        """The id this block claims its reservation with: only it confirms or releases it."""
        return self._holder

    @property
    def decision(self) -> Decision:
        """The decision that let the block run (on resume: the approval's, as a decision)."""
        if self._decision is None:
            raise PolicyValidationError.single("$", "the payment block has not been entered")
        return self._decision

    @property
    def reservation_id(self) -> str:
        """The reservation that the block's payment confirms or releases."""
        rid = self.decision.reservation_id
        assert rid is not None  # noqa: S101 - _admit lets no decision without one through
        return rid

    def _start(self) -> None:
        if self._used:
            raise PolicyValidationError.single(
                "$", "a payment guard runs one block; call engine.payment(...) again"
            )
        self._used = True


class PaymentGuard(_Guard):
    """``with engine.payment(request) as p:``: the block runs only for an allowed payment.

    Made by :meth:`PolicyEngine.payment <agentpolicy.PolicyEngine.payment>`;
    entering authorizes (or resumes ``approval_id``), leaving confirms or
    releases. ``p.decision`` and ``p.reservation_id`` are set inside the
    block; ``p.reservation`` after it.
    """

    def __init__(
        self, engine: PolicyEngine, request: PaymentRequest, approval_id: str | None = None
    ) -> None:
        super().__init__(request, approval_id)
        self._engine = engine

    def __enter__(self) -> PaymentGuard:
        self._start()
        engine = self._engine
        if self.approval_id is None:
            decision = engine.authorize(self.request, holder=self._holder)
            _admit(decision)
            if self.request.idempotency_key is not None:  # may be an earlier decision again
                self._claim(decision)
        else:
            self.approval = engine.get_approval(self.approval_id)
            decision = _approval_decision(self.approval, self.request)
            reservation = self._claim(decision)
            decision = attrs.evolve(decision, expires_at=reservation.expires_at)
        self._decision = decision
        return self

    def _claim(self, decision: Decision) -> Reservation:
        try:
            return self._engine.claim(decision.reservation_id or "", self._holder)
        except ConflictError as err:
            raise _refuse(decision, err) from None

    def mark_sent(self) -> Reservation:
        """Say that the payment is leaving now (call it just before sending it).

        From then on an exception leaving the block holds the reservation
        (it counts as spent when it expires) instead of releasing it, since
        the payee may have been paid. See :meth:`PolicyEngine.mark_sent
        <agentpolicy.PolicyEngine.mark_sent>`.
        """
        reservation = self._engine.mark_sent(self.reservation_id, holder=self._holder)
        self._sent = True
        return reservation

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        rid = self.reservation_id
        if exc is None:
            try:
                self.reservation = self._engine.confirm(rid, holder=self._holder)
            except BaseException as err:
                _note_unconfirmed(err, rid, self._holder, self._sent)
                raise
            return
        if self._sent:
            _note_held(exc, rid, self._holder)
            return
        try:
            self.reservation = self._engine.release(rid, holder=self._holder)
        except Exception as err:  # the block's own exception matters more
            _note_unreleased(exc, rid, err)


_background: set[asyncio.Future[Any]] = set()
"""Work started without an engine to keep it (see :func:`_start`), kept alive until it ends."""


def _start(
    engine: AsyncPolicyEngine | None, call: Awaitable[_T], *, settling: bool
) -> asyncio.Future[_T]:
    """Run ``call`` in a task; the engine's, when there is one, so its close() waits for it.

    ``settling``: a confirm or release, which goes on while the engine closes.
    """
    if engine is not None:
        return engine._spawn(call, settling=settling)
    import asyncio  # noqa: PLC0415 - only async code pays for importing asyncio

    task = asyncio.ensure_future(call)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def _in_background(engine: AsyncPolicyEngine | None, make: Callable[[], Awaitable[Any]]) -> None:
    """Release what a cancelled entry reserved, in a task; log a failure."""

    async def run() -> None:
        try:
            await make()
        except Exception:
            _log.exception("agentpolicy: releasing a reservation after a cancelled entry failed")

    try:
        _start(engine, run(), settling=True)
    except Exception:  # the engine is closed already
        _log.exception("agentpolicy: releasing a reservation after a cancelled entry failed")


def _note_failed_after_cancel(done: asyncio.Future[Any]) -> None:
    """Log the failure of an authorize or claim let finish after its task was cancelled.

    A refusal reserved nothing; a failure whose outcome is unknown (the store
    did not answer) may have reserved, and that reservation, never marked
    sent, is given back at its TTL: the operator should know.
    """
    if not done.cancelled() and done.exception() is not None:
        _log.warning(
            "agentpolicy: a call let finish after its task was cancelled failed: %s "
            "(if it reserved anything, the amount is held until its TTL)",
            done.exception(),
        )


class AsyncPaymentGuard(_Guard):
    """``async with aengine.payment(request) as p:``: the guard of :class:`PaymentGuard`, async.

    Made by :meth:`AsyncPolicyEngine.payment <agentpolicy.AsyncPolicyEngine.payment>`.
    A task cancelled while entering still lets the authorize finish, then
    releases what it reserved; a confirm or release under way when the task
    is cancelled is carried out all the same (the cancellation goes on at
    once; the call completes in the background). That background work runs
    in tasks the engine keeps: ``await aengine.close()`` waits for it, and
    for a block whose task was cancelled to leave (and release), before it
    closes the stores.
    """

    def __init__(
        self, engine: AsyncPolicyEngine, request: PaymentRequest, approval_id: str | None = None
    ) -> None:
        super().__init__(request, approval_id)
        self._engine = engine

    async def __aenter__(self) -> AsyncPaymentGuard:
        self._start()
        engine = self._engine
        # a block under way from before its authorize: close() waits for it from then on, so it
        # cannot close the stores between the authorize and the block (whose payment would
        # then never be confirmed); a close() that began first refuses the authorize
        engine._enter_block(self)
        try:
            if self.approval_id is None:
                decision = await authorize_shielded(
                    engine.authorize(self.request, holder=self._holder),
                    self._give_back,
                    engine=engine,
                )
                _admit(decision)
                if self.request.idempotency_key is not None:
                    await self._claim(decision)
            else:
                self.approval = await engine.get_approval(self.approval_id)
                decision = _approval_decision(self.approval, self.request)
                reservation = await self._claim(decision)
                decision = attrs.evolve(decision, expires_at=reservation.expires_at)
        except BaseException:
            engine._leave_block(self)
            raise
        self._decision = decision
        return self

    async def _give_back(self, reservation_id: str) -> None:
        """Release what an entry cancelled during its authorize reserved.

        A repeated idempotency key answers the first decision again: its
        reservation may be another block's (claimed, paying right now) or
        settled already. That is not this entry's to give back, and the
        entry would not have run on it either (its claim is refused), so it
        is left as it is; only a reservation this block holds, or could
        have claimed, is released, as the entry would have after a claim.
        """
        engine, holder = self._engine, self._holder
        if self.request.idempotency_key is not None:
            try:
                await engine.claim(reservation_id, holder)
            except ConflictError:
                return
        await engine.release(reservation_id, holder=holder)

    async def _claim(self, decision: Decision) -> Reservation:
        """Claim the reservation; if the task is cancelled meanwhile, release what it claimed.

        The claim is let finish (it may already be in the store); once it is
        this block's, a cancelled entry gives the budget back in the
        background rather than leaving it claimed by no one until the TTL.
        """
        rid, holder, engine = decision.reservation_id or "", self._holder, self._engine
        try:
            # admitted while the engine closes, as a confirm is: the block entered before close()
            # began (else its authorize or get_approval was refused), so close() waits for it
            return await _undone_if_cancelled(
                engine.claim(rid, holder),
                lambda _: engine.release(rid, holder=holder),
                engine=engine,
                settling=True,
            )
        except ConflictError as err:
            raise _refuse(decision, err) from None

    async def mark_sent(self) -> Reservation:
        """Say that the payment is leaving now (see :meth:`PaymentGuard.mark_sent`)."""
        reservation = await self._engine.mark_sent(self.reservation_id, holder=self._holder)
        self._sent = True
        return reservation

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._leave(exc)
        finally:
            self._engine._leave_block(self)

    async def _leave(self, exc: BaseException | None) -> None:
        import asyncio  # noqa: PLC0415 - only async code pays for importing asyncio

        rid, engine = self.reservation_id, self._engine
        if exc is None:
            try:
                self.reservation = await settle_shielded(
                    engine.confirm(rid, holder=self._holder), engine=engine
                )
            except asyncio.CancelledError:
                raise  # the confirm goes on; a failure of it is logged
            except BaseException as err:
                _note_unconfirmed(err, rid, self._holder, self._sent)
                raise
            return
        if self._sent:
            _note_held(exc, rid, self._holder)
            return
        try:
            self.reservation = await settle_shielded(
                engine.release(rid, holder=self._holder), engine=engine
            )
        except Exception as err:
            _note_unreleased(exc, rid, err)


async def settle_shielded(call: Awaitable[_T], *, engine: AsyncPolicyEngine | None = None) -> _T:
    """Await a confirm or release; if the task is cancelled meanwhile, let it finish regardless.

    The cancellation is raised once the call is handed over; a failure of
    the call after that is logged (``agentpolicy.guard``). Given the
    ``engine`` the call is made on, the call runs in a task of that engine:
    its ``close()`` waits for it (and lets it reach the store while it
    closes) before closing the stores.
    """
    import asyncio  # noqa: PLC0415 - only async code pays for importing asyncio

    task = _start(engine, call, settling=True)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def report(done: asyncio.Future[_T]) -> None:
            if not done.cancelled() and done.exception() is not None:
                _log.error(
                    "agentpolicy: a confirm or release that went on after its task was "
                    "cancelled failed: %s",
                    done.exception(),
                )

        task.add_done_callback(report)
        raise


async def authorize_shielded(
    authorize: Awaitable[Decision],
    release: Callable[[str], Awaitable[Any]],
    *,
    engine: AsyncPolicyEngine | None = None,
) -> Decision:
    """Await an authorize; if the task is cancelled meanwhile, release what it reserves.

    The authorize is let finish (it may already be in the store); when it
    allowed the payment, ``release(reservation_id)`` runs in the background,
    so a cancelled caller never leaves budget held until the TTL. Given the
    ``engine`` both are made on, they run in tasks of that engine, and its
    ``close()`` waits for them (the release too, when the authorize ends
    while the engine closes) before closing the stores.
    """
    return await _undone_if_cancelled(
        authorize,
        lambda d: release(d.reservation_id or ""),
        needed=lambda d: d.allowed and d.reservation_id is not None,
        engine=engine,
    )


async def _undone_if_cancelled(
    call: Awaitable[_T],
    undo: Callable[[_T], Awaitable[Any]],
    needed: Callable[[_T], bool] = lambda _: True,
    *,
    engine: AsyncPolicyEngine | None = None,
    settling: bool = False,
) -> _T:
    """Await ``call``; if the caller is cancelled meanwhile, let it finish, then undo it.

    Once the call has succeeded after all, ``undo(result)`` runs in the
    background (when ``needed(result)``). The undo is started by the call's
    own task as it ends, so an engine closing meanwhile sees it before that
    task is over, and waits for it. ``settling``: the call is admitted while
    the engine closes (see :func:`_start`).
    """
    import asyncio  # noqa: PLC0415 - only async code pays for importing asyncio

    cancelled = False

    async def call_then_undo() -> _T:
        result = await call
        if cancelled and needed(result):
            _in_background(engine, lambda: undo(result))
        return result

    task = _start(engine, call_then_undo(), settling=settling)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            cancelled = True  # the task undoes the call once it has ended
            task.add_done_callback(_note_failed_after_cancel)
        elif not task.cancelled() and task.exception() is None and needed(task.result()):
            result = task.result()
            _in_background(engine, lambda: undo(result))
        raise
