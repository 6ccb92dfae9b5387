"""PostgreSQL: a call cancelled, interrupted or timed out mid-way leaves the store's connections usable.

psycopg prepares a statement at its sixth use on a connection; in a pipeline
it records the statement as prepared when it queues the PREPARE, before the
server runs it. A PREPARE that then fails (it waited for a locked table and
was cancelled, interrupted by Ctrl-C, or ran out of ``lock_timeout``) was
still counted, so every later use of that statement on the connection,
in any later call, failed with "prepared statement ... does not exist". The
tests here lock a table from another connection so that a statement waits
(and its PREPARE with it), fail calls there, and then check that the same
one-connection pool answers every later call, and that a cancelled call
was applied entirely or not at all.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyError, open_storage
from agentpolicy.storage import postgres
from agentpolicy.storage._pg_url import split_postgres_url
from agentpolicy.storage.postgres import PostgresStorage
from agentpolicy.storage.postgres_async import AsyncPostgresStorage
from agentpolicy.testing import ManualClock, payment

USDT = 1_000_000
LARGE = {"limits": {"daily": {"value": str(1_000_000 * USDT)}}}
FAILED_CALLS = 8  # more than psycopg's prepare threshold (5): one of them sends the PREPARE


def lock_table(url: str, table: str) -> psycopg.Connection[Any]:
    """Another connection holding ``table`` of the URL's schema in ACCESS EXCLUSIVE mode."""
    base, schema = split_postgres_url(url)
    conn = psycopg.connect(base)
    conn.execute(f'LOCK TABLE "{schema}".{table} IN ACCESS EXCLUSIVE MODE')
    return conn


def lock_agent_row(url: str, agent: str = "agent-1") -> psycopg.Connection[Any]:
    """Another connection holding the agent's shard row, as a session of another engine does."""
    base, schema = split_postgres_url(url)
    conn = psycopg.connect(base)
    conn.execute(f'SELECT 1 FROM "{schema}".shards WHERE shard = %s FOR UPDATE', (agent,))
    return conn


def wait_until_blocked(url: str, ended: threading.Event) -> None:
    """Return once a statement on the URL's schema waits for a lock in the server, or ``ended``."""
    base, schema = split_postgres_url(url)
    with psycopg.connect(base, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while not ended.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND position(%s in query) > 0",
                (f'"{schema}"',),
            ).fetchone()
            if row and row[0]:
                return
            assert time.monotonic() < deadline, "no statement waited for the lock"
            time.sleep(0.005)


def window(engine: PolicyEngine, agent: str = "agent-1") -> tuple[int, int]:
    found = next(iter(engine.budget(agent, "daily").periods.values()))
    return found.spent.value, found.reserved.value


def check_the_ledger(url: str, clock: ManualClock) -> tuple[int, int]:
    """A fresh read: every allowed decision held or spent once, no key decided twice."""
    with PolicyEngine(storage=open_storage(url), clock=clock) as direct:
        history = direct.history("agent-1", 10_000)
        spent, reserved = window(direct)
    decided = [h for h in history if h.event == "decision" and h.request is not None]
    keys = collections.Counter(h.request.idempotency_key for h in decided if h.request)
    assert [key for key, n in keys.items() if key is not None and n > 1] == []
    held = sum(h.request.amount for h in decided if h.request and h.reservation_id)
    assert spent + reserved == held  # nothing counted twice, nothing lost
    return spent, reserved


async def later_calls_work(aengine: AsyncPolicyEngine, rounds: int = 3) -> None:
    for _ in range(rounds):
        assert (await aengine.budget("agent-1")).periods
        d = await aengine.authorize(payment(1, agent_id="agent-1"))
        assert d.allowed
        await aengine.confirm(d.reservation_id or "")
        assert await aengine.history("agent-1", 5)


def later_sync_calls_work(engine: PolicyEngine, rounds: int = 3) -> None:
    for _ in range(rounds):
        assert engine.budget("agent-1").periods
        d = engine.authorize(payment(1, agent_id="agent-1"))
        assert d.allowed
        engine.confirm(d.reservation_id or "")
        assert engine.history("agent-1", 5)


def async_engine(url: str, clock: ManualClock, **options: Any) -> AsyncPolicyEngine:
    return AsyncPolicyEngine(
        PostgresStorage(url, pool_size=1),
        clock,
        async_storage=AsyncPostgresStorage(url, pool_size=1, **options),
    )


async def cancel_when_blocked(url: str, call: Awaitable[Any]) -> None:
    """Run ``call`` until its statement waits for a lock, then cancel it."""
    task = asyncio.ensure_future(call)
    ended = threading.Event()
    task.add_done_callback(lambda _: ended.set())
    try:
        await asyncio.to_thread(wait_until_blocked, url, ended)
    finally:
        if not task.done():
            task.cancel()
    with pytest.raises(asyncio.CancelledError):  # (else its own error, or its answer, shows)
        await task


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def agent(pg_schema: str, clock: ManualClock) -> str:
    """The schema's URL, with agent-1's policy set by another storage (its own connections)."""
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        direct.set_policy("agent-1", LARGE)
    return pg_schema


# -- the async store ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["budget", "history"])
def test_async_calls_cancelled_while_a_table_is_locked_leave_the_connection_usable(
    agent: str, clock: ManualClock, call: str
) -> None:
    table = {"budget": "docs", "history": "logs"}[call]

    async def main() -> None:
        aengine = async_engine(agent, clock)
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "budget": lambda: aengine.budget("agent-1"),
            "history": lambda: aengine.history("agent-1", 5),
        }
        await calls[call]()  # its statements used once: counted by psycopg, not yet prepared
        locker = await asyncio.to_thread(lock_table, agent, table)
        try:
            for _ in range(FAILED_CALLS):
                await cancel_when_blocked(agent, calls[call]())
        finally:
            await asyncio.to_thread(locker.close)  # the lock goes with it
        await later_calls_work(aengine)
        await aengine.close()

    asyncio.run(main())
    assert check_the_ledger(agent, clock) == (3, 0)


@pytest.mark.timeout(60)
def test_async_calls_past_the_lock_timeout_of_a_locked_table_leave_the_connection_usable(
    agent: str, clock: ManualClock
) -> None:
    async def main() -> None:
        aengine = async_engine(agent, clock, lock_timeout=timedelta(milliseconds=100))
        await aengine.budget("agent-1")
        locker = await asyncio.to_thread(lock_table, agent, "docs")
        try:
            for _ in range(FAILED_CALLS):
                with pytest.raises(PolicyError) as err:
                    await aengine.budget("agent-1")
                assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        finally:
            await asyncio.to_thread(locker.close)
        await later_calls_work(aengine)
        await aengine.close()

    asyncio.run(main())
    assert check_the_ledger(agent, clock) == (3, 0)


async def cancel_after(
    outcomes: collections.Counter[str], turns: int, call: Awaitable[Any], twice: bool, kind: str
) -> bool:
    """Cancel ``call`` after ``turns`` turns of the loop; whether it had ended before."""
    task = asyncio.ensure_future(call)
    for _ in range(turns):
        await asyncio.sleep(0)
    ended = task.done()
    task.cancel()
    if twice:
        await asyncio.sleep(0)
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        outcomes["cancelled"] += 1
        if turns > 0:
            outcomes[f"cancelled mid-call: {kind}"] += 1
    else:
        outcomes["answered"] += 1
    return ended


@pytest.mark.timeout(60)
def test_async_calls_cancelled_at_every_step_are_all_or_nothing_and_the_pool_goes_on(
    agent: str, clock: ManualClock
) -> None:
    """Cancel authorize and confirm after 0, 2, 4, ... turns of the loop, once or twice.

    A second cancellation interrupts psycopg's own cancelling of the statement:
    it closes the connection, and the pool (of one) must replace it. After
    each, the next calls run on the same pool; the ledger is checked at the end.
    psycopg may report the generator that ended the closed connection's
    pipeline when it is collected: pyproject.toml's ``filterwarnings`` lets
    that one report pass (seen once under pytest-xdist).
    """
    outcomes: collections.Counter[str] = collections.Counter()

    async def main() -> None:
        aengine = async_engine(agent, clock)
        for twice in (False, True):
            for what in ("authorize", "confirm"):
                turns = 0
                while True:
                    call: Awaitable[Any]
                    if what == "authorize":
                        key = f"{what}-{twice}-{turns}"
                        call = aengine.authorize(payment(USDT, idempotency_key=key))
                    else:
                        held = await aengine.authorize(payment(USDT))
                        call = aengine.confirm(held.reservation_id or "")
                    kind = f"{what}{' twice' if twice else ''}"
                    if await cancel_after(outcomes, turns, call, twice, kind):
                        break
                    d = await aengine.authorize(payment(1))
                    await aengine.confirm(d.reservation_id or "")
                    # every turn at first, then fewer: the call ends whatever the machine's speed
                    turns += 1 if turns < 20 else (7 if twice else 2) if turns < 200 else turns // 4
        # cancelled while another connection holds the agent's row: waiting for the lock
        for n in range(5):
            locker = await asyncio.to_thread(lock_agent_row, agent)
            try:
                await cancel_when_blocked(
                    agent, aengine.authorize(payment(USDT, idempotency_key=f"locked-{n}"))
                )
            finally:
                await asyncio.to_thread(locker.close)
            await later_calls_work(aengine, rounds=1)
        await later_calls_work(aengine)
        await aengine.close()

    asyncio.run(main())
    # how many turns a call takes depends on the machine's load; each kind was
    # cancelled part-way through (after at least one turn) at least once
    for kind in ("authorize", "confirm", "authorize twice", "confirm twice"):
        assert outcomes[f"cancelled mid-call: {kind}"] >= 1, outcomes
    assert outcomes["answered"] >= 4, outcomes  # each kind ran to its end at last
    with PolicyEngine(storage=open_storage(agent), clock=clock) as direct:
        history = direct.history("agent-1", 10_000)
        keys = {h.request.idempotency_key for h in history if h.request is not None}
    assert not any(key.startswith("locked-") for key in keys if key)  # never got the lock
    check_the_ledger(agent, clock)


# -- the sync store -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sync_calls_past_the_lock_timeout_of_a_locked_table_leave_the_connection_usable(
    agent: str, clock: ManualClock
) -> None:
    storage = PostgresStorage(agent, pool_size=1, lock_timeout=timedelta(milliseconds=100))
    with PolicyEngine(storage=storage, clock=clock) as engine:
        engine.budget("agent-1")
        locker = lock_table(agent, "docs")
        try:
            for _ in range(FAILED_CALLS):
                with pytest.raises(PolicyError) as err:
                    engine.budget("agent-1")
                assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        finally:
            locker.close()
        later_sync_calls_work(engine)
    assert check_the_ledger(agent, clock) == (3, 0)


@pytest.mark.timeout(60)
def test_sync_calls_interrupted_by_ctrl_c_while_a_table_is_locked_leave_the_connection_usable(
    agent: str, clock: ManualClock
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    main = threading.main_thread().ident
    assert main is not None
    armed = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        if armed.is_set():  # only while the call waits: a late signal is ignored
            raise KeyboardInterrupt

    ended = threading.Event()

    def ctrl_c_when_blocked() -> None:
        wait_until_blocked(agent, ended)
        if not ended.is_set():
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, interrupt)
    storage = PostgresStorage(agent, pool_size=1, lock_timeout=timedelta(seconds=5))
    try:
        with PolicyEngine(storage=storage, clock=clock) as engine:
            engine.budget("agent-1")
            locker = lock_table(agent, "docs")
            try:
                for _ in range(FAILED_CALLS):
                    sender = threading.Thread(target=ctrl_c_when_blocked)
                    ended.clear()
                    armed.set()
                    sender.start()
                    try:
                        with pytest.raises(KeyboardInterrupt):
                            engine.budget("agent-1")  # waits for the table until interrupted
                    finally:
                        armed.clear()
                        ended.set()
                        sender.join()
            finally:
                locker.close()
            later_sync_calls_work(engine)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert check_the_ledger(agent, clock) == (3, 0)


@pytest.mark.timeout(60)
def test_a_sync_session_interrupted_while_it_rolls_back_gives_its_connection_back(
    agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands on the ROLLBACK at a session's end: the pool (of one) still serves."""
    storage = PostgresStorage(agent, pool_size=1, pool_timeout=timedelta(milliseconds=500))
    real = postgres._round_trip
    interrupted: list[int] = []

    def round_trip(conn: Any, request: Any, watchdog: Any) -> Any:
        if isinstance(request, postgres._Execute) and request.query == "ROLLBACK":
            interrupted.append(1)
            raise KeyboardInterrupt  # as psycopg raises it, after cancelling the statement
        return real(conn, request, watchdog)

    session = storage.session("agent-1")
    try:
        with pytest.raises(KeyboardInterrupt), session:  # noqa: PT012
            session.get(["anything"])  # takes the agent's row: the session's end rolls back
            monkeypatch.setattr(postgres, "_round_trip", round_trip)
        assert interrupted == [1]
        monkeypatch.undo()
        with storage.session("agent-1") as again:  # the pool's one connection, back
            assert again.get(["anything"]) == {}
    finally:
        monkeypatch.undo()
        if session.conn is not None:  # never given back: end its transaction for the teardown
            session.conn.close()
        storage.close()
