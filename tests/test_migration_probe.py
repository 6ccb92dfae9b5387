"""An adversarial probe of opening data of agentpolicy 0.1 with this version.

Each test plays an operator having a bad day during the upgrade: a process
killed (or failing) between any two writes of the conversion, several
processes opening the same 0.1 file or Redis prefix at once, an async open
cancelled, Redis stalling past the socket timeout, a read-only file, a full
disk, and 0.1 data with odd content (agent ids with ``*``, braces, over 64
characters, ending in ``:v``; huge amounts; counters of ended windows). After
each, every 0.1 limit holds exactly: spent and reserved carried over, the
open reservation and the pending approval usable once, history kept and
never doubled, and a failure is a store's error that leaves the data
openable again.

The 0.1 data is the fixture of ``tests/test_migration.py`` (written by 0.1),
with agent-1's keys renamed for other agents as 0.1 would have named them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

from agentpolicy import ApprovalStatus, PolicyEngine, ReservationStatus
from agentpolicy.errors import ErrorCode, PolicyError
from agentpolicy.storage import SQLiteStorage, _migrate
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.redis_servers import RedisServer
from tests.test_migration import AT, FIXTURES, USDT, check_converted, copy_db

DUMP = json.loads((FIXTURES / "v01-redis.json").read_text())
SQLITE_INFO = json.loads((FIXTURES / "v01-sqlite.json").read_text())
LONG = "x" * 70


class Died(BaseException):
    """The process stopped here (as a kill would: no handler runs)."""


# -- 0.1 data on Redis ---------------------------------------------------------------------------


def old_tag(agent: str) -> str:
    """The hash tag 0.1 gave an agent (redis.py of 0.1, ``agent_tag``)."""
    if 1 <= len(agent) <= 64 and "{" not in agent and "}" not in agent:
        return agent
    return "h" + hashlib.sha256(agent.encode()).hexdigest()[:32]


def put_v01_agent(client: Any, prefix: str, agent: str) -> dict[str, str]:
    """The fixture's agent-1 as ``agent`` under ``prefix``, as 0.1 wrote it.

    10 USDT confirmed, 3 in an open reservation, 60 held for a pending
    approval (daily limit 100), an idempotency key, history.
    """
    tag = old_tag(agent)

    def swap(text: str) -> str:
        return text.replace("_agent-1", "_" + tag).replace("agent-1", agent)

    for key, item in DUMP["keys"].items():
        if not key.startswith("v01:{agent-1}:"):
            continue
        new = prefix + "{" + tag + "}:" + swap(key.removeprefix("v01:{agent-1}:"))
        kind, value = item["type"], item["value"]
        if kind == "string":
            client.set(new, swap(value))
        elif kind == "hash":
            client.hset(new, mapping={swap(k): swap(v) for k, v in value.items()})
        elif kind == "list":
            client.rpush(new, *(swap(v) for v in value))
        elif kind == "zset":
            client.zadd(new, {swap(m): s for m, s in value})
    client.sadd(prefix + "agents", agent)
    info = DUMP["info"]
    return {"open": swap(info["open_reservation"]), "approval": swap(info["pending_approval"])}


def daily(engine: PolicyEngine, agent: str) -> tuple[int, int]:
    w = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    return w.spent.value, w.reserved.value


def check_agent(engine: PolicyEngine, agent: str, info: dict[str, str]) -> int:
    """Every 0.1 limit of ``put_v01_agent`` holds exactly; the number of history records."""
    assert daily(engine, agent) == (10 * USDT, 63 * USDT)
    records = len(engine.history(agent))
    assert engine.get_reservation(info["open"]).status is ReservationStatus.RESERVED
    assert engine.confirm(info["open"]).status is ReservationStatus.CONFIRMED
    assert engine.confirm(info["open"]).status is ReservationStatus.CONFIRMED  # once
    assert daily(engine, agent) == (13 * USDT, 60 * USDT)
    approved = engine.decide(info["approval"], "boss@example.com", "approve")
    assert approved.status is ApprovalStatus.APPROVED
    assert approved.reservation_id is not None
    engine.confirm(approved.reservation_id)
    assert daily(engine, agent) == (73 * USDT, 0)
    assert engine.authorize(payment(28 * USDT, agent_id=agent)).code == "DAILY_LIMIT"
    assert engine.authorize(payment(27 * USDT, agent_id=agent)).allowed
    return records


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def prefixes(client: Any) -> Iterator[Callable[[], str]]:
    """New key prefixes of this test, deleted afterwards (never a flush)."""
    made: list[str] = []

    def new() -> str:
        made.append(f"mprobe-{uuid.uuid4().hex[:10]}:")
        return made[-1]

    yield new
    for prefix in made:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)


def engine_on(url: str, prefix: str, **options: Any) -> PolicyEngine:
    return PolicyEngine(
        storage=RedisStorage(url, key_prefix=prefix, **options), clock=ManualClock(AT)
    )


def history_of_clean_conversion(url: str, client: Any, prefix: str, agents: list[str]) -> int:
    infos = {a: put_v01_agent(client, prefix, a) for a in agents}
    with engine_on(url, prefix) as engine:
        return sum(len(engine.history(a)) for a in infos)


# -- odd agent ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agents",
    [
        pytest.param(["a*", "ab", "a?", "aX", "a[b]", "ab]"], id="glob"),
        pytest.param(["br{ace}", LONG, "h" + "0" * 32], id="digest-tags"),
        pytest.param(["x:v", "h/bot", "plain"], id="colons-slashes"),
    ],
)
def test_odd_agent_ids_keep_their_own_0_1_data_and_ids(
    agents: list[str], redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    odd_ids(agents, redis_url, client, prefixes())


def test_odd_agent_ids_on_a_cluster(redis_cluster_url: str) -> None:
    """The pointer of a digest-tagged id lives in another slot than the agent's keys."""
    plain = redis_cluster_url.replace("+cluster", "")
    cluster: Any = redis.cluster.RedisCluster.from_url(plain, decode_responses=True)
    prefix = f"mprobe-{uuid.uuid4().hex[:10]}:"
    try:
        odd_ids(["a*", "ab", "br{ace}", LONG, "x:v"], redis_cluster_url, cluster, prefix)
    finally:
        for key in cluster.scan_iter(match=prefix + "*"):
            cluster.delete(key)
        cluster.close()


def odd_ids(agents: list[str], url: str, client: Any, prefix: str) -> None:
    """'a*' was a SCAN pattern matching 'ab''s keys (converted as a*'s, then deleted: 'ab'
    had no policy and its ids were not found); 0.1 ended the ids of 'br{ace}' and of a
    70-character id with a digest, which this version read as the id of an agent of that
    name (RESERVATION_NOT_FOUND, APPROVAL_NOT_FOUND: 63 USDT held that nothing could
    confirm); an approval id ending in ':v' was taken for a list of votes (its approval
    was lost)."""
    infos = {a: put_v01_agent(client, prefix, a) for a in agents}
    with engine_on(url, prefix) as engine:
        for agent, info in infos.items():
            assert check_agent(engine, agent, info) == 9, agent
        assert [p.agent_id for p in engine.list_policies()] == sorted(agents)
    assert client.get(prefix + "schema") == "3"
    left = [k for k in client.scan_iter(match=prefix + "*") if k.endswith((":policy", ":h"))]
    assert left == []  # every 0.1 key is gone


def test_the_scan_for_an_agents_0_1_keys_matches_its_id_literally(
    client: Any, prefixes: Callable[[], str]
) -> None:
    prefix = prefixes()
    for tag in ("a*", "ab", "a?", "aX", "a[b]", "ab]", "a]"):
        client.set(prefix + "{" + tag + "}:seq", "1")
    for tag in ("a*", "a?", "a[b]", "ab]"):
        pattern = _migrate._glob(prefix + "{" + tag + "}:") + "*"
        assert list(client.scan_iter(match=pattern)) == [prefix + "{" + tag + "}:seq"]


@pytest.mark.parametrize("agent", ["~zz", "~41"])
def test_ids_of_0_1_for_an_agent_id_beginning_with_a_tilde(
    agent: str, redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    odd_ids([agent], redis_url, client, prefixes())


def test_huge_counters_and_ended_windows_of_0_1_on_redis(
    redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    """A day later the 0.1 daily window has ended, the monthly has not; release, once."""
    prefix = prefixes()
    info = put_v01_agent(client, prefix, "agent-1")
    monthly_key = prefix + "{agent-1}:c:monthly:2026-03-01T00:00:00+00:00"
    client.hset(monthly_key, "s", str(10**40))
    later = datetime(2026, 3, 11, 9, 0, tzinfo=UTC)
    storage = RedisStorage(redis_url, key_prefix=prefix)
    with PolicyEngine(storage=storage, clock=ManualClock(later)) as engine:

        def monthly() -> tuple[int, int]:
            w = engine.budget("agent-1", "monthly").periods["monthly"]  # type: ignore[index]
            return w.spent.value, w.reserved.value

        assert daily(engine, "agent-1") == (0, 0)
        assert monthly() == (10**40, 3 * USDT)  # the 60 held for the approval expired
        assert engine.release(info["open"]).status is ReservationStatus.RELEASED
        assert engine.release(info["open"]).status is ReservationStatus.RELEASED  # once
        assert monthly() == (10**40, 0)
        with pytest.raises(PolicyError) as err:
            engine.confirm(info["open"])
        assert err.value.code is ErrorCode.RESERVATION_RELEASED
        assert engine.get_approval(info["approval"]).status is ApprovalStatus.EXPIRED
        assert engine.authorize(payment(1)).code == "MONTHLY_LIMIT"


# -- damaged 0.1 data ------------------------------------------------------------------------------

COUNTER = "{agent-1}:c:daily:2026-03-10T00:00:00+00:00"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda c, p: (c.delete(p + COUNTER), c.set(p + COUNTER, "x")), id="wrongtype"),
        pytest.param(lambda c, p: (c.delete(p + "agents"), c.set(p + "agents", "x")), id="agents"),
        pytest.param(lambda c, p: c.hset(p + COUNTER, "s", "-5000000"), id="negative"),
        pytest.param(lambda c, p: c.hset(p + "{agent-1}:policy", "version", "7"), id="version"),
    ],
)
def test_damaged_redis_data_of_0_1_is_refused_before_anything_is_converted(
    damage: Callable[[Any, str], Any], redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    """A 0.1 key holding another type was INTERNAL ('Redis refused a command: WRONGTYPE');
    a negative counter or a current version that is not stored were converted, and then
    every budget read was INVALID_INPUT, or every call of the agent INTERNAL, for good."""
    prefix = prefixes()
    info = put_v01_agent(client, prefix, "agent-1")
    damage(client, prefix)
    with pytest.raises(PolicyError) as err, engine_on(redis_url, prefix) as engine:
        engine.get_policy("agent-1")
    assert err.value.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "written by agentpolicy 0.1" in str(err.value)
    assert client.get(prefix + "schema") is None
    assert client.hget(prefix + "{agent-1}:policy", "body") is not None  # left as it was
    for key in list(client.scan_iter(match=prefix + "*")):  # repaired from the backup
        client.delete(key)
    info = put_v01_agent(client, prefix, "agent-1")
    with engine_on(redis_url, prefix) as engine:
        assert check_agent(engine, "agent-1", info) == 9


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE counters SET spent = '-50000000' WHERE agent_id = 'agent-1'",
        "UPDATE counters SET reserved = '-1' WHERE agent_id = 'org:agent 2'",
        "UPDATE current_policies SET version = 7 WHERE agent_id = 'agent-1'",
        "UPDATE policies SET version = 'two' WHERE agent_id = 'agent-1' AND version = 1",
    ],
)
def test_a_sqlite_file_of_0_1_that_could_not_be_used_once_converted_is_refused(
    tmp_path: Path, damage: str
) -> None:
    path = copy_db(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(damage)
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(path)
    assert err.value.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "left as it was" in str(err.value)
    assert schema_of(path) == 2


# -- a conversion stopped between two writes -------------------------------------------------------

WRITES = {"EVALSHA", "EVAL", "DEL", "SET", "ZADD", "ZREM", "UNLINK"}


@contextlib.contextmanager
def dying_after(writes: int, die: Callable[[], None]) -> Iterator[list[int]]:
    """Every Redis client of this process stops (``die``) right after its ``writes``-th write."""
    original = redis.Redis.execute_command
    count = [0]

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if str(args[0]).upper() in WRITES:
            count[0] += 1
            if count[0] == writes:
                die()
        return result

    redis.Redis.execute_command = execute  # type: ignore[method-assign]
    try:
        yield count
    finally:
        redis.Redis.execute_command = original  # type: ignore[method-assign]


def raise_died() -> None:
    raise Died


TWO = ["agent-1", LONG]


def test_a_conversion_stopped_after_any_write_is_finished_by_the_next_open(
    redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    """Stopped after each of its writes (commits, deletions, the mark), the next open
    finishes it: nothing lost (the next open deleted the converted agent's new keys
    with its 0.1 ones), nothing doubled."""
    reference = history_of_clean_conversion(redis_url, client, prefixes(), TWO)
    prefix = prefixes()
    for a in TWO:
        put_v01_agent(client, prefix, a)
    with dying_after(10**9, raise_died) as count:
        RedisStorage(redis_url, key_prefix=prefix).session("x")
    total = count[0]
    assert total > 30  # two commits, a pointer, the deletions, the mark
    for stop in range(1, total + 1):
        prefix = prefixes()
        infos = {a: put_v01_agent(client, prefix, a) for a in TWO}
        with pytest.raises(Died), dying_after(stop, raise_died):
            RedisStorage(redis_url, key_prefix=prefix).session("x")
        with engine_on(redis_url, prefix) as engine:
            assert sum(check_agent(engine, a, i) for a, i in infos.items()) == reference, stop
        assert client.get(prefix + "schema") == "3"


def _killed_open(url: str, prefix: str, stop: int) -> None:
    with dying_after(stop, lambda: os.kill(os.getpid(), signal.SIGKILL)):
        RedisStorage(url, key_prefix=prefix).session("x")


def test_a_process_killed_during_the_conversion_leaves_it_to_the_next(
    redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    ctx = multiprocessing.get_context("spawn")
    for stop in (1, 2, 3, 20):
        prefix = prefixes()
        infos = {a: put_v01_agent(client, prefix, a) for a in TWO}
        proc = ctx.Process(target=_killed_open, args=(redis_url, prefix, stop))
        proc.start()
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL
        assert client.get(prefix + "schema") is None
        with engine_on(redis_url, prefix) as engine:
            for a, i in infos.items():
                assert check_agent(engine, a, i) == 9


# -- two processes at once ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scan_iter", "hgetall"])
def test_another_process_converting_between_two_reads_of_a_slower_one(
    method: str, redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    """Right after the slower process's scan (or its first read), another one converts
    everything: the keys it found are gone, or half of what it read is. This was 'a
    stored value is damaged' (STORAGE_UNAVAILABLE) for the slower process."""
    prefix = prefixes()
    infos = {a: put_v01_agent(client, prefix, a) for a in TWO}
    slow = RedisStorage(redis_url, key_prefix=prefix)
    read = getattr(slow.client, method)
    other: list[int] = []

    def read_then_other(*args: Any, **kwargs: Any) -> Any:
        found = read(*args, **kwargs)
        found = iter(list(found)) if method == "scan_iter" else found
        if not other:
            other.append(1)
            RedisStorage(redis_url, key_prefix=prefix).session("x")  # converts it all
        return found

    setattr(slow.client, method, read_then_other)
    with PolicyEngine(storage=slow, clock=ManualClock(AT)) as engine:
        assert engine.get_policy("agent-1") is not None
        assert other == [1]
        for a, i in infos.items():
            assert check_agent(engine, a, i) == 9


def test_a_0_1_key_that_expires_between_the_scan_and_its_read_is_skipped(
    redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    """0.1 gave its keys a TTL: a released reservation's may run out mid-conversion."""
    prefix = prefixes()
    info = put_v01_agent(client, prefix, "agent-1")
    released = prefix + "{agent-1}:r:res_070e62253af14f8b95edd1c19c5a84f4_agent-1"
    assert client.hget(released, "status") == "released"
    storage = RedisStorage(redis_url, key_prefix=prefix)
    scan = storage.client.scan_iter

    def scan_then_expire(*args: Any, **kwargs: Any) -> Iterator[Any]:
        found = list(scan(*args, **kwargs))
        client.delete(released)
        return iter(found)

    storage.client.scan_iter = scan_then_expire
    with PolicyEngine(storage=storage, clock=ManualClock(AT)) as engine:
        assert check_agent(engine, "agent-1", info) == 9


def test_other_threads_wait_for_the_conversion_of_the_first_call(
    redis_url: str,
    client: Any,
    prefixes: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread's call while another thread of the process converted went on: agent-1 had
    no policy (NO_POLICY), and a policy set meanwhile made the conversion skip agent-1:
    its 10 spent and 63 reserved were lost, then 95 of a daily 100 were allowed."""
    prefix = prefixes()
    info = put_v01_agent(client, prefix, "agent-1")
    storage = RedisStorage(redis_url, key_prefix=prefix)
    engine = PolicyEngine(storage=storage, clock=ManualClock(AT))
    started, go = threading.Event(), threading.Event()
    reading = _migrate._redis_agent

    def held(*args: Any) -> Any:
        started.set()
        assert go.wait(30)
        return reading(*args)

    class Noted:
        """The store's lock, noting a second thread waiting for it."""

        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def __enter__(self) -> None:
            if started.is_set():
                go.set()
            self.lock.__enter__()

        def __exit__(self, *exc: object) -> None:
            self.lock.__exit__(*exc)

    monkeypatch.setattr(_migrate, "_redis_agent", held)
    storage._schema_lock = Noted(threading.Lock())  # type: ignore[assignment]
    first = threading.Thread(target=lambda: engine.get_policy("agent-1"))
    first.start()
    assert started.wait(30)
    versions: list[int] = []

    def second() -> None:
        versions.append(engine.set_policy("agent-1", {"limits": {"daily": {"value": "1"}}}))
        go.set()

    other = threading.Thread(target=second)
    other.start()
    other.join(30)
    first.join(30)
    assert versions == [3]  # after 0.1's versions 1 and 2
    assert daily(engine, "agent-1") == (10 * USDT, 63 * USDT)
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * USDT)}}})
    assert check_agent(engine, "agent-1", info) == 11  # 9 of 0.1, 2 policies set
    engine.close()


def _open_at_once(url: str, prefix: str, barrier: Any) -> str:
    storage = RedisStorage(url, key_prefix=prefix)
    barrier.wait()
    try:
        with PolicyEngine(storage=storage, clock=ManualClock(AT)) as engine:
            return str(daily(engine, "agent-1"))
    except PolicyError as exc:
        return f"{exc.code}: {exc}"


def test_processes_opening_one_0_1_prefix_at_once_convert_it_once(
    redis_url: str, client: Any, prefixes: Callable[[], str]
) -> None:
    reference = history_of_clean_conversion(redis_url, client, prefixes(), TWO)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        for _ in range(2):
            prefix = prefixes()
            infos = {a: put_v01_agent(client, prefix, a) for a in TWO}
            barrier = manager.Barrier(4)
            with ctx.Pool(4) as pool:
                seen = pool.starmap(_open_at_once, [(redis_url, prefix, barrier)] * 4)
            assert seen == [str((10 * USDT, 63 * USDT))] * 4
            with engine_on(redis_url, prefix) as engine:
                assert sum(check_agent(engine, a, i) for a, i in infos.items()) == reference


# -- a Redis that stalls past the timeout -------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path, redis_url: str) -> Iterator[RedisServer]:
    del redis_url  # skip or fail as the session fixture does when Redis is missing
    if shutil.which("redis-server") is None:
        pytest.skip("this test starts its own redis-server")
    server = RedisServer(tmp_path / "own", "--enable-debug-command", "yes")
    server.start()
    yield server
    server.stop()


def stall(url: str, seconds: float) -> threading.Thread:
    """DEBUG SLEEP on a server of this test; returns once it has begun."""

    def sleep() -> None:
        c = redis.Redis.from_url(url, socket_timeout=seconds + 5)
        c.execute_command("DEBUG", "SLEEP", seconds)
        c.close()

    thread = threading.Thread(target=sleep)
    thread.start()
    probe = redis.Redis.from_url(url, socket_timeout=0.1)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                probe.ping()
            except redis.TimeoutError:
                break
            assert time.monotonic() < deadline, "DEBUG SLEEP never reached the server"
            time.sleep(0.005)  # waiting for the server, not for the clock
    finally:
        probe.close()
    return thread


def test_redis_stalling_during_the_conversion_is_a_store_error_and_heals(
    own_server: RedisServer,
) -> None:
    url = own_server.url
    c = redis.Redis.from_url(url, decode_responses=True)
    for stop in (1, 3, 12):
        prefix = f"stall{stop}:"
        infos = {a: put_v01_agent(c, prefix, a) for a in TWO}
        sleeping: list[threading.Thread] = []

        def begin(sleeping: list[threading.Thread] = sleeping) -> None:
            sleeping.append(stall(url, 1.0))

        with pytest.raises(PolicyError) as err, dying_after(stop, begin):
            RedisStorage(url, key_prefix=prefix, timeout=timedelta(milliseconds=100)).session("x")
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        sleeping[0].join(30)
        with engine_on(url, prefix) as engine:
            for a, i in infos.items():
                assert check_agent(engine, a, i) == 9
    c.close()


# -- an async open cancelled ----------------------------------------------------------------------------


def test_an_async_open_cancelled_at_each_point_converts_once(
    redis_url: str, client: Any, prefixes: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled before its GET, during it, while converting in its worker thread (which
    goes on: the next call converts beside it), or after: nothing doubles, the numbers hold."""
    converting = AsyncRedisStorage._convert
    calls: list[int] = []
    started, resume = threading.Event(), threading.Event()

    def held(self: AsyncRedisStorage) -> None:
        calls.append(1)
        if len(calls) == 1 and not resume.is_set():
            started.set()  # the first conversion waits until the next call's is done
            assert resume.wait(30)
        converting(self)

    monkeypatch.setattr(AsyncRedisStorage, "_convert", held)

    async def cancelled_after(prefix: str, turns: int | None) -> None:
        storage = AsyncRedisStorage(redis_url, key_prefix=prefix)

        async def use() -> None:
            async with storage.session("agent-1", write=False):
                pass

        task = asyncio.create_task(use())
        if turns is None:
            assert await asyncio.to_thread(started.wait, 30)
        for _ in range(turns or 0):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with storage.session("agent-1", write=False):  # the next call
            pass
        resume.set()
        await storage.aclose()

    for turns in (None, 0, 1, 2, 3, 5, 8, 13, 40):
        calls.clear()
        prefix = prefixes()
        infos = {a: put_v01_agent(client, prefix, a) for a in TWO}
        asyncio.run(cancelled_after(prefix, turns))  # waits for the worker threads too
        if turns is None:
            assert len(calls) == 2  # the cancelled call's thread and the next call's
        elif turns == 0:
            assert len(calls) == 1  # cancelled before it began: only the next call's
        assert client.get(prefix + "schema") == "3"
        with engine_on(redis_url, prefix) as engine:
            for a, i in infos.items():
                assert check_agent(engine, a, i) == 9, turns


# -- SQLite: killed, shared, read-only, full ----------------------------------------------------------


def _in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked child; its exit status (a negative signal when killed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            work()
        except PolicyError as exc:
            code = 3 if exc.code is ErrorCode.STORAGE_UNAVAILABLE else 4
        except BaseException:  # anything else is a failure of the probe
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _kill_at_statement(path: Path, stop: int, told: int | None = None) -> Callable[[], None]:
    """Open ``path``, killed at its ``stop``-th statement (or, with ``told``, a pipe's
    writing end, there it says so and waits to be killed)."""

    def work() -> None:
        original = sqlite3.connect
        count = [0]

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn = original(*args, **kwargs)

            def trace(_: str) -> None:
                count[0] += 1
                if count[0] == stop:
                    if told is not None:
                        os.write(told, b"x")
                        signal.pause()
                    os.kill(os.getpid(), signal.SIGKILL)

            conn.set_trace_callback(trace)
            return conn

        sqlite3.connect = connect  # type: ignore[assignment]
        SQLiteStorage(path).close()

    return work


def schema_of(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0])


@pytest.fixture
def forking() -> Iterator[None]:
    """os.fork() from a test: fine here (the child only opens a file and exits)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_a_process_killed_at_any_statement_of_the_sqlite_conversion(
    tmp_path: Path, forking: None
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    with PolicyEngine(storage=SQLiteStorage(copy_db(reference)), clock=ManualClock(AT)) as engine:
        records = len(engine.history("agent-1"))
    killed = 0
    for stop in range(1, 400, 7):
        folder = tmp_path / str(stop)
        folder.mkdir()
        path = copy_db(folder)
        status = _in_child(_kill_at_statement(path, stop))
        if status == 0:
            break
        assert status == -signal.SIGKILL
        killed += 1
        assert schema_of(path) in (2, 3)
        with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
            assert len(engine.history("agent-1")) == records, stop  # kept, not doubled
            check_converted(engine, SQLITE_INFO)
    assert killed > 10


def test_a_process_killed_holding_the_conversion_lets_a_waiting_one_convert(
    tmp_path: Path, forking: None
) -> None:
    """One process is killed in the middle of the conversion's transaction while another
    waits for the file's lock: the other converts it, once."""
    for stop in (14, 30, 60):  # in the transaction: BEGIN IMMEDIATE is the 13th
        folder = tmp_path / str(stop)
        folder.mkdir()
        path = copy_db(folder)
        told_read, told_write = os.pipe()
        first = os.fork()
        if first == 0:  # pragma: no cover - the child
            os.close(told_read)
            _kill_at_statement(path, stop, told_write)()
            os._exit(0)
        os.close(told_write)
        assert os.read(told_read, 1) == b"x"  # it holds the write lock, mid-conversion
        os.close(told_read)
        waiting = os.fork()
        if waiting == 0:  # pragma: no cover - the child
            code = 0
            try:
                SQLiteStorage(path).close()
            except BaseException:  # anything is a failure of the probe
                code = 3
            os._exit(code)
        os.kill(first, signal.SIGKILL)
        assert os.waitstatus_to_exitcode(os.waitpid(first, 0)[1]) == -signal.SIGKILL
        assert os.waitstatus_to_exitcode(os.waitpid(waiting, 0)[1]) == 0
        assert schema_of(path) == 3
        with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
            check_converted(engine, SQLITE_INFO)


def test_processes_opening_one_0_1_file_at_once_convert_it_once(
    tmp_path: Path, forking: None
) -> None:
    path = copy_db(tmp_path)
    go_read, go_write = os.pipe()
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(go_write)
            os.read(go_read, 1)
            code = 0
            try:
                SQLiteStorage(path).close()
            except PolicyError:
                code = 3
            except BaseException:
                code = 5
            os._exit(code)
        children.append(pid)
    os.close(go_read)
    os.write(go_write, b"gogo")
    os.close(go_write)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0, 0, 0]
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
        check_converted(engine, SQLITE_INFO)


def test_a_read_only_0_1_file_is_a_store_error_and_left_as_it_was(
    tmp_path: Path, forking: None
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to become another user (root writes a read-only file)")
    path = copy_db(tmp_path)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o444)

    def work() -> None:
        os.setuid(65534)
        SQLiteStorage(path)

    assert _in_child(work) == 3
    assert schema_of(path) == 2
    os.chmod(path, 0o644)
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
        check_converted(engine, SQLITE_INFO)


def test_a_full_disk_during_the_sqlite_conversion_leaves_the_file_of_0_1(
    tmp_path: Path, forking: None
) -> None:
    """Files may not grow past a limit (RLIMIT_FSIZE, as a full disk): each limit fails
    the open with STORAGE_UNAVAILABLE and the file is still of 0.1, or it converts."""
    failed = 0
    for limit in range(4096, 240_000, 12_000):
        folder = tmp_path / str(limit)
        folder.mkdir()
        path = copy_db(folder)

        def work(limit: int = limit, path: Path = path) -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            SQLiteStorage(path)

        status = _in_child(work)
        assert status in (0, 3), limit
        failed += status == 3
        assert schema_of(path) == (3 if status == 0 else 2)
        with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
            check_converted(engine, SQLITE_INFO)
    assert failed >= 5


# -- SQLite: odd content -----------------------------------------------------------------------------


def test_huge_amounts_and_ended_windows_of_0_1_carry_over_exactly(tmp_path: Path) -> None:
    path = copy_db(tmp_path)
    huge = 10**40
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "UPDATE counters SET spent = ? WHERE agent_id = 'agent-1' AND window_key LIKE "
            "'monthly:%'",
            (str(huge),),
        )
    # a day later: the daily and hourly windows of 0.1 have ended, the monthly has not
    later = datetime(2026, 3, 11, 9, 0, tzinfo=UTC)
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(later)) as engine:

        def monthly() -> tuple[int, int]:
            w = engine.budget("agent-1", "monthly").periods["monthly"]  # type: ignore[index]
            return w.spent.value, w.reserved.value

        assert daily(engine, "agent-1") == (0, 0)
        assert monthly() == (huge, 3 * USDT)  # the 60 held for the approval expired
        assert engine.confirm(SQLITE_INFO["open_reservation"]).status is ReservationStatus.CONFIRMED
        assert monthly() == (huge + 3 * USDT, 0)
        assert engine.authorize(payment(1)).code == "MONTHLY_LIMIT"
        approval = engine.get_approval(SQLITE_INFO["pending_approval"])
        assert approval.status is ApprovalStatus.EXPIRED
