"""AsyncPolicyEngine: the same interface as PolicyEngine, off the event loop, closed with it."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from datetime import timedelta
from typing import Any

import pytest

from agentpolicy import (
    AsyncPolicyEngine,
    ErrorCode,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
)
from agentpolicy.guard import AsyncPaymentGuard, settle_shielded
from agentpolicy.testing import ManualClock, payment
from tests.faulty import FaultyStorage

DAILY_100 = {"limits": {"daily": {"value": "100000000"}}}


def public_methods(cls: type) -> dict[str, Any]:
    """Public functions of a class and its bases (PolicyEngine has Voting's), the nearest first."""
    found: dict[str, Any] = {}
    for base in cls.__mro__[:-1]:
        for n, m in vars(base).items():
            if not n.startswith("_") and inspect.isfunction(m):
                found.setdefault(n, m)
    return found


def shape(method: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def test_every_public_method_of_policy_engine_is_a_coroutine_with_the_same_arguments() -> None:
    sync = public_methods(PolicyEngine)
    aio = public_methods(AsyncPolicyEngine)
    missing = sorted(set(sync) - set(aio))
    assert not missing, f"AsyncPolicyEngine lacks {missing}"
    for name, method in sync.items():
        assert shape(aio[name]) == shape(method), name
        if name == "payment":  # used as `async with`
            assert not inspect.iscoroutinefunction(aio[name])
        else:
            assert inspect.iscoroutinefunction(aio[name]), f"{name} is not a coroutine"


def test_the_constructor_takes_every_argument_of_policy_engine() -> None:
    sync = shape(PolicyEngine.__init__)
    assert shape(AsyncPolicyEngine.__init__)[: len(sync)] == sync


def test_the_event_loop_keeps_running_while_a_call_waits_on_a_stalled_store() -> None:
    store = FaultyStorage(limit=10)
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)
    ticks = 0

    async def main() -> None:
        nonlocal ticks
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            store.stall()
            call = asyncio.create_task(aengine.authorize(payment(1, agent_id="agent-1")))
            # the store answers only after the loop has ticked 100 times while the
            # authorize waits in it: a call that blocked the loop would never return
            # (the stall would fail the call after 10 s)
            while not store.stalled.is_set():
                await asyncio.sleep(0)
            while ticks < 100:
                ticks += 1
                await asyncio.sleep(0)
                assert not call.done()
            store.resume()
            assert (await call).allowed

    asyncio.run(main())
    assert ticks == 100
    engine.close()


def test_close_waits_for_calls_in_flight_and_refuses_calls_after_it() -> None:
    store = FaultyStorage(limit=10)
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        store.stall()
        call = asyncio.create_task(aengine.authorize(payment(1, agent_id="agent-1")))
        while not store.stalled.is_set():
            await asyncio.sleep(0)
        closing = asyncio.create_task(aengine.close())
        await asyncio.sleep(0)
        assert not closing.done()  # the authorize is still in the store
        store.resume()
        await closing
        assert (await call).allowed
        with pytest.raises(PolicyError) as err:
            await aengine.budget("agent-1")
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        await aengine.close()  # again: nothing

    asyncio.run(main())
    assert engine.history("agent-1", 1)[0].event == "decision"  # a wrapped engine stays open


def test_an_engine_made_by_the_async_engine_is_closed_with_it_and_its_threads_stop() -> None:
    closed = []

    class Store(FaultyStorage):
        def close(self) -> None:
            closed.append(1)

    async def main() -> None:
        async with AsyncPolicyEngine(storage=Store(), clock=ManualClock()) as aengine:  # type: ignore[arg-type]
            await aengine.set_policy("agent-1", DAILY_100)
            assert aengine.reservation_ttl.total_seconds() == 300
            assert isinstance(aengine.payment(payment(1)), AsyncPaymentGuard)

    before = {t.name for t in threading.enumerate() if t.name.startswith("agentpolicy-aio")}
    asyncio.run(main())
    assert closed == [1]
    for t in threading.enumerate():
        if t.name.startswith("agentpolicy-aio") and t.name not in before:
            t.join(5)
            assert not t.is_alive()


def test_bad_construction_is_invalid_input() -> None:
    with pytest.raises(PolicyValidationError) as err:
        AsyncPolicyEngine.from_engine("memory://")  # type: ignore[arg-type]
    assert err.value.path == "$.engine"
    with pytest.raises(PolicyValidationError) as err:
        AsyncPolicyEngine(max_workers=0)
    assert err.value.path == "$.maxWorkers"
    with pytest.raises(PolicyValidationError):
        AsyncPolicyEngine(storage=42)  # type: ignore[arg-type]


def test_close_waits_for_the_release_a_cancelled_entry_starts_while_it_closes() -> None:
    """The authorize of a cancelled entry ends after close() began: its release still runs."""
    store = FaultyStorage(limit=10)
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)

        async def pay() -> None:
            async with aengine.payment(payment(30_000_000, agent_id="agent-1")):
                pytest.fail("a cancelled entry never runs the block")

        store.stall()
        task = asyncio.create_task(pay())
        await asyncio.get_running_loop().run_in_executor(None, store.stalled.wait, 10)
        task.cancel()  # the authorize is in the store: it will still commit
        with pytest.raises(asyncio.CancelledError):
            await task
        closing = asyncio.create_task(aengine.close())
        await asyncio.sleep(0)  # a yield, no time: close() begins
        assert not closing.done()  # the authorize is still in the store
        store.resume()  # it commits now, and its release starts while the engine closes
        await closing
        with pytest.raises(PolicyError) as err:
            await aengine.budget("agent-1")
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE

    asyncio.run(main())
    assert [h.event for h in engine.history("agent-1", 2)] == ["release", "decision"]
    assert next(iter(engine.budget("agent-1").periods.values())).reserved.value == 0
    engine.close()


def test_background_work_offered_to_a_closed_engine_is_refused_cleanly() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    rid = engine.authorize(payment(1, agent_id="agent-1")).reservation_id or ""

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        await aengine.close()
        again = asyncio.create_task(aengine.close())  # a second close waits for the first
        await again
        with pytest.raises(PolicyError) as err:
            await settle_shielded(aengine.release(rid), engine=aengine)
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE

    asyncio.run(main())
    assert engine.get_reservation(rid).status == "reserved"


def test_a_cancelled_close_still_closes_and_admits_the_release_of_a_cancelled_block() -> None:
    """close() under a shutdown deadline: the block's release was refused (30 held), no close."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> AsyncPolicyEngine:
        aengine = AsyncPolicyEngine.from_engine(engine)
        entered, cleaned = asyncio.Event(), asyncio.Event()

        async def pay() -> None:
            async with aengine.payment(payment(30_000_000, agent_id="agent-1")):
                entered.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    await cleaned.wait()  # the block's own clean-up takes a while
                    raise

        task = asyncio.create_task(pay())
        await entered.wait()
        task.cancel()
        closing = asyncio.create_task(aengine.close())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done()  # it waits for the cancelled block
        closing.cancel()  # the deadline of a shutdown
        with pytest.raises(asyncio.CancelledError):
            await closing
        cleaned.set()  # the block leaves now and releases
        with pytest.raises(asyncio.CancelledError):
            await task
        await aengine.close()
        return aengine

    aengine = asyncio.run(main())
    assert aengine._pool._shutdown  # the threads were stopped
    assert [h.event for h in engine.history("agent-1", 2)] == ["release", "decision"]
    assert next(iter(engine.budget("agent-1").periods.values())).reserved.value == 0
    engine.close()


def test_close_waits_for_a_payment_under_way_and_refuses_one_not_yet_sent() -> None:
    """close() while a block pays: its confirm was refused, so 30 was paid and 0 counted."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    outcomes: list[str] = []

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        entered, paid = asyncio.Semaphore(0), asyncio.Event()

        async def pay(sent_before_close: bool) -> None:
            async with aengine.payment(payment(30_000_000, agent_id="agent-1")) as p:
                if sent_before_close:
                    await p.mark_sent()
                entered.release()
                await paid.wait()  # the payment is on its way while the engine closes
                if not sent_before_close:
                    try:
                        await p.mark_sent()
                    except PolicyError as err:
                        outcomes.append(err.code.value)
                        raise  # so it never pays
                outcomes.append("paid")

        sent = asyncio.create_task(pay(True))
        unsent = asyncio.create_task(pay(False))
        for _ in range(2):
            await entered.acquire()
        closing = asyncio.create_task(aengine.close())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done()  # it waits for the blocks under way
        paid.set()
        await sent
        with pytest.raises(PolicyError):
            await unsent
        await closing

    asyncio.run(main())
    assert sorted(outcomes) == ["STORAGE_UNAVAILABLE", "paid"]
    window = next(iter(engine.budget("agent-1").periods.values()))
    assert (window.spent.value, window.reserved.value) == (30_000_000, 0)
    events = [h.event for h in engine.history("agent-1", 10)]
    assert events.count("confirm") == 1
    assert events.count("release") == 1
    engine.close()


@pytest.mark.parametrize("key", [None, "order-1"])
def test_close_begun_during_an_authorize_waits_for_the_block_it_lets_in(key: str | None) -> None:
    """close() during the authorize drained once its task ended, before the block was
    registered: it closed the stores while the block paid, and the confirm was refused.
    With an idempotency key, the claim after the authorize was refused by the closing engine:
    the block never ran and its reservation stayed held until its TTL."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    inside, go = threading.Event(), threading.Event()
    real = engine._authorize

    def held_authorize(*args: Any, **kwargs: Any) -> Any:  # in the async engine's thread
        inside.set()
        go.wait(10)
        return real(*args, **kwargs)

    engine._authorize = held_authorize  # type: ignore[method-assign]
    outcomes: list[str] = []

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)

        async def pay() -> None:
            request = payment(30_000_000, agent_id="agent-1", idempotency_key=key)
            async with aengine.payment(request):
                for _ in range(20):  # the payment is on its way
                    await asyncio.sleep(0)
                outcomes.append("paid")

        paying = asyncio.create_task(pay())
        for _ in range(10_000):
            if inside.is_set():
                break
            await asyncio.sleep(0.001)
        assert inside.is_set()
        closing = asyncio.create_task(aengine.close())  # while the authorize runs
        for _ in range(5):
            await asyncio.sleep(0)
        go.set()
        await paying  # its confirm is admitted: close() waits for the block
        await closing

    asyncio.run(main())
    assert outcomes == ["paid"]
    engine._authorize = real  # type: ignore[method-assign]
    window = next(iter(engine.budget("agent-1").periods.values()))
    assert (window.spent.value, window.reserved.value) == (30_000_000, 0)  # confirmed
    engine.close()


def test_close_drains_while_worker_threads_finish_calls() -> None:
    """Worker threads removed their finished calls from the set close() was reading on the
    loop's thread: "Set changed size during iteration", and close() gave up draining (the
    stores and the threads left open, confirms it should have waited for refused)."""

    async def once() -> None:
        aengine = AsyncPolicyEngine(storage="memory://", clock=ManualClock(), max_workers=32)
        await aengine.set_policy("bot", {"limits": {"daily": {"value": str(10**12)}}})
        calls = [aengine.authorize(payment(1, agent_id="bot")) for _ in range(1_000)]
        started = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0)  # handed to the pool
        await aengine.close()  # raised RuntimeError in 1 of 1 to 3 tries before
        assert aengine._pool._shutdown  # type: ignore[attr-defined]
        answers = await asyncio.gather(*started, return_exceptions=True)
        assert all(not isinstance(a, BaseException) for a in answers)  # each waited for

    for _ in range(4):
        asyncio.run(once())


def test_close_waits_for_a_block_that_never_ends_no_longer_than_its_reservation_lives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker's block waiting on a queue the caller empties only after close() hung it forever."""
    engine = PolicyEngine(clock=ManualClock(), reservation_ttl=timedelta(seconds=1))
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        entered, never = asyncio.Event(), asyncio.Event()

        async def worker() -> None:
            async with aengine.payment(payment(1_000_000, agent_id="agent-1")):
                entered.set()
                await never.wait()

        task = asyncio.create_task(worker())
        await entered.wait()
        await asyncio.wait_for(aengine.close(), 60)  # it hung here
        task.cancel()
        with pytest.raises((asyncio.CancelledError, PolicyError)):
            await task

    with caplog.at_level(logging.WARNING, logger="agentpolicy.aio"):
        asyncio.run(main())
    assert any("waiting for 1 payment block(s) under way" in r.getMessage() for r in caplog.records)
    engine.close()


def test_close_from_two_cancelled_blocks_at_once_does_not_wait_for_either() -> None:
    """Each close() waited for the other's block to leave: both hung forever."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        inside = asyncio.Semaphore(0)

        async def worker() -> None:
            async with aengine.payment(payment(1_000_000, agent_id="agent-1")):
                inside.release()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    await aengine.close()
                    raise

        tasks = [asyncio.create_task(worker()) for _ in range(2)]
        for _ in tasks:
            await inside.acquire()
        for task in tasks:
            task.cancel()
        _done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:  # so a failure does not hang the test run
            task.cancel()
        assert not pending

    asyncio.run(main())
    engine.close()


def test_an_async_store_that_is_certainly_not_the_engines_is_refused_before_any_call() -> None:
    from agentpolicy.storage import open_async_storage, open_storage

    redis_url, pg_url = "redis://127.0.0.1:6379/0", "postgresql://postgres@127.0.0.1:5432/test"
    cases: list[tuple[Any, Any, str]] = [
        (lambda: open_storage(redis_url, key_prefix="ap-a:"),
         lambda: open_async_storage(redis_url, key_prefix="ap-b:"),
         "its Redis key prefix is 'ap-b:', the engine's storage's 'ap-a:'"),
        (lambda: None, lambda: open_async_storage(redis_url), "it is a Redis store"),
        (lambda: open_storage(pg_url + "?schema=ap_one"),
         lambda: open_async_storage(pg_url + "?schema=ap_two"),
         "its PostgreSQL schema is ap_two, the engine's storage's ap_one"),
        (lambda: open_storage(redis_url), lambda: open_async_storage(pg_url),
         "it is a PostgreSQL store"),
        (lambda: redis_url, lambda: open_async_storage(redis_url, key_prefix="ap-b:"),
         "its Redis key prefix is 'ap-b:', the engine's storage's 'agent-policy:'"),
    ]  # fmt: skip
    for make, amake, words in cases:  # nothing connects: the check is of the two objects
        astorage = amake()
        with pytest.raises(PolicyValidationError, match=words) as err:
            AsyncPolicyEngine(make(), async_storage=astorage)
        assert err.value.problems[0].path == "$.asyncStorage"
        given = make()
        if not isinstance(given, str):
            engine = PolicyEngine(given)
            with pytest.raises(PolicyValidationError, match=words):
                AsyncPolicyEngine.from_engine(engine, async_storage=astorage)
            engine.close()
        asyncio.run(astorage.aclose())
    # the same store, with the same prefix (or schema), is taken
    astorage = open_async_storage(redis_url, key_prefix="ap-a:")
    aengine = AsyncPolicyEngine(open_storage(redis_url, key_prefix="ap-a:"), async_storage=astorage)
    assert aengine.native
    asyncio.run(aengine.close())
    asyncio.run(astorage.aclose())
