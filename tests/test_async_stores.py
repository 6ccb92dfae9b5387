"""The async stores and arun: the ledger's own steps on redis.asyncio and psycopg's async pool.

The primitive itself is checked on the async stores by ``tests/test_primitive.py``
(its ``backend`` fixture includes them). Here: ``open_async_storage``, ``arun``
with the real authorize and policy steps on each async store, conflicts between
tasks and with a sync engine (exact counts), data shared with the sync stores in
both directions, and what a stalled or vanished server does, with a ticker task
proving that no call blocks the event loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis

from agentpolicy import (
    ErrorCode,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
    ReservationStatus,
    open_async_storage,
    open_storage,
)
from agentpolicy.decisions import Decision
from agentpolicy.errors import StorageUnavailableError
from agentpolicy.ledger import operations, runner
from agentpolicy.ledger.arunner import arun
from agentpolicy.ledger.runner import View
from agentpolicy.storage import MemoryStorage
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import CONFLICT, AsyncStorage, Outcome, Storage, Txn
from agentpolicy.storage.postgres_async import AsyncPostgresStorage, _AsyncPostgresSession
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.async_stores import AsyncLedger
from tests.backends import Backend, serve
from tests.postgres_servers import PostgresServer
from tests.redis_servers import RedisServer, free_port
from tests.test_migration import AT as MIGRATION_AT
from tests.test_migration import check_converted, load_redis_fixture
from tests.test_redis import _stall

T = TypeVar("T")
USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
STORES = ["redis", "redis-cluster", "postgres"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A shared store: ``open_async(store)`` opens it async, ``store.handle()`` sync."""
    yield from serve(request.param, tmp_path, request)


@pytest.fixture
def own_redis(tmp_path: Path, redis_url: str) -> Iterator[RedisServer]:
    """A Redis only this test talks to, with DEBUG enabled (needs redis-server on PATH)."""
    del redis_url  # skip or fail exactly as the session fixture does when Redis is missing
    server = RedisServer(tmp_path / "own", "--enable-debug-command", "yes")
    server.start()
    yield server
    server.stop()


def open_async(b: Backend) -> AsyncStorage:
    assert b.spec is not None
    url, prefix = b.spec
    storage = open_async_storage(url, key_prefix=prefix)
    assert storage is not None
    return storage


def used(engine: PolicyEngine, agent: str = "agent-1") -> tuple[int, int]:
    window = next(iter(engine.budget(agent, "daily").periods.values()))
    return window.spent.value, window.reserved.value


class Ticker:
    """A task that ticks every 10 ms: it only keeps ticking if nothing blocks the loop."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> float:
        """Stop; answer the longest gap between two ticks (seconds)."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        return max(b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False))


async def ticking(call: Awaitable[T]) -> tuple[T | BaseException, float, int]:
    """Await ``call`` beside a ticker: its result (or error), the longest gap, the ticks."""
    ticker = Ticker()
    ticker.start()
    await asyncio.sleep(0.02)
    try:
        result: T | BaseException = await call
    except Exception as exc:
        result = exc
    gap = await ticker.stop()
    return result, gap, len(ticker.ticks)


# -- open_async_storage ----------------------------------------------------------------------------


def test_memory_and_sqlite_have_no_async_store(tmp_path: Path) -> None:
    assert open_async_storage("memory://") is None
    assert open_async_storage(f"sqlite:///{tmp_path / 'x.db'}") is None
    assert not (tmp_path / "x.db").exists()  # nothing opened


def test_redis_and_postgres_urls_open_async_stores_without_connecting() -> None:
    port = free_port()
    opened = [
        open_async_storage(f"redis://127.0.0.1:{port}/0", key_prefix="p:"),
        open_async_storage(f"rediss+cluster://127.0.0.1:{port}"),
        open_async_storage(f"postgresql://u:p@127.0.0.1:{port}/db?schema=s1"),
        open_async_storage(f"postgres://u@127.0.0.1:{port}/db"),
    ]
    assert [type(s).__name__ for s in opened] == ["AsyncRedisStorage", "AsyncRedisStorage",
                                                  "AsyncPostgresStorage", "AsyncPostgresStorage"]  # fmt: skip
    redis_one, cluster, pg, pg2 = opened
    assert isinstance(redis_one, AsyncRedisStorage)
    assert isinstance(cluster, AsyncRedisStorage)
    assert (redis_one.key_prefix, redis_one.global_indexes_atomic) == ("p:", True)
    assert cluster.global_indexes_atomic is False  # hints beside the commit, as the sync store
    assert isinstance(pg, AsyncPostgresStorage)
    assert isinstance(pg2, AsyncPostgresStorage)
    assert (pg.schema, pg2.schema) == ("s1", "agentpolicy")
    assert all(isinstance(s, AsyncStorage) and not isinstance(s, Storage) for s in opened)

    async def close() -> None:
        for s in opened:
            assert s is not None
            await s.aclose()

    asyncio.run(close())


@pytest.mark.parametrize(
    "url",
    ["mysql://h/db", "sqlite:///", 42, "postgresql://h/db?schema=bad-name",
     "postgresql://h/db?schema=a&schema=b", "file:///tmp/x"],
)  # fmt: skip
def test_a_bad_url_gets_the_same_structured_error_as_open_storage(url: Any) -> None:
    with pytest.raises(PolicyValidationError) as sync:
        open_storage(url)
    with pytest.raises(PolicyValidationError) as aio:
        open_async_storage(url)
    assert aio.value.problems == sync.value.problems
    assert aio.value.code == ErrorCode.INVALID_INPUT


@pytest.mark.parametrize(
    ("url", "extra", "modules"),
    [
        ("redis://h:1/0", "redis",
         ["agentpolicy.storage.redis", "agentpolicy.storage.redis_async",
          "agentpolicy.storage._redis_protocol"]),
        ("postgresql://u@h/db", "psycopg",
         ["agentpolicy.storage.postgres", "agentpolicy.storage.postgres_async"]),
    ],
)  # fmt: skip
def test_without_the_extra_the_error_is_the_sync_paths(
    monkeypatch: pytest.MonkeyPatch, url: str, extra: str, modules: list[str]
) -> None:
    monkeypatch.setitem(sys.modules, extra, None)
    for name in modules:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(PolicyError) as sync:
        open_storage(url)
    with pytest.raises(PolicyError) as aio:
        open_async_storage(url)
    assert aio.value.code == sync.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert aio.value.message == sync.value.message
    assert "pip install 'agentpolicy[" in aio.value.message


def test_importing_agentpolicy_and_its_async_names_loads_no_redis_or_psycopg() -> None:
    code = (
        "import sys, agentpolicy; agentpolicy.open_async_storage; agentpolicy.AsyncStorage;"
        " import agentpolicy.ledger.arunner;"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('redis', 'psycopg', 'psycopg_pool')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- arun: the semantics of run, on an async store over memory ---------------------------------------


class AsyncOver:
    """An AsyncStorage over a sync store (memory), whose first ``losses`` commits conflict."""

    global_indexes_atomic = True
    default_history_retention = None

    def __init__(self, inner: Storage, losses: int = 0) -> None:
        self.inner = inner
        self.losses = losses
        self.commits = 0
        self.reads = 0

    def session(self, shard: str, *, write: bool = True) -> Any:
        return _AsyncOverSession(self, self.inner.session(shard, write=write))

    async def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        return self.inner.log(shard, name, limit)

    async def aclose(self) -> None:
        self.inner.close()


class _AsyncOverSession:
    def __init__(self, owner: AsyncOver, opened: Any) -> None:
        self.owner = owner
        self.opened = opened

    async def __aenter__(self) -> _AsyncOverSession:
        self.session = self.opened.__enter__()
        self.fresh = self.session.fresh
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.opened.__exit__(*exc)

    async def get(self, names: Any, guess: frozenset[str] = frozenset()) -> Any:
        self.owner.reads += 1
        return self.session.get(names, guess)

    async def scan(self, index: str, upto: int, limit: int) -> Any:
        self.owner.reads += 1
        return self.session.scan(index, upto, limit)

    async def commit(self, txn: Txn) -> Outcome:
        self.owner.commits += 1
        if self.owner.commits <= self.owner.losses:
            return CONFLICT
        return self.session.commit(txn)


def _write_step(view: View, t: Txn) -> None:
    view.read(["d"])
    t.put["d"] = {"n": 1}
    t.result = "done"


def test_arun_retries_a_lost_commit_past_the_attempt_count_like_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "_BACKOFF_BASE", 0.0)
    storage = AsyncOver(MemoryStorage(), losses=runner.MAX_ATTEMPTS + 50)
    assert asyncio.run(arun(storage, "s1", _write_step, str, at=1)) == "done"
    assert storage.commits == runner.MAX_ATTEMPTS + 51
    with storage.inner.session("s1") as session:
        assert session.get(["d"]) == {"d": (1, {"n": 1})}


def test_arun_fails_closed_past_both_bounds_like_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_BACKOFF_BASE", 0.0)
    monkeypatch.setattr(runner, "RETRY_SECONDS", 0.0)
    storage = AsyncOver(MemoryStorage(), losses=10**9)
    with pytest.raises(StorageUnavailableError, match="too busy for 100 attempts"):
        asyncio.run(arun(storage, "s1", _write_step, str, at=1))
    assert storage.commits == runner.MAX_ATTEMPTS


def test_arun_answers_reads_from_its_memo_and_reruns_the_step_once_per_round() -> None:
    storage = AsyncOver(MemoryStorage())
    runs: list[int] = []

    def step(view: View, t: Txn) -> None:
        runs.append(1)
        view.read(["a", "b"])  # round 1
        first = view.doc("a")
        view.read(["c"])  # round 2
        assert view.scan("ix", 10, 5) == []  # round 3
        view.read(["a", "b", "c"])  # read already: no round
        t.put["a"] = {"n": 1 if first is None else first["n"] + 1}
        t.result = view.expected()

    expected = asyncio.run(arun(storage, "s1", step, dict, at=1))
    assert expected == {"a": 0, "b": 0, "c": 0}  # the commit's conditions: every document read
    assert (storage.reads, len(runs)) == (3, 4)  # k rounds of reads: k requests, k + 1 runs
    assert asyncio.run(arun(storage, "s1", step, dict, at=2)) == {"a": 1, "b": 0, "c": 0}


def test_a_step_that_raises_writes_nothing_and_its_error_reaches_the_caller() -> None:
    storage = AsyncOver(MemoryStorage())

    def step(view: View, t: Txn) -> None:
        view.read(["a"])
        t.put["a"] = {"n": 1}
        raise PolicyValidationError.single("$.x", "no")

    with pytest.raises(PolicyValidationError):
        asyncio.run(arun(storage, "s1", step, dict, at=1))
    assert storage.commits == 0


# -- arun on the async stores, with the ledger's own steps ----------------------------------------------


def test_async_writes_and_the_sync_engine_reads_them_and_the_reverse(store: Backend) -> None:
    clock = ManualClock()
    engine = store.engine(clock)

    async def main() -> list[Decision | dict[str, Any]]:
        async_ = open_async(store)
        ledger = AsyncLedger(async_, clock)
        assert await ledger.set_policy("agent-1", DAILY_100) == 1  # written by arun
        stored = engine.get_policy("agent-1")  # read by the sync engine
        assert stored is not None
        assert stored.version == 1
        got = [await ledger.authorize(payment(30 * USDT)) for _ in range(5)]
        d = engine.authorize(payment(5 * USDT))  # the sync engine counts the async ones
        assert d.allowed
        assert engine.authorize(payment(6 * USDT)).code == "DAILY_LIMIT"
        last = await ledger.authorize(payment(6 * USDT))  # and the async ledger the sync one
        assert isinstance(last, Decision)
        assert last.code == "DAILY_LIMIT"
        replay = await ledger.authorize(payment(USDT, idempotency_key="k"))
        again = await ledger.authorize(payment(USDT, idempotency_key="k"))
        assert isinstance(replay, Decision)
        assert isinstance(again, dict)
        assert again["rid"] == replay.reservation_id  # the first decision, answered again
        await async_.aclose()
        return got

    got = asyncio.run(main())
    assert [d.code for d in got if isinstance(d, Decision)] == ["ALLOWED"] * 3 + ["DAILY_LIMIT"] * 2
    assert used(engine) == (0, 96 * USDT)
    first = got[0]
    assert isinstance(first, Decision)
    assert first.reservation_id is not None
    assert engine.confirm(first.reservation_id).status is ReservationStatus.CONFIRMED
    assert used(engine) == (30 * USDT, 66 * USDT)
    events = [h.event for h in engine.history("agent-1")]
    assert events.count("decision") == 9  # every decision recorded once, by either engine


def test_two_tasks_and_a_sync_engine_on_one_budget_allow_exactly_the_limit(
    store: Backend,
) -> None:
    clock = ManualClock()
    engine = store.engine(clock)
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(50 * USDT)}}})
    sync_allowed: list[bool] = []

    def sync_payments() -> None:
        sync_allowed.extend(engine.authorize(payment(USDT)).allowed for _ in range(30))

    async def task(ledger: AsyncLedger) -> int:
        allowed = 0
        for _ in range(30):
            d = await ledger.authorize(payment(USDT))
            assert isinstance(d, Decision)
            allowed += d.allowed
        return allowed

    async def main() -> list[int]:
        async_ = open_async(store)
        ledger = AsyncLedger(async_, clock)
        thread = threading.Thread(target=sync_payments)
        thread.start()
        counts = await asyncio.gather(task(ledger), task(ledger))
        await asyncio.to_thread(thread.join)
        await async_.aclose()
        return counts

    counts = asyncio.run(main())
    assert sum(counts) + sum(sync_allowed) == 50  # of 90: never one more, never one less
    assert used(engine) == (0, 50 * USDT)


class Watched:
    """An AsyncStorage that counts the reads its sessions await and records their commits.

    With ``gate``, a commit first waits until the gate is set.
    """

    def __init__(self, inner: AsyncStorage, gate: asyncio.Event | None = None) -> None:
        self.inner = inner
        self.gate = gate
        self.requests = 0
        self.sessions = 0
        self.outcomes: list[Outcome] = []
        self.global_indexes_atomic = inner.global_indexes_atomic
        self.default_history_retention = inner.default_history_retention

    def session(self, shard: str, *, write: bool = True) -> WatchedSession:
        self.sessions += 1
        return WatchedSession(self, self.inner.session(shard, write=write))

    async def log(self, shard: str, name: str, limit: int) -> Any:
        return await self.inner.log(shard, name, limit)

    async def aclose(self) -> None:
        await self.inner.aclose()


class WatchedSession:
    def __init__(self, owner: Watched, opened: Any) -> None:
        self.owner = owner
        self.opened = opened

    async def __aenter__(self) -> WatchedSession:
        self.session = await self.opened.__aenter__()
        self.fresh = self.session.fresh
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self.opened.__aexit__(*exc)

    async def get(self, names: Any, guess: frozenset[str] = frozenset()) -> Any:
        self.owner.requests += 1
        return await self.session.get(names, guess)

    async def scan(self, index: str, upto: int, limit: int) -> Any:
        self.owner.requests += 1
        return await self.session.scan(index, upto, limit)

    async def commit(self, txn: Txn) -> Outcome:
        if self.owner.gate is not None:
            await self.owner.gate.wait()
        outcome: Outcome = await self.session.commit(txn)
        self.owner.outcomes.append(outcome)
        return outcome


def test_a_commit_that_loses_to_another_task_runs_again_on_fresh_reads(store: Backend) -> None:
    """Task A decides on what it read, then B commits first: A's commit conflicts, A decides again.

    A reads without the shard's lock (``write=False``), as a read that turns
    out to write does; on PostgreSQL its commit then checks every version.
    """
    clock = ManualClock()
    engine = store.engine(clock)
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> tuple[Any, Any, list[Outcome]]:
        async_ = open_async(store)
        async with async_.session("agent-1") as session:  # Redis: the head is in the cache now
            await session.get(["h/agent-1"])
        gate = asyncio.Event()
        gated = Watched(async_, gate)
        ledger = AsyncLedger(async_, clock)
        slow = AsyncLedger(gated, clock)  # type: ignore[arg-type]
        now = clock()
        seen: list[Decision] = []
        step = operations.authorize(slow.config, "agent-1", payment(60 * USDT), now,
                                    slow.policies, seen)  # fmt: skip
        a = asyncio.create_task(arun(gated, "agent-1", step, dict, at=micros(now), write=False))  # type: ignore[arg-type]
        while not seen:  # A has decided (ALLOWED, on what it read) and waits to commit
            await asyncio.sleep(0.005)
        b = await ledger.authorize(payment(60 * USDT))  # B commits first
        gate.set()
        result = await a
        await async_.aclose()
        return b, (seen, result), gated.outcomes

    b, (seen, result), outcomes = asyncio.run(main())
    assert isinstance(b, Decision)
    assert b.allowed
    assert [o.conflict for o in outcomes] == [True, False]  # A lost once, then committed
    assert [d.code for d in seen] == ["ALLOWED", "DAILY_LIMIT"]  # decided again, on fresh reads
    assert result["rec"]["code"] == "DAILY_LIMIT"
    assert used(engine) == (0, 60 * USDT)


def test_an_error_resting_on_a_guess_is_checked_on_fresh_reads(store: Backend) -> None:
    """A reservation made by the sync engine is unknown to the async store's cache.

    On Redis the confirm's first run takes it as absent (a guess) and would
    answer RESERVATION_NOT_FOUND; arun runs it again on fresh reads instead.
    """
    clock = ManualClock()
    engine = store.engine(clock)
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> tuple[Any, list[str]]:
        async_ = open_async(store)
        ledger = AsyncLedger(async_, clock)
        await ledger.authorize(payment(USDT))  # the async store has cached the head
        rid = engine.authorize(payment(10 * USDT)).reservation_id
        assert rid is not None
        codes: list[str] = []
        step = operations.settle(ledger.config, rid, "confirm", clock())

        def watched(view: View, t: Txn) -> None:
            try:
                step(view, t)
            except PolicyError as err:
                codes.append(err.code)
                raise

        result = await arun(async_, "agent-1", watched, dict, at=micros(clock()))
        await async_.aclose()
        return result, codes

    result, codes = asyncio.run(main())
    assert result["doc"]["st"] == "confirmed"
    if store.name.startswith("redis"):
        assert codes == [ErrorCode.RESERVATION_NOT_FOUND]  # on the guess; then found, fresh
    else:
        assert codes == []  # PostgreSQL sessions are fresh: nothing is guessed
    assert used(engine) == (10 * USDT, USDT)


def test_a_payment_in_a_budget_tree_reads_in_rounds_and_asks_the_store_once_per_round(
    store: Backend,
) -> None:
    clock = ManualClock()
    engine = store.engine(clock)
    engine.set_policy("fleet", {"limits": {"daily": {"value": str(100 * USDT)}}})
    engine.set_policy("bot", {"parent": "fleet", "limits": {"daily": {"value": str(30 * USDT)}}})
    tree = engine._shard_now("bot")

    async def main() -> tuple[int, int, int, list[Decision]]:
        async_ = open_async(store)
        counting = Watched(async_)
        ledger = AsyncLedger(counting, clock, shards={"bot": tree})  # type: ignore[arg-type]
        await ledger.authorize(payment(USDT, agent_id="bot"))  # Redis: warms the cache
        counting.requests = counting.sessions = 0
        runs: list[int] = []
        seen: list[Decision] = []
        now = clock()
        step = operations.authorize(ledger.config, tree, payment(20 * USDT, agent_id="bot"), now,
                                    ledger.policies, seen)  # fmt: skip

        def counted(view: View, t: Txn) -> None:
            runs.append(1)
            step(view, t)

        await arun(counting, tree, counted, dict, at=micros(now))  # type: ignore[arg-type]
        await async_.aclose()
        return len(runs), counting.requests, counting.sessions, seen

    runs, requests, sessions, seen = asyncio.run(main())
    assert seen[-1].allowed
    assert sessions == 1
    assert requests >= 2  # the bot's head, then the fleet's, then what their books need
    assert runs == requests + 1  # k rounds of reads: the step ran k + 1 times, the store saw k
    assert used(engine, "bot") == (0, 21 * USDT)
    assert used(engine, "fleet") == (0, 21 * USDT)  # counted at every level, in one commit


def test_primitive_data_is_shared_between_the_async_and_the_sync_driver(store: Backend) -> None:
    sync = store.handle()
    at = 1_768_816_800_000_000

    def txn(op: str, **parts: Any) -> Txn:
        t = Txn(op, at)
        for name, value in parts.items():
            setattr(t, name, value)
        return t

    async def main() -> None:
        async_ = open_async(store)
        async with async_.session("s1") as session:
            assert (await session.commit(txn("a1", put={"d/a": {"n": 10**30}},
                    index=[("ix", "m", 5), ("@all", "s1", 1)],
                    append=[("log", {"e": "async"}, None, None)], result={"r": 1}))).applied  # fmt: skip
        assert [e[2] for e in sync.log("s1", "log", 10)] == [{"e": "async"}]
        with sync.session("s1") as s:  # what async wrote, sync reads
            assert s.get(["d/a"]) == {"d/a": (1, {"n": 10**30})}
            assert s.scan("ix", 10, 10) == [("m", 5)]
            assert s.commit(txn("s1", expect={"d/a": 1}, put={"d/a": {"n": 2}}, index=[("ix", "s", 7)],
                                append=[("log", {"e": "sync"}, None, None)])).applied  # fmt: skip
        with sync.session("@", write=False) as s:
            assert s.scan("@all", 10, 10) == [("s1", 1)]
        async with async_.session("s1") as session:  # what sync wrote, async reads
            assert await session.get(["d/a"]) == {"d/a": (2, {"n": 2})}
            assert await session.scan("ix", 10, 10) == [("m", 5), ("s", 7)]
            replay = await session.commit(txn("a1", put={"d/a": {"n": 0}}))  # an id sync saw
            assert (replay.replayed, replay.result) == (True, {"r": 1})
            stale = await session.commit(txn("a2", expect={"d/a": 1}, put={"d/a": {"n": 0}}))
            assert stale.conflict
        assert [e[2] for e in await async_.log("s1", "log", 10)] == [{"e": "sync"}, {"e": "async"}]
        await async_.aclose()

    asyncio.run(main())


# -- Redis: one command, stalls, outages, the 0.1 conversion ----------------------------------------------


def test_an_async_authorize_is_exactly_one_evalsha_in_the_steady_state(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> tuple[list[str], int]:
        storage = AsyncRedisStorage(own_redis.url)
        ledger = AsyncLedger(storage, ManualClock())
        await ledger.set_policy("agent-1", {"limits": {"daily": {"value": str(10**20)}}})
        await ledger.authorize(payment(1))  # warm: the head is cached
        sent: list[str] = []
        original = storage.client.execute_command

        async def counting(*args: Any, **kwargs: Any) -> Any:
            sent.append(str(args[0]))
            return await original(*args, **kwargs)

        monkeypatch.setattr(storage.client, "execute_command", counting)
        probe = redis.Redis.from_url(own_redis.url)
        before = int(probe.info("commandstats")["cmdstat_evalsha"]["calls"])
        for _ in range(25):
            d = await ledger.authorize(payment(1))
            assert isinstance(d, Decision)
            assert d.allowed
        after = int(probe.info("commandstats")["cmdstat_evalsha"]["calls"])
        probe.close()
        await storage.aclose()
        return sent, after - before

    sent, evalsha = asyncio.run(main())
    assert sent == ["EVALSHA"] * 25  # what the client sent
    assert evalsha == 25  # what the server received


def test_a_commit_stalled_past_the_timeout_is_resent_applied_once_and_blocks_no_task(
    own_redis: RedisServer,
) -> None:
    clock = ManualClock()
    engine = PolicyEngine(storage=RedisStorage(own_redis.url), clock=clock)
    engine.set_policy("agent-1", DAILY_100)

    async def main() -> tuple[Any, float, int]:
        storage = AsyncRedisStorage(own_redis.url, timeout=timedelta(seconds=1))
        ledger = AsyncLedger(storage, clock)
        await ledger.authorize(payment(USDT))  # warm
        stall = await asyncio.to_thread(_stall, own_redis.url, 1.5)
        result = await ticking(ledger.authorize(payment(10 * USDT)))
        await asyncio.to_thread(stall.join)
        await storage.aclose()
        return result

    d, gap, ticks = asyncio.run(main())
    assert isinstance(d, Decision)
    assert d.allowed
    assert gap < 0.5  # the loop ran on while the commit waited 1.5 s on the server
    assert ticks >= 40
    decisions = [h for h in engine.history("agent-1") if h.event == "decision"]
    assert len(decisions) == 2  # the warm-up and this one: recorded once, not twice
    assert decisions[0].reservation_id == d.reservation_id  # newest first
    assert used(engine) == (0, 11 * USDT)  # held once
    engine.close()


def test_a_redis_that_never_answers_says_the_outcome_is_unknown_without_blocking(
    own_redis: RedisServer,
) -> None:
    async def main() -> tuple[Any, float, int]:
        storage = AsyncRedisStorage(own_redis.url, timeout=timedelta(milliseconds=200))
        ledger = AsyncLedger(storage, ManualClock())
        await ledger.set_policy("agent-1", DAILY_100)
        await ledger.authorize(payment(USDT))  # warm: the commit is the only command left
        stall = await asyncio.to_thread(_stall, own_redis.url, 2)
        result = await ticking(ledger.authorize(payment(USDT)))
        await asyncio.to_thread(stall.join)
        await storage.aclose()
        return result

    err, gap, _ = asyncio.run(main())
    assert isinstance(err, StorageUnavailableError)
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "whether this change was recorded is unknown" in err.message
    assert gap < 0.5


def test_an_async_redis_outage_fails_closed_and_recovers_by_itself(
    own_redis: RedisServer,
) -> None:
    async def main() -> None:
        storage = AsyncRedisStorage(own_redis.url)
        ledger = AsyncLedger(storage, ManualClock())
        await ledger.set_policy("agent-1", DAILY_100)
        assert isinstance(await ledger.authorize(payment(10 * USDT)), Decision)
        await asyncio.to_thread(own_redis.stop)
        started = time.monotonic()
        for call in (
            lambda: ledger.authorize(payment(USDT)),
            lambda: storage.log("agent-1", "hc/agent-1", 5),
        ):
            with pytest.raises(PolicyError) as err:
                await call()
            assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert time.monotonic() - started < 10
        await asyncio.to_thread(own_redis.start)  # same port, same append-only file
        d = await ledger.authorize(payment(USDT))
        assert isinstance(d, Decision)
        assert d.allowed
        await storage.aclose()

    asyncio.run(main())
    with PolicyEngine(storage=RedisStorage(own_redis.url), clock=ManualClock()) as engine:
        assert used(engine) == (0, 11 * USDT)


def test_the_async_store_reloads_its_script_after_a_script_flush(own_redis: RedisServer) -> None:
    async def main() -> bool:
        storage = AsyncRedisStorage(own_redis.url)
        ledger = AsyncLedger(storage, ManualClock())
        await ledger.set_policy("agent-1", DAILY_100)
        redis.Redis.from_url(own_redis.url).script_flush()  # our own server: ours to flush
        d = await ledger.authorize(payment(USDT))
        await storage.aclose()
        return isinstance(d, Decision) and d.allowed

    assert asyncio.run(main())


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_0_1_redis_data_is_converted_on_first_async_use(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
    prefix = f"mig-{uuid.uuid4().hex[:8]}:"
    client: Any
    if kind == "redis":
        client = redis.Redis.from_url(url, decode_responses=True)
    else:
        client = redis.cluster.RedisCluster.from_url(
            url.replace("+cluster", ""), decode_responses=True
        )
    info = load_redis_fixture(client, prefix)

    async def main() -> Any:
        storage = AsyncRedisStorage(url, key_prefix=prefix)
        async with storage.session("agent-1", write=False) as session:  # the first use converts
            found = await session.get(["h/agent-1"])
        await storage.aclose()
        return found

    head = asyncio.run(main())
    assert head["h/agent-1"][1]["pv"] == 2
    assert client.get(prefix + "schema") == "3"
    assert not client.exists(prefix + "{agent-1}:policy")  # the 0.1 keys are gone
    with PolicyEngine(
        storage=RedisStorage(url, key_prefix=prefix), clock=ManualClock(MIGRATION_AT)
    ) as e:
        check_converted(e, info)
    client.close()


# -- PostgreSQL: outages, lost commits, locks, round trips, schemas ----------------------------------------


def _lose_the_answer(monkeypatch: pytest.MonkeyPatch, *, before: bool) -> list[int]:
    """Make the next commit lose its connection, before or after the server commits."""
    real = _AsyncPostgresSession._apply
    lost: list[int] = []

    async def apply(self: Any, txn: Txn) -> None:
        if lost:
            await real(self, txn)
            return
        lost.append(1)
        conn = self.conn
        if before:  # the server ends the session before the commit reaches it
            with psycopg.connect(conn.info.dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            await real(self, txn)  # fails: the connection is gone
            raise AssertionError("the commit went through a terminated connection")
        await real(self, txn)  # committed; its answer is lost
        await conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(_AsyncPostgresSession, "_apply", apply)
    return lost


@pytest.mark.parametrize("before", [True, False])
def test_an_async_commit_whose_connection_is_lost_is_resent_and_applied_once(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    clock = ManualClock()

    async def main() -> Any:
        storage = AsyncPostgresStorage(pg_schema)
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        lost = _lose_the_answer(monkeypatch, before=before)
        d = await ledger.authorize(payment(10 * USDT))
        assert lost == [1]
        await storage.aclose()
        return d

    d = asyncio.run(main())
    assert isinstance(d, Decision)
    assert d.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as engine:
        decisions = [h for h in engine.history("agent-1") if h.event == "decision"]
        assert [h.reservation_id for h in decisions] == [d.reservation_id]  # one record
        assert used(engine) == (0, 10 * USDT)  # held once, not twice


def test_a_lost_async_commit_that_cannot_be_resent_says_the_outcome_is_unknown(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()

    async def main() -> None:
        storage = AsyncPostgresStorage(pg_schema, pool_timeout=timedelta(seconds=1))
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        _lose_the_answer(monkeypatch, before=False)
        real_getconn = storage._getconn
        calls: list[int] = []

        async def no_more_connections() -> Any:
            calls.append(1)
            if len(calls) == 1:
                return await real_getconn()  # the session's own connection
            raise StorageUnavailableError("no connection")

        monkeypatch.setattr(storage, "_getconn", no_more_connections)
        with pytest.raises(PolicyError) as err:
            await ledger.authorize(payment(USDT))
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "unknown" in err.value.message  # not "nothing was changed": it was
        monkeypatch.undo()
        await storage.aclose()

    asyncio.run(main())
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as engine:
        assert used(engine) == (0, USDT)  # it had been applied, once


def test_waiting_on_a_held_row_blocks_no_task_and_fails_closed_at_the_lock_timeout(
    pg_schema: str,
) -> None:
    holder = open_storage(pg_schema)
    clock = ManualClock()

    async def main() -> tuple[Any, float, int, Any]:
        storage = AsyncPostgresStorage(pg_schema, lock_timeout=timedelta(milliseconds=800))
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        await ledger.set_policy("agent-2", DAILY_100)
        with holder.session("agent-1") as session:
            session.get(["h/agent-1"])  # takes agent-1's row
            other = asyncio.create_task(ledger.authorize(payment(USDT, agent_id="agent-2")))
            result = await ticking(ledger.authorize(payment(USDT)))
            elsewhere = await other  # another agent went through meanwhile
        after = await ledger.authorize(payment(USDT))  # once let go, all is well
        await storage.aclose()
        return (*result, (elsewhere, after))

    err, gap, ticks, (elsewhere, after) = asyncio.run(main())
    holder.close()
    assert isinstance(err, StorageUnavailableError)
    assert "lock" in err.message
    assert gap < 0.5  # the loop ran on while the server held the call
    assert ticks >= 30
    assert isinstance(elsewhere, Decision)
    assert elsewhere.allowed
    assert isinstance(after, Decision)
    assert after.allowed


def test_an_async_postgres_that_goes_away_fails_closed_and_recovers_by_itself(
    own_postgres: PostgresServer,
) -> None:
    clock = ManualClock()

    async def main() -> tuple[list[str], float]:
        storage = AsyncPostgresStorage(own_postgres.url)
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        kept = await ledger.authorize(payment(10 * USDT))
        assert isinstance(kept, Decision)
        await asyncio.to_thread(own_postgres.stop)
        ticker = Ticker()
        ticker.start()
        for call in (
            lambda: ledger.authorize(payment(USDT)),
            lambda: storage.log("agent-1", "hc/agent-1", 5),
        ):
            started = time.monotonic()
            with pytest.raises(PolicyError) as err:
                await call()
            assert time.monotonic() - started < 6  # fails closed quickly
            assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
            assert "nothing was allowed" in err.value.message
        gap = await ticker.stop()
        await asyncio.to_thread(own_postgres.start)  # same port, same data
        deadline = time.monotonic() + 15
        failures: list[str] = []
        while True:  # real time: the pool reconnects by itself
            try:
                d = await ledger.authorize(payment(USDT))
                break
            except PolicyError as err:
                failures.append(err.code)
            assert time.monotonic() < deadline, f"no recovery within 15 s: {failures}"
        assert isinstance(d, Decision)
        assert d.allowed
        await storage.aclose()
        return failures, gap

    failures, gap = asyncio.run(main())
    assert set(failures) <= {ErrorCode.STORAGE_UNAVAILABLE}
    assert gap < 0.5
    with PolicyEngine(storage=open_storage(own_postgres.url), clock=clock) as engine:
        assert used(engine) == (0, 11 * USDT)  # nothing committed before the outage was lost


def test_an_async_authorize_is_two_round_trips_in_the_steady_state(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from psycopg import _pipeline_base

    async def main() -> tuple[int, list[str]]:
        storage = AsyncPostgresStorage(pg_schema)
        ledger = AsyncLedger(storage, ManualClock())
        await ledger.set_policy("agent-1", {"limits": {"daily": {"value": str(10**20)}}})
        for _ in range(10):  # warm: the policy is parsed, the statements prepared
            await ledger.authorize(payment(1))
        real = _pipeline_base.BasePipeline._enqueue_sync
        syncs: list[int] = []

        def counting(self: Any) -> None:
            syncs.append(1)
            real(self)

        sent: list[str] = []
        real_execute = psycopg.AsyncConnection.execute

        async def outside_pipelines(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            if self._pipeline is None:
                sent.append(str(query))
            return await real_execute(self, query, *args, **kwargs)

        monkeypatch.setattr(_pipeline_base.BasePipeline, "_enqueue_sync", counting)
        monkeypatch.setattr(psycopg.AsyncConnection, "execute", outside_pipelines)
        for _ in range(25):
            d = await ledger.authorize(payment(1))
            assert isinstance(d, Decision)
            assert d.allowed
        monkeypatch.undo()
        await storage.aclose()
        return len(syncs), sent

    syncs, sent = asyncio.run(main())
    assert syncs == 2 * 25  # lock and read; write and commit
    assert sent == []


def test_the_async_store_creates_the_tables_and_refuses_a_newer_layout(pg_schema: str) -> None:
    from tests.test_postgres import sql

    async def first_use() -> Any:
        async with AsyncPostgresStorage(pg_schema) as storage, storage.session("s1") as session:
            return await session.get(["d/a"])

    assert asyncio.run(first_use()) == {}
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(1,)]
    sql(pg_schema, "UPDATE @s.schema_version SET version = 99")
    with pytest.raises(PolicyError) as err:
        asyncio.run(first_use())
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "upgrade agentpolicy" in err.value.message
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(99,)]


def test_a_closed_async_postgres_storage_refuses_calls(pg_schema: str) -> None:
    async def main() -> None:
        storage = AsyncPostgresStorage(pg_schema)
        await storage.aclose()
        with pytest.raises(PolicyError) as err:
            async with storage.session("s1") as session:
                await session.get(["d/a"])
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE

    asyncio.run(main())


def test_an_unreachable_async_store_fails_closed_quickly() -> None:
    port = free_port()

    async def main(storage: AsyncStorage) -> PolicyError:
        try:
            async with storage.session("s1") as session:
                await session.get(["d/a"])
        except PolicyError as err:
            return err
        finally:
            await storage.aclose()
        raise AssertionError("no error")

    stores: list[AsyncStorage] = [
        AsyncRedisStorage(f"redis://127.0.0.1:{port}/0"),
        AsyncPostgresStorage(f"postgresql://u:hunter2@127.0.0.1:{port}/db",
                             pool_timeout=timedelta(seconds=1)),
    ]  # fmt: skip
    for storage in stores:
        started = time.monotonic()
        err = asyncio.run(main(storage))
        assert time.monotonic() - started < 8
        assert err.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "hunter2" not in err.message


def test_a_call_cancelled_while_it_waits_for_a_row_leaves_nothing_behind(pg_schema: str) -> None:
    """The waiting statement is cancelled on the server, the transaction rolled back and the
    connection returned to the pool; nothing was written and the next call goes through."""
    holder = open_storage(pg_schema)
    clock = ManualClock()

    async def main() -> tuple[dict[str, int], Any]:
        storage = AsyncPostgresStorage(pg_schema, pool_size=1)  # a leaked connection would show
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        with holder.session("agent-1") as session:
            session.get(["h/agent-1"])  # takes agent-1's row
            call = asyncio.create_task(ledger.authorize(payment(USDT)))
            await asyncio.sleep(0.3)  # the call waits for the row, on the server
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        stats = storage._pool.get_stats()
        after = await ledger.authorize(payment(2 * USDT))
        await storage.aclose()
        return stats, after

    stats, after = asyncio.run(main())
    holder.close()
    assert stats.get("pool_available", 0) == 1  # the one connection is back in the pool
    assert isinstance(after, Decision)
    assert after.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as engine:
        assert used(engine) == (0, 2 * USDT)  # the cancelled call wrote nothing


def test_an_async_commit_deadlocked_at_every_attempt_is_a_conflict_and_writes_nothing(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[int] = []

    async def deadlocked(self: Any, txn: Txn) -> None:
        tries.append(1)
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    async def main() -> tuple[Outcome, Any]:
        storage = AsyncPostgresStorage(pg_schema)
        txn = Txn("op1", 1)
        txn.put = {"d/a": {"n": 1}}
        with monkeypatch.context() as patched:
            patched.setattr(_AsyncPostgresSession, "_apply", deadlocked)
            async with storage.session("s1") as session:
                outcome = await session.commit(txn)  # the runner runs the step again
        async with storage.session("s1", write=False) as session:
            found = await session.get(["d/a"])
        await storage.aclose()
        return outcome, found

    outcome, found = asyncio.run(main())
    assert outcome.conflict
    assert len(tries) == 4  # tried again, as the sync store does
    assert found == {}


def test_the_async_store_prunes_old_operation_ids_and_expired_documents(pg_schema: str) -> None:
    from tests.test_postgres import sql

    clock = ManualClock()

    async def main() -> None:
        storage = AsyncPostgresStorage(pg_schema)
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", {"limits": {"monthly": {"value": str(10**12)}}})
        for i in range(5):
            await ledger.authorize(payment(1, idempotency_key=f"day0-{i}"))
        clock.advance(hours=49)  # deleted a day after their time (storage.base.PRUNE_SLACK_US)
        await ledger.authorize(payment(1, idempotency_key="day1"))
        storage._commits_until_prune = 1  # every 1,000 commits: now
        await ledger.authorize(payment(1))
        await storage.aclose()

    asyncio.run(main())
    keys = sql(pg_schema, "SELECT name FROM @s.docs WHERE name LIKE 'i/%%' ORDER BY name")
    assert keys == [("i/agent-1/day1",)]
    assert sql(pg_schema, "SELECT count(*) FROM @s.ops")[0][0] == 2  # today's two
