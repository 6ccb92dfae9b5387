"""The payment guard: ``with engine.payment(request) as p`` and ``async with`` on AsyncPolicyEngine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from agentpolicy import (
    ApprovalRequired,
    AsyncPolicyEngine,
    Code,
    ConflictError,
    ErrorCode,
    NotFoundError,
    PaymentDenied,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
    ReservationStatus,
    StorageUnavailableError,
)
from agentpolicy.storage import open_async_storage
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend
from tests.faulty import FaultyStorage

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
APPROVALS = {
    "limits": {"daily": {"value": str(1000 * USDT)}},
    "approvalConfig": {
        "thresholds": [{"amount": {"value": str(100 * USDT)}, "requiredApprovers": 1,
                        "approvers": ["admin@company.com"]}],
        "timeout": 3_600_000,
    },
}  # fmt: skip


def make(policy: dict[str, Any] = DAILY_100, **kw: Any) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock()
    engine = PolicyEngine(clock=clock, **kw)
    engine.set_policy("agent-1", policy)
    return engine, clock


def daily(engine: PolicyEngine) -> tuple[int, int]:
    w = engine.budget("agent-1").periods
    window = next(iter(w.values()))
    return window.spent.value, window.reserved.value


# --- the sync guard ---------------------------------------------------------------------------


def test_an_allowed_block_runs_once_and_is_confirmed() -> None:
    engine, _ = make()
    ran = []
    with engine.payment(payment(30 * USDT)) as p:
        assert p.decision.allowed
        assert p.reservation_id == p.decision.reservation_id
        assert daily(engine) == (0, 30 * USDT)  # held while the block runs
        ran.append(p.reservation_id)
    assert daily(engine) == (30 * USDT, 0)
    assert p.reservation is not None
    assert p.reservation.status is ReservationStatus.CONFIRMED
    assert ran == [p.reservation_id]
    assert [h.event for h in engine.history("agent-1", 3)] == ["confirm", "decision", "policy_set"]


def test_a_denied_payment_raises_payment_denied_and_the_block_never_runs() -> None:
    engine, _ = make()
    ran = []
    with pytest.raises(PaymentDenied) as err, engine.payment(payment(101 * USDT)):
        ran.append(1)
    assert ran == []
    assert err.value.code == ErrorCode.PAYMENT_DENIED
    assert err.value.decision.code == Code.DAILY_LIMIT
    assert err.value.decision.reservation_id is None
    assert str(err.value).startswith("DAILY_LIMIT: ")
    assert isinstance(err.value, PolicyError)
    assert err.value.to_dict()["code"] == "PAYMENT_DENIED"
    assert daily(engine) == (0, 0)


@pytest.mark.parametrize("error", [ValueError("the seller refused"), KeyboardInterrupt()])
def test_an_exception_in_the_block_releases_and_goes_on(error: BaseException) -> None:
    engine, _ = make()
    with pytest.raises(type(error)) as raised, engine.payment(payment(30 * USDT)) as p:
        raise error
    assert raised.value is error
    assert p.reservation is not None
    assert p.reservation.status is ReservationStatus.RELEASED
    assert daily(engine) == (0, 0)


def test_approval_required_then_resume_once_approved_and_never_twice() -> None:
    engine, _ = make(APPROVALS)
    request = payment(150 * USDT)
    with pytest.raises(ApprovalRequired) as err, engine.payment(request):
        pytest.fail("the block must not run before approval")
    approval_id = err.value.approval_id
    assert approval_id == err.value.decision.approval_id
    assert err.value.code == ErrorCode.APPROVAL_REQUIRED
    assert daily(engine) == (0, 150 * USDT)  # held while humans decide
    with pytest.raises(ApprovalRequired) as again, engine.payment(request, approval_id=approval_id):
        pytest.fail("still pending")
    assert again.value.approval_id == approval_id
    assert again.value.approval is not None
    engine.decide(approval_id, "admin@company.com", "approve")
    with engine.payment(request, approval_id=approval_id) as p:
        assert p.decision.allowed
        assert p.approval is not None
        assert p.reservation_id == p.approval.reservation_id
        assert p.decision.expires_at is not None
    assert daily(engine) == (150 * USDT, 0)
    with (
        pytest.raises(PaymentDenied) as twice,
        engine.payment(request, approval_id=approval_id),
    ):
        pytest.fail("an approval pays once")
    assert twice.value.code == ErrorCode.RESERVATION_ALREADY_CONFIRMED
    assert daily(engine) == (150 * USDT, 0)


def test_an_approval_a_block_asked_for_is_settled_only_by_the_block_that_resumes_it(
    backend: Backend,
) -> None:
    """Between approval and resume the agent reads the reservation id, but cannot settle it."""
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", APPROVALS)
    request = payment(150 * USDT, agent_id="agent-1")
    with pytest.raises(ApprovalRequired) as err, engine.payment(request):
        pytest.fail("the block must not run before approval")
    aid = err.value.approval_id
    rid = engine.decide(aid, "admin@company.com", "approve").reservation_id or ""
    for settle in (engine.release, engine.confirm):  # e.g. the agent's own MCP tools
        with pytest.raises(ConflictError) as refused:
            settle(rid)
        assert refused.value.code == ErrorCode.RESERVATION_CLAIMED
    with engine.payment(request, approval_id=aid) as p:  # a new block, in any process
        assert p.reservation_id == rid
    assert engine.get_reservation(rid).status == "confirmed"
    plain = engine.authorize(payment(150 * USDT, agent_id="agent-1"))  # asked for outside a block
    unblocked = engine.decide(plain.approval_id or "", "admin@company.com", "approve")
    assert engine.release(unblocked.reservation_id or "").status == "released"


def test_resuming_a_denied_or_expired_approval_is_payment_denied_with_its_code() -> None:
    engine, clock = make(APPROVALS)
    request = payment(150 * USDT)
    denied = engine.authorize(request).approval_id
    lapsed = engine.authorize(request).approval_id
    assert denied
    assert lapsed
    engine.decide(denied, "admin@company.com", "deny", "no")
    with pytest.raises(PaymentDenied) as err, engine.payment(request, approval_id=denied):
        pytest.fail("denied")
    assert err.value.code == ErrorCode.APPROVAL_DENIED
    assert err.value.approval is not None
    assert "admin@company.com" in str(err.value)
    clock.advance(hours=1)
    with pytest.raises(PaymentDenied) as err, engine.payment(request, approval_id=lapsed):
        pytest.fail("expired")
    assert err.value.code == ErrorCode.APPROVAL_EXPIRED
    assert daily(engine) == (0, 0)


def test_resuming_after_the_approved_reservation_expired_is_reservation_expired() -> None:
    engine, clock = make(APPROVALS, reservation_ttl=timedelta(minutes=2))
    request = payment(150 * USDT)
    aid = engine.authorize(request).approval_id
    assert aid
    engine.decide(aid, "admin@company.com", "approve")
    clock.advance(minutes=2)
    with pytest.raises(PaymentDenied) as err, engine.payment(request, approval_id=aid):
        pytest.fail("expired")
    assert err.value.code == ErrorCode.RESERVATION_EXPIRED


def test_resuming_with_another_payment_than_the_approved_one_is_refused() -> None:
    engine, _ = make(APPROVALS)
    aid = engine.authorize(payment(150 * USDT)).approval_id
    assert aid
    engine.decide(aid, "admin@company.com", "approve")
    with (
        pytest.raises(PolicyValidationError) as err,
        engine.payment(payment(900 * USDT), approval_id=aid),
    ):
        pytest.fail("another amount")
    assert err.value.path == "$.approvalId"
    assert engine.get_reservation(engine.get_approval(aid).hold_id).status is (
        ReservationStatus.RESERVED
    )


def test_a_repeated_idempotency_key_never_runs_a_settled_payment_again() -> None:
    engine, _ = make()
    with engine.payment(payment(30 * USDT, idempotency_key="order-1")):
        pass
    with (
        pytest.raises(PaymentDenied) as err,
        engine.payment(payment(30 * USDT, idempotency_key="order-1")),
    ):
        pytest.fail("paid twice")
    assert err.value.code == ErrorCode.RESERVATION_ALREADY_CONFIRMED
    with (
        pytest.raises(RuntimeError),
        engine.payment(payment(20 * USDT, idempotency_key="order-2")),
    ):
        raise RuntimeError("failed")
    with (
        pytest.raises(PaymentDenied) as err,
        engine.payment(payment(20 * USDT, idempotency_key="order-2")),
    ):
        pytest.fail("released")
    assert err.value.code == ErrorCode.RESERVATION_RELEASED
    assert daily(engine) == (30 * USDT, 0)


def test_a_confirm_that_fails_after_the_block_raises_its_error_with_what_to_do() -> None:
    store = FaultyStorage()
    clock = ManualClock()
    engine = PolicyEngine(storage=store, clock=clock)  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)
    with pytest.raises(StorageUnavailableError) as err, engine.payment(payment(30 * USDT)) as p:
        store.down = True  # the payment goes through; then the store is unreachable
    notes = "\n".join(err.value.__notes__)
    assert p.reservation_id in notes
    assert "may have been made" in notes
    store.down = False
    assert daily(engine) == (0, 30 * USDT)  # still held until its TTL
    assert f"holder={p.holder!r}" in notes
    with pytest.raises(ConflictError):  # the block's claim stands: only it settles
        engine.confirm(p.reservation_id)
    engine.confirm(p.reservation_id, holder=p.holder)  # what the note says to do
    assert daily(engine) == (30 * USDT, 0)


def test_a_block_that_outlives_its_reservation_gets_reservation_expired() -> None:
    engine, clock = make(reservation_ttl=timedelta(minutes=1))
    with pytest.raises(ConflictError) as err, engine.payment(payment(30 * USDT)):
        clock.advance(minutes=1)  # a slow payment
    assert err.value.code == ErrorCode.RESERVATION_EXPIRED
    assert "may have been made" in "\n".join(err.value.__notes__)
    assert daily(engine) == (0, 0)  # no longer counted: the note says to count it again


def test_a_release_that_fails_keeps_the_blocks_own_exception() -> None:
    store = FaultyStorage()
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)

    def fail() -> None:
        store.down = True
        raise ValueError("seller down")

    with pytest.raises(ValueError, match="seller") as err, engine.payment(payment(30 * USDT)):
        fail()
    assert "could not be released" in "\n".join(err.value.__notes__)


def test_bad_arguments_and_misuse_are_invalid_input() -> None:
    engine, _ = make()
    with pytest.raises(PolicyValidationError):
        engine.payment({"agentId": "agent-1"})  # type: ignore[arg-type]
    with pytest.raises(PolicyValidationError):
        engine.payment(payment(1), approval_id="")
    guard = engine.payment(payment(1))
    with pytest.raises(PolicyValidationError):
        guard.decision  # noqa: B018 - not entered yet
    with guard:
        pass
    with pytest.raises(PolicyValidationError), guard:
        pass
    assert daily(engine) == (1, 0)


def test_threads_on_two_engines_sharing_a_sqlite_file_run_exactly_the_allowed_blocks(
    tmp_path: Any,
) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    clock = ManualClock()
    engines = [PolicyEngine(storage=url, clock=clock) for _ in range(2)]
    engines[0].set_policy("agent-1", {"limits": {"daily": {"value": str(5 * USDT)}}})
    ran: list[str] = []
    denied: list[str] = []
    start = threading.Barrier(8)

    def pay(i: int) -> None:
        start.wait()
        try:
            with engines[i % 2].payment(payment(USDT)) as p:
                ran.append(p.reservation_id)
        except PaymentDenied as err:
            denied.append(err.decision.code)

    threads = [threading.Thread(target=pay, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(ran), len(set(ran)), denied) == (5, 5, ["DAILY_LIMIT"] * 3)
    assert daily(engines[1]) == (5 * USDT, 0)
    for e in engines:
        e.close()


# --- the async guard --------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_async_guard_confirms_denies_and_releases() -> None:
    engine, _ = make()

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            async with aengine.payment(payment(60 * USDT)) as p:
                assert p.decision.allowed
            assert p.reservation is not None
            assert p.reservation.status is ReservationStatus.CONFIRMED
            with pytest.raises(PaymentDenied) as err:
                async with aengine.payment(payment(60 * USDT)):
                    pytest.fail("denied")
            assert err.value.decision.code == Code.DAILY_LIMIT
            with pytest.raises(asyncio.CancelledError):
                async with aengine.payment(payment(10 * USDT)) as q:
                    raise asyncio.CancelledError
            assert q.reservation is not None
            assert q.reservation.status is ReservationStatus.RELEASED

    run(main())
    assert daily(engine) == (60 * USDT, 0)


def test_async_guard_resumes_an_approval() -> None:
    engine, _ = make(APPROVALS)

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        request = payment(150 * USDT)
        with pytest.raises(ApprovalRequired) as err:
            async with aengine.payment(request):
                pytest.fail("needs approval")
        await aengine.decide(err.value.approval_id, "admin@company.com", "approve")
        async with aengine.payment(request, approval_id=err.value.approval_id) as p:
            assert p.approval is not None
        await aengine.close()

    run(main())
    assert daily(engine) == (150 * USDT, 0)


def test_a_task_cancelled_while_entering_releases_what_the_authorize_reserved() -> None:
    store = FaultyStorage()
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            ran = []

            async def pay() -> None:
                async with aengine.payment(payment(30 * USDT)):
                    ran.append(1)

            store.stall()
            task = asyncio.create_task(pay())
            await asyncio.get_running_loop().run_in_executor(None, store.stalled.wait, 10)
            task.cancel()  # the authorize is in the store: it will still commit
            store.resume()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 30  # the release runs in the background: wait for it
            while [h.event for h in await aengine.history("agent-1", 1)] != ["release"]:
                assert time.monotonic() < deadline, "the background release never ran"
                await asyncio.sleep(0.001)
            assert ran == []

    run(main())
    assert daily(engine) == (0, 0)
    assert [h.event for h in engine.history("agent-1", 2)] == ["release", "decision"]


def test_an_authorize_that_fails_after_its_task_was_cancelled_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store went down under a cancelled entry's authorize: that was silent."""
    store = FaultyStorage()
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:

            async def pay() -> None:
                async with aengine.payment(payment(30 * USDT)):
                    pytest.fail("the block must not run")

            store.stall()
            task = asyncio.create_task(pay())
            await asyncio.get_running_loop().run_in_executor(None, store.stalled.wait, 10)
            task.cancel()
            store.down = True  # the authorize the store was holding fails
            store.resume()
            with pytest.raises(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.WARNING, logger="agentpolicy.guard"):
        run(main())  # close() waits for the authorize to end
    assert any(
        "after its task was cancelled failed" in r.getMessage()
        and "store is down" in r.getMessage()
        for r in caplog.records
    ), caplog.records


def test_a_task_cancelled_while_claiming_a_resumed_approval_releases_what_it_claimed() -> None:
    engine, _ = make(APPROVALS)
    request = payment(150 * USDT)
    with pytest.raises(ApprovalRequired) as err, engine.payment(request):
        pytest.fail("the block must not run before approval")
    aid = err.value.approval_id
    engine.decide(aid, "admin@company.com", "approve")

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            claiming, go = asyncio.Event(), asyncio.Event()
            real_claim = aengine.claim

            async def slow_claim(rid: str, holder: str) -> Any:
                claiming.set()
                await go.wait()  # the claim is on its way to the store
                return await real_claim(rid, holder)

            aengine.claim = slow_claim  # type: ignore[method-assign]

            async def pay() -> None:
                async with aengine.payment(request, approval_id=aid):
                    pytest.fail("a cancelled entry never runs the block")

            task = asyncio.create_task(pay())
            await claiming.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go.set()  # the claim completes after the cancellation: its budget is given back
            deadline = time.monotonic() + 30
            while [h.event for h in await aengine.history("agent-1", 1)] != ["release"]:
                assert time.monotonic() < deadline, "the claim was never given back"
                await asyncio.sleep(0.001)

    run(main())
    assert daily(engine) == (0, 0)


def test_a_task_cancelled_during_the_confirm_still_confirms() -> None:
    store = FaultyStorage()
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        # one worker, kept busy by a stalled call: the confirm waits in the queue
        async with AsyncPolicyEngine.from_engine(engine, max_workers=1) as aengine:
            entered = asyncio.Event()
            busy: list[asyncio.Task[Any]] = []

            async def pay() -> None:
                async with aengine.payment(payment(30 * USDT)):
                    store.stall()
                    busy.append(asyncio.create_task(aengine.budget("agent-1")))
                    await asyncio.get_running_loop().run_in_executor(None, store.stalled.wait, 10)
                    entered.set()

            task = asyncio.create_task(pay())
            await entered.wait()
            task.cancel()  # while its confirm waits for the worker
            store.resume()
            with pytest.raises(asyncio.CancelledError):
                await task
            await busy[0]

    run(main())  # closing the async engine waits for the confirm
    assert daily(engine) == (30 * USDT, 0)


def test_a_reservation_is_claimed_by_one_holder_and_closed_ones_cannot_be(
    backend: Backend,
) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * USDT)}}})
    d = engine.authorize(payment(USDT, agent_id="agent-1"))
    rid = d.reservation_id or ""
    assert engine.claim(rid, "one").status == "reserved"
    assert engine.claim(rid, "one").status == "reserved"  # again, by the same holder
    with pytest.raises(ConflictError) as taken:
        engine.claim(rid, "two")
    assert taken.value.code == ErrorCode.RESERVATION_CLAIMED
    for settle in (engine.confirm, engine.release):  # only the holder settles it
        with pytest.raises(ConflictError) as other:
            settle(rid)
        assert other.value.code == ErrorCode.RESERVATION_CLAIMED
    engine.confirm(rid, holder="one")
    with pytest.raises(ConflictError) as done:
        engine.claim(rid, "one")
    assert done.value.code == ErrorCode.RESERVATION_ALREADY_CONFIRMED
    with pytest.raises(NotFoundError):
        engine.claim("res_" + "0" * 32 + "_agent-1", "one")


def test_authorize_with_a_holder_claims_the_reservation_as_it_is_made(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * USDT)}}})
    rid = engine.authorize(payment(USDT, agent_id="agent-1"), holder="one").reservation_id or ""
    with pytest.raises(ConflictError) as taken:
        engine.claim(rid, "two")
    assert taken.value.code == ErrorCode.RESERVATION_CLAIMED
    with pytest.raises(ConflictError) as other:
        engine.release(rid)
    assert other.value.code == ErrorCode.RESERVATION_CLAIMED
    assert engine.release(rid, holder="one").status == "released"
    with pytest.raises(PolicyValidationError) as bad:
        engine.authorize(payment(USDT, agent_id="agent-1"), holder=" x")
    assert [p.path for p in bad.value.problems] == ["$.holder"]


def test_a_claimed_reservation_expired_is_released_by_anyone(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * USDT)}}})
    rid = engine.authorize(payment(USDT, agent_id="agent-1")).reservation_id or ""
    engine.claim(rid, "one")
    clock.advance(timedelta(hours=1))  # past the TTL: the holder's outcome no longer counts
    assert engine.release(rid).status == "expired"


@pytest.mark.parametrize("key", [None, "order-9"])
def test_the_agent_cannot_release_a_payment_a_guarded_block_is_making(
    backend: Backend, key: str | None
) -> None:
    """With or without an idempotency key: the id may be seen (history, pages) by the agent."""
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * USDT)}}})
    request = payment(60 * USDT, agent_id="agent-1", idempotency_key=key)
    with engine.payment(request) as p:
        for settle in (engine.release, engine.confirm):  # e.g. the agent's own MCP tools
            with pytest.raises(ConflictError) as refused:
                settle(p.reservation_id)
            assert refused.value.code == ErrorCode.RESERVATION_CLAIMED
        again = engine.authorize(payment(60 * USDT, agent_id="agent-1"))
        assert again.code is Code.DAILY_LIMIT  # the 60 still count while the block pays
    assert engine.get_reservation(p.reservation_id).status == "confirmed"


@pytest.mark.parametrize("key", [None, "order-10"])
def test_the_async_guard_settles_its_claimed_reservation(key: str | None) -> None:
    engine, _ = make()
    request = payment(60 * USDT, idempotency_key=key)

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            async with aengine.payment(request) as p:
                with pytest.raises(ConflictError) as refused:
                    await aengine.release(p.reservation_id)
                assert refused.value.code == ErrorCode.RESERVATION_CLAIMED
            assert p.reservation is not None
            assert p.reservation.status is ReservationStatus.CONFIRMED

    run(main())


def test_a_repeated_idempotency_key_in_two_blocks_at_once_runs_one_block(
    backend: Backend,
) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * USDT)}}})
    request = payment(USDT, agent_id="agent-1", idempotency_key="order-7")
    with engine.payment(request) as first:
        with pytest.raises(PaymentDenied) as second, engine.payment(request):
            pytest.fail("the same payment ran twice")
        assert second.value.code == ErrorCode.RESERVATION_CLAIMED
        assert first.reservation_id == second.value.decision.reservation_id
    assert engine.get_reservation(first.reservation_id).status == "confirmed"


def test_a_block_that_confirmed_and_then_raised_says_the_payment_counts_as_spent() -> None:
    engine, _ = make()

    def pay_then_fail(p: Any) -> None:
        engine.confirm(p.reservation_id, holder=p.holder)  # the block settled it itself
        raise ValueError("after paying")

    with (
        pytest.raises(ValueError, match="after paying") as err,
        engine.payment(payment(30 * USDT)) as p,
    ):
        pay_then_fail(p)
    notes = "\n".join(err.value.__notes__)
    assert "already confirmed" in notes
    assert "counts as spent" in notes
    assert "until it expires" not in notes  # it does not: it is spending
    assert daily(engine) == (30 * USDT, 0)

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:

            async def pay_then_fail() -> None:
                async with aengine.payment(payment(20 * USDT)) as q:
                    await aengine.confirm(q.reservation_id, holder=q.holder)
                    raise ValueError("after paying")

            with pytest.raises(ValueError, match="after paying") as err:
                await pay_then_fail()
            notes = "\n".join(err.value.__notes__)
            assert "already confirmed" in notes
            assert "counts as spent" in notes

    run(main())
    assert daily(engine) == (50 * USDT, 0)


NATIVE = {"redis", "redis-cluster", "postgres"}


def async_engine_on(backend: Backend, clock: ManualClock) -> AsyncPolicyEngine:
    """An async engine that owns its own stores on ``backend`` (natively where it can)."""
    if backend.name in NATIVE:
        assert backend.spec is not None
        url, prefix = backend.spec
        return AsyncPolicyEngine(
            storage=backend.open(),
            clock=clock,
            async_storage=open_async_storage(url, key_prefix=prefix),
        )
    return AsyncPolicyEngine(storage=backend.open(), clock=clock)


@pytest.mark.parametrize("when", ["in the block", "while releasing"])
def test_closing_right_after_a_cancelled_block_leaves_nothing_reserved(
    backend: Backend, when: str
) -> None:
    """close() waits for the release a cancelled block goes on with, then closes the stores.

    ``in the block``: the task is cancelled and the engine closed at once,
    before the block has even left. ``while releasing``: the task is
    cancelled again while its release is under way, so the release goes on
    in the background; the engine is closed before it reaches the store.
    """
    clock = ManualClock()
    backend.engine(clock).set_policy("agent-1", DAILY_100)

    async def main() -> None:
        aengine = async_engine_on(backend, clock)
        assert aengine.native is (backend.name in NATIVE)
        entered, releasing, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        real_release = aengine.release

        async def gated_release(rid: str, *, holder: str | None = None) -> Any:
            releasing.set()
            await go.wait()
            return await real_release(rid, holder=holder)

        async def pay() -> None:
            async with aengine.payment(payment(30 * USDT, agent_id="agent-1")):
                entered.set()
                await asyncio.Event().wait()  # paying: until cancelled

        task = asyncio.create_task(pay())
        await entered.wait()
        if when == "in the block":
            task.cancel()
            await aengine.close()  # the cancelled block has not left yet
        else:
            aengine.release = gated_release  # type: ignore[method-assign]
            task.cancel()
            await releasing.wait()
            task.cancel()  # again: the release goes on in the background
            with pytest.raises(asyncio.CancelledError):
                await task
            closing = asyncio.create_task(aengine.close())
            await asyncio.sleep(0)  # a yield, no time: close() begins
            with pytest.raises(StorageUnavailableError):
                await aengine.budget("agent-1")  # closing: new calls are refused
            go.set()  # the release reaches the store only now
            await closing
        assert task.done()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    fresh = backend.engine(clock)
    window = next(iter(fresh.budget("agent-1").periods.values()))
    assert (window.spent.value, window.reserved.value) == (0, 0)
    assert [h.event for h in fresh.history("agent-1", 2)] == ["release", "decision"]
