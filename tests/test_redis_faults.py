"""Redis failures that must be told truly: lost Cluster hints, an exhausted pool, maxmemory.

- On a Cluster, global index hints written after an applied commit may fail
  (a stalled node): the call still answers the applied result, once, and a
  warning is logged; hints that fail before the commit change nothing and
  say so.
- More calls in flight than the pool has connections wait for one; a pool
  that stays exhausted past the timeout says nothing was sent or changed.
- A Redis at maxmemory refuses the commit script before its first write:
  ``STORAGE_UNAVAILABLE``, nothing changed (not ``INTERNAL``).
"""

from __future__ import annotations

import asyncio
import logging
import select
import shutil
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
import redis.connection
from redis._parsers.base import BaseParser

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyError
from agentpolicy.records import ApprovalStatus
from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.redis_servers import RedisServer, unavailable
from tests.test_redis import _stall, prefix

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
WITH_APPROVAL = {**DAILY_100, "approvalConfig": {"thresholds": [
    {"amount": {"value": str(50 * USDT)}, "requiredApprovers": 1, "approvers": ["boss"]}]}}  # fmt: skip
NOTHING_CHANGED = "nothing was allowed or changed"
N = 200


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis only this test talks to (so it may change its maxmemory)."""
    if shutil.which("redis-server") is None:
        unavailable("these tests start their own redis-server (none on PATH)")
    server = RedisServer(tmp_path / "own")
    server.start()
    yield server
    server.stop()


def snapshot(client: Any, keys: str) -> dict[str, bytes]:
    """Every key under the prefix ``keys`` with its serialized value (on a Cluster: all nodes)."""
    return {k: client.dump(k) for k in client.scan_iter(match=keys + "*")}


def reserved(budget: Any) -> int:
    return int(next(iter(budget.periods.values())).reserved.value)


# -- failure(): which error says what ----------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [redis.exceptions.MaxConnectionsError("Too many connections"),
     redis.exceptions.ConnectionError("No connection available.")],
    ids=["default-pool", "blocking-pool"],
)  # fmt: skip
def test_a_command_that_got_no_connection_was_never_sent(exc: redis.exceptions.RedisError) -> None:
    err = rp.failure(exc, writing=True)  # even a commit: it never left the process
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert NOTHING_CHANGED in err.message
    assert "unknown" not in err.message


@pytest.mark.parametrize(
    "exc", [redis.exceptions.SlotNotCoveredError('Slot "5" is not covered by the cluster.'),
            redis.exceptions.RedisClusterException("No targets were found to execute EVALSHA")],
)  # fmt: skip
def test_a_cluster_routing_error_is_storage_unavailable_and_a_commit_s_outcome_unknown(
    exc: Exception,
) -> None:
    read, commit = rp.failure(exc, writing=False), rp.failure(exc, writing=True)
    assert read.code == commit.code == ErrorCode.STORAGE_UNAVAILABLE
    assert NOTHING_CHANGED in read.message
    assert "unknown" in commit.message  # an earlier attempt of the same call may have run it


def test_a_cluster_routing_error_reaches_the_caller_as_a_store_error() -> None:
    storage = RedisStorage.__new__(RedisStorage)
    storage.cluster = True

    def fail(request: object) -> object:
        raise redis.exceptions.SlotNotCoveredError("no node for the slot")

    storage._send = fail  # type: ignore[method-assign]
    with pytest.raises(PolicyError) as err:
        storage.drive(iter_steps())
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE


def iter_steps() -> rp.Steps[None]:
    yield rp.Read(["k"])


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ConnectionError("No connection available."),
        redis.exceptions.MaxConnectionsError("Too many connections"),
        BaseParser.parse_error("READONLY You can't write against a read only replica."),
        BaseParser.parse_error("OOM command not allowed when used memory > 'maxmemory'."),
        BaseParser.parse_error("TRYAGAIN Multiple keys request during rehashing of slot"),
    ],
)
def test_a_refused_commit_on_a_cluster_may_follow_a_first_attempt_that_ran(
    exc: Exception,
) -> None:
    # the Cluster client sends a command again, on another connection, after a timeout: a
    # refusal may answer that second attempt while the first one ran
    assert "unknown" in rp.failure(exc, writing=True, cluster=True).message
    assert NOTHING_CHANGED in rp.failure(exc, writing=False, cluster=True).message
    assert NOTHING_CHANGED in rp.failure(exc, writing=True, cluster=False).message


def test_the_async_cluster_s_own_wait_for_a_turn_is_before_any_send() -> None:
    err = rp.failure(rp.NoTurn("No connection available."), writing=True, cluster=True)
    assert NOTHING_CHANGED in err.message


@pytest.mark.parametrize(
    "exc", [redis.exceptions.ConnectionError("Connection reset by peer"),
            redis.exceptions.TimeoutError("Timeout reading from socket")],
)  # fmt: skip
def test_a_commit_sent_without_an_answer_still_says_its_outcome_is_unknown(
    exc: redis.exceptions.RedisError,
) -> None:
    err = rp.failure(exc, writing=True)
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in err.message
    assert NOTHING_CHANGED in rp.failure(exc, writing=False).message


@pytest.mark.parametrize(
    "reply",
    [
        "OOM command not allowed when used memory > 'maxmemory'. script: 0ad1, on @user_script:43.",
        "ERR Error running script (call to f_0ad1): @user_script:43: -OOM command not allowed "
        "when used memory > 'maxmemory'.",  # how Redis 6 reports it from inside a script
        "READONLY You can't write against a read only replica.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "BUSY Redis is busy running a script.",
        "NOSCRIPT No matching script.",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down",
    ],
)
def test_a_refusal_before_anything_ran_is_storage_unavailable(reply: str) -> None:
    err = rp.failure(BaseParser.parse_error(reply), writing=True)
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert NOTHING_CHANGED in err.message
    if "OOM" in reply:
        assert "out of memory" in err.message


def test_a_reply_that_means_a_bug_is_internal() -> None:
    err = rp.failure(BaseParser.parse_error("WRONGTYPE Operation against a key"), writing=True)
    assert err.code == ErrorCode.INTERNAL


# -- Cluster: global index hints ------------------------------------------------------------


class Failing:
    """Makes ZADD/ZREM on global index keys fail, before or after the store's commit script."""

    def __init__(self, storage: Any, keys: str, *, when: str) -> None:
        self.storage = storage
        self.keys = keys
        self.when = when
        self.committed = False
        self.failed = 0

    def hit(self, key: str) -> bool:
        if not key.startswith(self.keys + "@"):
            return False
        if (self.when == "after") != self.committed:
            return False
        self.failed += 1
        return True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        client, commit = self.storage.client, self.storage._commit
        zadd, zrem = client.zadd, client.zrem

        def committing(**kw: Any) -> Any:
            reply = commit(**kw)
            self.committed = True
            return reply

        def z(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(key: str, *args: Any) -> Any:
                if self.hit(key):
                    raise redis.exceptions.TimeoutError("Timeout reading from socket")
                return real(key, *args)

            return call

        monkeypatch.setattr(self.storage, "_commit", committing)
        monkeypatch.setattr(client, "zadd", z(zadd))
        monkeypatch.setattr(client, "zrem", z(zrem))

    def install_async(self, monkeypatch: pytest.MonkeyPatch) -> None:
        client, commit = self.storage.client, self.storage._commit
        zadd, zrem = client.zadd, client.zrem

        async def committing(**kw: Any) -> Any:
            reply = await commit(**kw)
            self.committed = True
            return reply

        def z(real: Callable[..., Any]) -> Callable[..., Any]:
            async def call(key: str, *args: Any) -> Any:
                if self.hit(key):
                    raise redis.exceptions.TimeoutError("Timeout reading from socket")
                return await real(key, *args)

            return call

        monkeypatch.setattr(self.storage, "_commit", committing)
        monkeypatch.setattr(client, "zadd", z(zadd))
        monkeypatch.setattr(client, "zrem", z(zrem))


def warned(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno == logging.WARNING]  # fmt: skip


def test_on_a_cluster_hints_failing_after_an_applied_vote_keep_its_result(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = prefix()
    storage = RedisStorage(redis_cluster_url, key_prefix=keys)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", WITH_APPROVAL)
    approval_id = engine.authorize(payment(60 * USDT)).approval_id
    assert approval_id is not None
    failing = Failing(storage, keys, when="after")
    failing.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="agentpolicy.storage.redis"):
        approval = engine.decide(approval_id, "boss", "approve")  # the real result, no error
    assert failing.failed == 1  # the first hint after the commit failed: the rest were skipped
    assert approval.status is ApprovalStatus.APPROVED
    assert approval.reservation_id is not None
    [message] = warned(caplog, "agentpolicy.storage.redis")
    assert keys + "@pending" in message
    monkeypatch.undo()
    stored = engine.get_approval(approval_id)
    assert stored.status is ApprovalStatus.APPROVED
    assert [v.approver for v in stored.votes] == ["boss"]  # applied once
    assert reserved(engine.budget("agent-1", "daily")) == 60 * USDT  # held once
    with pytest.raises(PolicyError) as again:
        engine.decide(approval_id, "boss", "approve")
    assert again.value.code == ErrorCode.APPROVAL_NOT_PENDING
    # the removal from @pending was lost: a stale entry, which readers check and skip
    assert storage.client.zscore(keys + "@pending", approval_id) is not None
    assert engine.list_approvals() == []
    assert engine.sweep().reservations == ()
    engine.close()


def test_on_a_cluster_hints_failing_before_the_commit_change_nothing(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = prefix()
    storage = RedisStorage(redis_cluster_url, key_prefix=keys)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", WITH_APPROVAL)
    before = snapshot(storage.client, keys)
    Failing(storage, keys, when="before").install(monkeypatch)
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(60 * USDT))  # would open an approval: adds to @pending first
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert NOTHING_CHANGED in err.value.message
    monkeypatch.undo()
    assert snapshot(storage.client, keys) == before  # and it is true
    assert engine.list_approvals() == []
    assert reserved(engine.budget("agent-1", "daily")) == 0
    engine.close()


def test_on_a_cluster_async_hints_failing_after_or_before_the_commit(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = prefix()

    async def main() -> None:
        storage = AsyncRedisStorage(redis_cluster_url, key_prefix=keys)
        sync = RedisStorage(redis_cluster_url, key_prefix=keys)
        engine = AsyncPolicyEngine(sync, ManualClock(), async_storage=storage)
        await engine.set_policy("agent-1", WITH_APPROVAL)
        approval_id = (await engine.authorize(payment(60 * USDT))).approval_id
        assert approval_id is not None
        with monkeypatch.context() as patch:
            Failing(storage, keys, when="after").install_async(patch)
            with caplog.at_level(logging.WARNING, logger="agentpolicy.storage.redis_async"):
                approval = await engine.decide(approval_id, "boss", "approve")
        assert approval.status is ApprovalStatus.APPROVED
        [message] = warned(caplog, "agentpolicy.storage.redis_async")
        assert keys + "@pending" in message
        stored = await engine.get_approval(approval_id)
        assert [v.approver for v in stored.votes] == ["boss"]
        assert reserved(await engine.budget("agent-1", "daily")) == 60 * USDT
        assert await engine.list_approvals() == []

        await engine.set_policy("agent-2", WITH_APPROVAL)
        before = await asyncio.to_thread(snapshot, sync.client, keys)
        with monkeypatch.context() as patch:
            Failing(storage, keys, when="before").install_async(patch)
            with pytest.raises(PolicyError) as err:
                await engine.authorize(payment(60 * USDT, agent_id="agent-2"))
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert NOTHING_CHANGED in err.value.message
        assert await asyncio.to_thread(snapshot, sync.client, keys) == before
        assert await engine.list_approvals() == []
        await engine.close()

    asyncio.run(main())


def test_on_a_cluster_a_stalled_global_index_node_does_not_hide_an_applied_vote(
    redis_cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe's case: DEBUG SLEEP on the node of @pending while a vote commits elsewhere."""
    finder = redis.cluster.RedisCluster.from_url(redis_cluster_url.replace("+cluster", ""))
    nodes: dict[str, Any] = {}
    for _ in range(1000):
        keys = prefix()
        agent_key = rp.Keyspace(keys, cluster=True).shard_prefix("agent-1") + "h/agent-1"
        nodes = {name: finder.get_node_from_key(keys + name)
                 for name in ("@pending", "@due", "@outbox", "@agents")}  # fmt: skip
        nodes["shard"] = finder.get_node_from_key(agent_key)
        stalled = nodes["@pending"]
        if all(n.name != stalled.name for k, n in nodes.items() if k != "@pending"):
            break
    finder.close()
    storage = RedisStorage(redis_cluster_url, key_prefix=keys, timeout=timedelta(seconds=0.5))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", WITH_APPROVAL)
    approval_id = engine.authorize(payment(60 * USDT)).approval_id
    assert approval_id is not None
    stall = _stall(f"redis://{stalled.host}:{stalled.port}/0", 3)
    with caplog.at_level(logging.WARNING, logger="agentpolicy.storage.redis"):
        approval = engine.decide(approval_id, "boss", "approve")
    stall.join()
    assert approval.status is ApprovalStatus.APPROVED
    assert warned(caplog, "agentpolicy.storage.redis")
    assert engine.get_approval(approval_id).status is ApprovalStatus.APPROVED
    assert reserved(engine.budget("agent-1", "daily")) == 60 * USDT
    assert engine.list_approvals() == []
    engine.close()


# -- the connection pool ----------------------------------------------------------------------


def agents_on_one_node(url: str, keys: str, count: int) -> list[str]:
    """``count`` agent ids whose shards live on one node (all of them on a single Redis)."""
    if not url.startswith("redis+cluster://"):
        return [f"agent-{i}" for i in range(count)]
    finder = RedisStorage(url, key_prefix=keys)
    node = finder.client.get_node_from_key
    space = finder.keys
    first = node(space.shard_prefix("agent-0") + "h/agent-0").name
    found = [a for a in (f"agent-{i}" for i in range(20 * count))
             if node(space.shard_prefix(a) + "h/" + a).name == first][:count]  # fmt: skip
    finder.close()
    assert len(found) == count
    return found


@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis(request: pytest.FixtureRequest) -> str:
    fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
    url: str = request.getfixturevalue(fixture)
    return url


def test_more_threads_than_connections_all_get_one_in_turn(any_redis: str) -> None:
    keys = prefix()
    agents = agents_on_one_node(any_redis, keys, N)
    engine = PolicyEngine(storage=RedisStorage(any_redis, key_prefix=keys), clock=ManualClock())
    for agent in agents:
        engine.set_policy(agent, DAILY_100)
    start = threading.Barrier(N)
    codes: dict[str, str] = {}

    def one(agent: str) -> None:
        start.wait()
        try:
            codes[agent] = engine.authorize(payment(USDT, agent_id=agent)).code.value
        except PolicyError as err:
            codes[agent] = f"{err.code}: {err.message}"

    threads = [threading.Thread(target=one, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(codes.values())) == ["ALLOWED"]
    assert len(codes) == N
    assert [reserved(engine.budget(a, "daily")) for a in agents] == [USDT] * N
    assert engine.open_reservations() == N
    engine.close()


def test_more_tasks_than_connections_all_get_one_in_turn(any_redis: str) -> None:
    keys = prefix()
    agents = agents_on_one_node(any_redis, keys, N)

    async def main() -> None:
        engine = AsyncPolicyEngine(RedisStorage(any_redis, key_prefix=keys), ManualClock(),
                                   async_storage=AsyncRedisStorage(any_redis, key_prefix=keys))  # fmt: skip
        for agent in agents:
            await engine.set_policy(agent, DAILY_100)

        async def one(agent: str) -> str:
            try:
                return (await engine.authorize(payment(USDT, agent_id=agent))).code.value
            except PolicyError as err:
                return f"{err.code}: {err.message}"

        codes = await asyncio.gather(*(one(a) for a in agents))
        assert sorted(set(codes)) == ["ALLOWED"]
        budgets = [await engine.budget(a, "daily") for a in agents]
        assert [reserved(b) for b in budgets] == [USDT] * N
        assert await engine.open_reservations() == N
        await engine.close()

    asyncio.run(main())


def _first_node_pool(storage: RedisStorage, agent: str) -> Any:
    if not storage.cluster:
        return storage.client.connection_pool
    key = storage.keys.shard_prefix(agent) + "h/" + agent
    return storage.client.get_node_from_key(key).redis_connection.connection_pool


def test_a_pool_exhausted_past_the_timeout_says_nothing_was_sent(any_redis: str) -> None:
    keys = prefix()
    storage = RedisStorage(any_redis, key_prefix=keys, timeout=timedelta(milliseconds=300))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    engine.authorize(payment(USDT))  # warm: the commit is the first command left
    pool = _first_node_pool(storage, "agent-1")
    held = [pool.get_connection() for _ in range(rp.POOL_SIZE)]
    try:
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment(USDT))
    finally:
        for connection in held:
            pool.release(connection)
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    if storage.cluster:  # its client may have sent the commit once before asking the pool again
        assert "unknown" in err.value.message
    else:
        assert NOTHING_CHANGED in err.value.message
        assert "no free connection" in err.value.message
    assert reserved(engine.budget("agent-1", "daily")) == USDT  # the warm-up's only
    assert engine.authorize(payment(USDT)).allowed  # the connections came back
    engine.close()


def test_an_async_pool_exhausted_past_the_timeout_says_nothing_was_sent(any_redis: str) -> None:
    keys = prefix()

    async def main() -> None:
        storage = AsyncRedisStorage(any_redis, key_prefix=keys, timeout=timedelta(milliseconds=300))
        engine = AsyncPolicyEngine(RedisStorage(any_redis, key_prefix=keys), ManualClock(),
                                   async_storage=storage)  # fmt: skip
        await engine.set_policy("agent-1", DAILY_100)
        await engine.authorize(payment(USDT))  # warm
        release: Callable[[], Awaitable[None]]
        if storage._gate is not None:  # a Cluster: calls wait for a turn at the store
            gate = storage._gate
            for _ in range(rp.POOL_SIZE):
                await gate.acquire()

            async def release() -> None:
                for _ in range(rp.POOL_SIZE):
                    gate.release()
        else:
            pool = storage.client.connection_pool
            held = [await pool.get_connection() for _ in range(rp.POOL_SIZE)]

            async def release() -> None:
                for connection in held:
                    await pool.release(connection)

        try:
            with pytest.raises(PolicyError) as err:
                await engine.authorize(payment(USDT))
        finally:
            await release()
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert NOTHING_CHANGED in err.value.message
        assert reserved(await engine.budget("agent-1", "daily")) == USDT
        assert (await engine.authorize(payment(USDT))).allowed
        await engine.close()

    asyncio.run(main())


# -- maxmemory ----------------------------------------------------------------------------------


def test_redis_at_maxmemory_is_storage_unavailable_and_changes_nothing(
    own_server: RedisServer,
) -> None:
    """Redis refuses a script's first write under OOM, and never a later one: all or nothing."""
    keys = prefix()
    storage = RedisStorage(own_server.url, key_prefix=keys)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    engine.authorize(payment(USDT))
    admin = redis.Redis.from_url(own_server.url)
    before = snapshot(admin, keys)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # our own server: every write is now refused

    async def on_async() -> PolicyError:
        engine = AsyncPolicyEngine(RedisStorage(own_server.url, key_prefix=keys), ManualClock(),
                                   async_storage=AsyncRedisStorage(own_server.url, key_prefix=keys))  # fmt: skip
        with pytest.raises(PolicyError) as err:
            await engine.authorize(payment(USDT))
        await engine.close()
        return err.value

    try:
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment(USDT))
        refused = [err.value, asyncio.run(on_async())]
        after = snapshot(admin, keys)
    finally:
        admin.config_set("maxmemory", 0)
    for error in refused:
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "out of memory" in error.message
        assert NOTHING_CHANGED in error.message
    assert after == before  # and it is true
    assert reserved(engine.budget("agent-1", "daily")) == USDT
    assert engine.authorize(payment(USDT)).allowed
    admin.close()
    engine.close()


# -- one node: a refusal answering an attempt sent again after a timeout ---------------------


READONLY = b"-READONLY You can't write against a read only replica.\r\n"


class _RefusingProxy:
    """A TCP proxy to Redis whose links forward both ways until :meth:`refuse`.

    After it, what Redis answers on the links already open is dropped (what
    the client sends still reaches Redis and runs), and every link opened
    later is answered by the proxy itself: ``READONLY`` to each command, as
    a server demoted to a replica meanwhile would.
    """

    def __init__(self, url: str) -> None:
        parsed = redis.connection.parse_url(url)
        self.upstream = (parsed.get("host", "127.0.0.1"), int(parsed.get("port", 6379)))
        self.db = int(parsed.get("db", 0))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/{self.db}"
        self.refusing = False
        self.refused = 0  # commands answered READONLY
        self.stopping = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def refuse(self) -> None:
        self.refusing = True

    def close(self) -> None:
        self.stopping = True
        for thread in self.threads:
            thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            target = self._refuse if self.refusing else self._forward
            thread = threading.Thread(target=target, args=(client,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _forward(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        try:
            while not self.stopping:
                ready, _, _ = select.select([client, server], [], [], 0.05)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is client:
                        server.sendall(data)
                    elif not self.refusing:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def _refuse(self, client: socket.socket) -> None:
        pending = b""
        try:
            while not self.stopping:
                ready, _, _ = select.select([client], [], [], 0.05)
                if not ready:
                    continue
                data = client.recv(65536)
                if not data:
                    return
                pending += data
                commands, pending = _whole_commands(pending)
                self.refused += commands
                client.sendall(READONLY * commands)
        except OSError:
            pass
        finally:
            client.close()


def _whole_commands(data: bytes) -> tuple[int, bytes]:
    """How many whole RESP commands (arrays of bulk strings) ``data`` begins with, and the rest."""
    count = 0
    while True:
        rest = data
        head, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return count, data
        items = int(head[1:])
        for _ in range(items):
            size, sep, rest = rest.partition(b"\r\n")
            if not sep or len(rest) < int(size[1:]) + 2:
                return count, data
            rest = rest[int(size[1:]) + 2 :]
        count += 1
        data = rest


@pytest.fixture
def refusing(redis_url: str) -> Iterator[_RefusingProxy]:
    proxy = _RefusingProxy(redis_url)
    yield proxy
    proxy.close()


def test_a_refusal_after_an_attempt_timed_out_says_the_outcome_is_unknown(
    redis_url: str, refusing: _RefusingProxy
) -> None:
    """The first attempt ran and its answer was lost; redis-py's second attempt was refused."""
    keys = prefix()
    quick = timedelta(milliseconds=300)
    engine = PolicyEngine(
        storage=RedisStorage(refusing.url, key_prefix=keys, timeout=quick), clock=ManualClock()
    )
    engine.set_policy("agent-1", DAILY_100)
    assert engine.authorize(payment(USDT)).allowed  # the script is loaded, the link warm
    refusing.refuse()
    with pytest.raises(PolicyError) as caught:
        engine.authorize(payment(10 * USDT))
    assert refusing.refused >= 1  # the client did send it again, and was refused
    assert caught.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in caught.value.message
    assert NOTHING_CHANGED not in caught.value.message
    direct = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=keys), clock=ManualClock())
    assert reserved(direct.budget("agent-1", "daily")) == 11 * USDT  # the first attempt ran
    direct.close()
    engine.close()


def test_an_async_refusal_after_an_attempt_timed_out_says_the_outcome_is_unknown(
    redis_url: str, refusing: _RefusingProxy
) -> None:
    keys = prefix()
    quick = timedelta(milliseconds=300)

    async def main() -> PolicyError:
        engine = AsyncPolicyEngine(
            RedisStorage(refusing.url, key_prefix=keys, timeout=quick),
            ManualClock(),
            async_storage=AsyncRedisStorage(refusing.url, key_prefix=keys, timeout=quick),
        )
        await engine.set_policy("agent-1", DAILY_100)
        assert (await engine.authorize(payment(USDT))).allowed
        refusing.refuse()
        try:
            await engine.authorize(payment(10 * USDT))
        except PolicyError as err:
            return err
        finally:
            await engine.close()
        raise AssertionError("the refused authorize did not fail")

    err = asyncio.run(main())
    assert refusing.refused >= 1
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in err.message
    direct = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=keys), clock=ManualClock())
    assert reserved(direct.budget("agent-1", "daily")) == 11 * USDT
    direct.close()


def test_a_refusal_of_a_first_attempt_still_says_nothing_changed() -> None:
    """Only an attempt that failed without an answer makes a later refusal 'unknown'."""
    refusal = BaseParser.parse_error("READONLY You can't write against a read only replica.")
    assert NOTHING_CHANGED in rp.failure(refusal, writing=True, again=False).message
    assert "unknown" in rp.failure(refusal, writing=True, again=True).message
    assert NOTHING_CHANGED in rp.failure(refusal, writing=False, again=True).message
