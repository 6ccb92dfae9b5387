"""The async engine under cancellation and stalls: nothing overspends, nothing stays stuck.

Agent frameworks cancel tasks all the time (``asyncio.wait_for``, a failed
``TaskGroup``, a client that went away). These tests cancel the calls of an
:class:`~agentpolicy.AsyncPolicyEngine` at every point they await (on its
native Redis and PostgreSQL stores and in its threads), behind stalled
servers and in crowds on one agent, and then check that the ledger is exact
(what is held is what the allowed decisions hold, each idempotency key
counted once), that the same key answers the same decision again, and that
the next call on the same agent neither waits nor fails.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg.conninfo
import pytest

from agentpolicy import AsyncPolicyEngine, PolicyEngine, PolicyError, open_storage
from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage import open_async_storage, postgres_async
from agentpolicy.storage.postgres_async import AsyncPostgresStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend, serve
from tests.test_postgres_cancel import lock_agent_row, wait_until_blocked
from tests.test_postgres_stall import StallingProxy, through

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[StallingProxy]:
    """A TCP proxy to the test server that can be told to stop forwarding."""
    params = psycopg.conninfo.conninfo_to_dict(postgres_url.partition("?")[0])
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    if host.startswith("/"):
        pytest.skip("the server is reached by a Unix socket: no TCP proxy")
    running = StallingProxy((socket.AF_INET, (host, port)))
    yield running
    running.close()


def held(engine: PolicyEngine, agent: str = "agent-1") -> tuple[int, int]:
    """(spent, reserved) of the agent's daily window, read afresh."""
    window = next(iter(engine.budget(agent, "daily").periods.values()))
    return window.spent.value, window.reserved.value


def decided(engine: PolicyEngine, key: str, agent: str = "agent-1") -> list[str | None]:
    """The reservation ids of the decisions recorded under an idempotency key."""
    return [
        h.reservation_id
        for h in engine.history(agent, 10_000)
        if h.event == "decision" and h.request is not None and h.request.idempotency_key == key
    ]


# -- PostgreSQL that stops answering ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_call_cancelled_on_a_stalled_postgres_ends_at_once_and_the_agent_goes_on(
    pg_schema: str, proxy: StallingProxy
) -> None:
    """``asyncio.wait_for(authorize, 0.3)`` while the server does not answer.

    Cancelled, psycopg asks the server to cancel the statement and waits for
    its end (5 s for the request, 5 s more for the end): the caller of
    ``wait_for`` was held 10.3 s (4.9 s with a round-trip bound of 4 s).
    It now waits for that a moment at most, then the connection is cut.
    """
    clock = ManualClock()

    async def main() -> tuple[float, float, Any]:
        astore = AsyncPostgresStorage(
            through(proxy, pg_schema), pool_size=2, round_trip_timeout=timedelta(seconds=4)
        )
        async with AsyncPolicyEngine(open_storage(pg_schema), clock, async_storage=astore) as ae:
            await ae.set_policy("agent-1", DAILY_100)
            await ae.authorize(payment(USDT, idempotency_key="before"))
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ae.authorize(payment(10 * USDT, idempotency_key="k")), 0.3)
            cancelled = time.monotonic() - started
            proxy.resume()
            started = time.monotonic()
            again = await ae.authorize(payment(10 * USDT, idempotency_key="k"))
            retried = time.monotonic() - started
            return cancelled, retried, again

    cancelled, retried, again = asyncio.run(main())
    assert cancelled < 2.0, f"wait_for(0.3) held its caller {cancelled:.1f} s"
    assert retried < 2.0
    assert again.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        assert decided(direct, "k") == [again.reservation_id]
        assert held(direct) == (0, 11 * USDT)


@pytest.mark.timeout(60)
def test_a_call_cancelled_on_a_server_that_answers_keeps_its_connection(pg_schema: str) -> None:
    """Cancelled while it waits for a row another connection holds: cancelled on the server.

    The cut of a stalled round trip above must not cost a server that
    answers anything: the statement is cancelled there within the moment it
    is given, and the connection goes back to the pool, usable.
    """
    clock = ManualClock()

    async def main() -> tuple[float, dict[str, int], Any]:
        astore = AsyncPostgresStorage(pg_schema, pool_size=1)
        async with AsyncPolicyEngine(open_storage(pg_schema), clock, async_storage=astore) as ae:
            await ae.set_policy("agent-1", DAILY_100)
            await ae.authorize(payment(USDT))
            locker = await asyncio.to_thread(lock_agent_row, pg_schema)
            try:
                call = asyncio.ensure_future(ae.authorize(payment(USDT, idempotency_key="k")))
                ended = threading.Event()
                call.add_done_callback(lambda _: ended.set())
                await asyncio.to_thread(wait_until_blocked, pg_schema, ended)
                started = time.monotonic()
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                took = time.monotonic() - started
            finally:
                await asyncio.to_thread(locker.close)
            after = await ae.authorize(payment(USDT, idempotency_key="k"))
            return took, astore._pool.get_stats(), after

    took, stats, after = asyncio.run(main())
    assert took < 0.4  # psycopg's cancel on the server, not the cut after 0.5 s
    assert stats.get("returns_bad", 0) == 0  # no connection was closed
    assert stats.get("connections_num", 0) == 1  # the one connection served every call
    assert after.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        assert decided(direct, "k") == [after.reservation_id]
        assert held(direct) == (0, 2 * USDT)


# -- a crowd on one agent, some of it cancelled ---------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from serve(request.param, tmp_path, request)


def engine_on(store: Backend, clock: ManualClock, **options: Any) -> AsyncPolicyEngine:
    """An async engine on ``store``: native on Redis and PostgreSQL, in threads otherwise."""
    if store.spec is None or store.name == "sqlite":
        return AsyncPolicyEngine.from_engine(store.engine(clock), **options)
    url, prefix = store.spec
    astore = open_async_storage(url, key_prefix=prefix)
    assert astore is not None
    return AsyncPolicyEngine(store.handle(), clock, async_storage=astore, **options)


def idle(aengine: AsyncPolicyEngine) -> dict[str, Any]:
    """What the engine's store still holds for calls: lines of turns, pool permits, tasks."""
    astore: Any = aengine._astorage
    found: dict[str, Any] = {"inflight": aengine._inflight, "tasks": len(aengine._tasks)}
    if astore is not None:
        found["lines"] = dict(astore._turns.lines)
        if isinstance(astore, AsyncRedisStorage):
            found["gate"] = rp.POOL_SIZE - astore._gate._value
    return found


@pytest.mark.timeout(120)
def test_a_crowd_on_one_agent_cancelled_at_every_turn_counts_each_key_once(store: Backend) -> None:
    """60 payments of 1 USDT against 25 on each of two agents, cancelled part-way.

    On agent-1 each call is cancelled after 0 to 11 turns of the loop (mostly
    while it waits for its turn); on agent-2 after 0 to 4.5 ms (mostly while it
    awaits the store). Then every key is asked again, twice: each answers the
    same decision both times, exactly 25 are allowed per agent, and what is
    held is exactly what they hold; no turn, pool permit or task is left.
    """
    clock = ManualClock()
    keys = [f"k{n}" for n in range(60)]
    agents = ("agent-1", "agent-2")

    async def main() -> tuple[collections.Counter[str], dict[str, list[Any]], dict[str, Any]]:
        aengine = engine_on(store, clock)
        for agent in agents:
            await aengine.set_policy(agent, {"limits": {"daily": {"value": str(25 * USDT)}}})
        outcomes: collections.Counter[str] = collections.Counter()

        async def cancel_after(agent: str, n: int, key: str) -> None:
            request = payment(USDT, agent_id=agent, idempotency_key=key)
            task = asyncio.ensure_future(aengine.authorize(request))
            if agent == "agent-1":
                for _ in range(n % 12):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep((n % 10) * 0.0005)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                outcomes[f"{agent} cancelled"] += 1
            else:
                outcomes[f"{agent} answered"] += 1

        await asyncio.gather(
            *(cancel_after(agent, n, key) for agent in agents for n, key in enumerate(keys))
        )
        answers: dict[str, list[Any]] = {}
        for agent in agents:
            for _ in range(2):
                for key in keys:
                    request = payment(USDT, agent_id=agent, idempotency_key=key)
                    answers.setdefault(agent, []).append(await aengine.authorize(request))
        left = idle(aengine)
        await aengine.close()
        return outcomes, answers, left

    outcomes, answers, left = asyncio.run(main())
    for agent in agents:
        assert outcomes[f"{agent} cancelled"] >= 5, outcomes
    assert (left["inflight"], left["tasks"]) == (0, 0)
    assert left.get("lines", {}) == {}  # no turn left taken
    assert left.get("gate", 0) == 0  # every turn at the Redis pool given back
    with PolicyEngine(storage=store.handle(), clock=clock) as direct:
        for agent in agents:
            first, second = answers[agent][:60], answers[agent][60:]
            assert [d.reservation_id for d in first] == [d.reservation_id for d in second]
            assert sum(d.allowed for d in first) == 25
            assert all(d.allowed or d.code == "DAILY_LIMIT" for d in first)
            assert held(direct, agent) == (0, 25 * USDT)
            for key, d in zip(keys, first, strict=True):
                assert decided(direct, key, agent) == [d.reservation_id]


# -- cancelled before or after each request to the store ------------------------------------------

APPROVALS = {
    "limits": {"daily": {"value": str(1000 * USDT)}},
    "approvalConfig": {
        "thresholds": [{"amount": {"value": str(100 * USDT)}, "requiredApprovers": 1,
                        "approvers": ["alice"]}],
        "timeout": 3_600_000,
    },
}  # fmt: skip


@pytest.fixture(params=["redis", "redis-cluster", "postgres"])
def native(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from serve(request.param, tmp_path, request)


class CancelAt:
    """Cancel the calling task just before (or just after) its ``k``-th request to the store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: str) -> None:
        self.k = 0
        self.sent = 0
        self.after = False
        self.task: asyncio.Task[Any] | None = None
        if store == "postgres":
            real_trip = postgres_async._round_trip

            async def trip(conn: Any, request: Any, seconds: float) -> Any:
                return await self.around(real_trip(conn, request, seconds))

            monkeypatch.setattr(postgres_async, "_round_trip", trip)
        else:
            real_send = AsyncRedisStorage._send

            async def send(storage: AsyncRedisStorage, request: Any) -> Any:
                return await self.around(real_send(storage, request))

            monkeypatch.setattr(AsyncRedisStorage, "_send", send)

    async def around(self, request: Any) -> Any:
        if self.task is not asyncio.current_task():
            return await request
        self.sent += 1
        hit = self.sent == self.k
        if hit and not self.after:
            self.task.cancel()
            request.close()
            await asyncio.sleep(0)  # the cancellation lands here: nothing was sent
        answer = await request
        if hit and self.after:
            self.task.cancel()
            await asyncio.sleep(0)  # the answer came: the cancellation lands before it goes up
        return answer

    async def run(self, call: Any, k: int, after: bool) -> tuple[bool, int]:
        """Run ``call`` cancelled at request ``k``: (whether it was cancelled, requests it made)."""
        self.k, self.sent, self.after = k, 0, after
        self.task = asyncio.ensure_future(call)
        try:
            await self.task
        except asyncio.CancelledError:
            return True, self.sent
        finally:
            self.task = None
        return False, self.sent


class Expected:
    """What the agent's daily window must hold after each step, and a check of it."""

    def __init__(self, aengine: AsyncPolicyEngine) -> None:
        self.aengine = aengine
        self.spent = 0
        self.reserved = 0

    async def check(self, spent: int = 0, reserved: int = 0) -> None:
        self.spent += spent
        self.reserved += reserved
        window = next(iter((await self.aengine.budget("agent-1", "daily")).periods.values()))
        assert (window.spent.value, window.reserved.value) == (self.spent, self.reserved)


async def one_round(
    aengine: AsyncPolicyEngine, cut: CancelAt, expected: Expected, k: int, after: bool
) -> tuple[list[str], int]:
    """authorize, confirm or release, and a vote, each cancelled at request ``k``.

    Answers what happened to each, and the most requests one of them made.
    """
    seen = []
    key = f"{after}-{k}"
    request = payment(USDT, idempotency_key=key)
    cancelled, most = await cut.run(aengine.authorize(request), k, after)
    seen.append(f"authorize {'cancelled' if cancelled else 'answered'}")
    d = await aengine.authorize(request)
    assert d.allowed
    assert await aengine.authorize(request) == d
    await expected.check(reserved=USDT)

    settle = aengine.confirm if k % 2 else aengine.release
    cancelled, sent = await cut.run(settle(d.reservation_id or ""), k, after)
    most = max(most, sent)
    seen.append(f"settle {'cancelled' if cancelled else 'answered'}")
    r = await settle(d.reservation_id or "")
    assert r.status == ("confirmed" if k % 2 else "released")
    await expected.check(spent=USDT if k % 2 else 0, reserved=-USDT)

    big = await aengine.authorize(payment(100 * USDT, idempotency_key="a" + key))
    assert big.requires_approval
    assert big.approval_id
    await expected.check(reserved=100 * USDT)
    vote = aengine.decide(big.approval_id, "alice", "approve")
    cancelled, sent = await cut.run(vote, k, after)
    most = max(most, sent)
    seen.append(f"vote {'cancelled' if cancelled else 'answered'}")
    try:
        approval = await aengine.decide(big.approval_id, "alice", "approve")
        again = "counted now"
    except PolicyError as err:
        again = str(err.code)  # the cancelled vote counted: the approval was decided
        approval = await aengine.get_approval(big.approval_id)
    assert again in ("counted now", "APPROVAL_NOT_PENDING")
    assert approval.status == "approved"
    assert [v.approver for v in approval.votes] == ["alice"]
    await aengine.release(approval.reservation_id or "")
    await expected.check(reserved=-100 * USDT)
    return seen, most


@pytest.mark.timeout(120)
def test_calls_cancelled_before_or_after_each_store_request_leave_an_exact_ledger(
    native: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """authorize, confirm or release, and decide, cancelled at their k-th request, for every k.

    Cancelled before a request, nothing of it reached the store; after it, a
    commit may have applied and its answer is lost. Either way the call asked
    again answers as if once: the same idempotency key the same reservation,
    a confirm or release its reservation confirmed or released, a vote
    counted once; and spent and reserved are exactly what those answers say.
    """
    clock = ManualClock()
    cut = CancelAt(monkeypatch, native.name)

    async def main() -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        async with engine_on(native, clock) as aengine:
            await aengine.set_policy("agent-1", APPROVALS)
            expected = Expected(aengine)
            for after in (False, True):
                for k in range(1, 12):
                    outcomes, most = await one_round(aengine, cut, expected, k, after)
                    seen.update(outcomes)
                    if most < k:
                        break  # each call made fewer than k requests: every k was tried
        return seen

    seen = asyncio.run(main())
    for what in ("authorize", "settle", "vote"):
        assert seen[f"{what} cancelled"] >= 2, seen
