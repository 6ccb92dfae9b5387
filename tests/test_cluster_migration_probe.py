"""A Redis Cluster whose slot migrates while agents pay: exact totals, true words.

Every key of an agent shares one hash tag, so one slot; its commit is one
script over several keys, one of which (the operation record) never exists
before the commit. While the slot migrates (``CLUSTER SETSLOT ... MIGRATING``
on its owner, ``IMPORTING`` on the target) Redis answers such a script
``TRYAGAIN`` (some keys here, some not) or ``ASK`` then ``TRYAGAIN``, and
redis-py gives up after 16 attempts with ``ClusterError("TTL exhausted.")``:
no commit of that agent can succeed until ``SETSLOT ... NODE``. These tests
start their own three-node cluster (they move slots) and check that callers
who retry with the same idempotency key end with exact totals, every
decision recorded once, nothing left reserved, and errors that say what is
known.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.connection
import redis.exceptions

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyError
from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.redis_servers import RedisServer, unavailable

USDT = 1_000_000
LIMIT = 100 * USDT
PRICE = 7 * USDT  # 14 payments fit in the daily limit, the 15th does not
FIT = LIMIT // PRICE
DAILY = {"limits": {"daily": {"value": str(LIMIT)}}}


class Cluster:
    """Three masters of our own, and what moving one slot between them takes."""

    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes
        self.admin = {n.port: redis.Redis(port=n.port, decode_responses=True) for n in nodes}
        self.ids = {port: c.cluster("myid") for port, c in self.admin.items()}

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def slot_of(self, key: str) -> int:
        return int(self.admin[self.nodes[0].port].cluster("keyslot", key))

    def owner(self, slot: int) -> int:
        for port, client in self.admin.items():
            if client.cluster("countkeysinslot", slot) > 0:
                return port
        raise AssertionError(f"no node holds keys of slot {slot}")

    def other(self, port: int) -> int:
        return next(p for p in self.admin if p != port)

    def begin(self, slot: int, src: int, dst: int) -> None:
        self.admin[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[src])
        self.admin[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[dst])

    def keys_in(self, slot: int, port: int) -> list[str]:
        keys: list[str] = self.admin[port].cluster("getkeysinslot", slot, 10_000)
        return keys

    def move(self, key: str, src: int, dst: int) -> None:
        self.admin[src].execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 10_000, "KEYS", key)

    def finish(self, slot: int, dst: int) -> None:
        for port in [dst, *(p for p in self.admin if p != dst)]:  # the target first
            self.admin[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[dst])

    def stable(self, slot: int) -> None:
        """No node still migrating or importing ``slot`` (a failed test must not leave it so)."""
        for port in self.admin:
            self.admin[port].execute_command("CLUSTER", "SETSLOT", slot, "STABLE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli are needed for the cluster tests")
    root = tmp_path_factory.mktemp("migration")
    nodes = [
        RedisServer(root / f"n{i}", "--cluster-enabled", "yes", "--enable-debug-command", "yes",
                    "--cluster-config-file", str(root / f"n{i}" / "nodes.conf"))
        for i in range(3)
    ]  # fmt: skip
    for node in nodes:
        node.start()
    try:
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        client = redis.Redis(port=nodes[0].port)
        for _ in range(400):
            if client.cluster("info")["cluster_state"] == "ok":
                break
            time.sleep(0.025)  # the cluster settles its slots
        client.close()
        made = Cluster(nodes)
        yield made
        for c in made.admin.values():
            c.close()
    finally:
        for node in nodes:
            node.stop()


def prefix() -> str:
    return f"mig-{uuid.uuid4().hex[:12]}:"


def shard_slot(cluster: Cluster, keys: str, agent: str) -> int:
    return cluster.slot_of(rp.Keyspace(keys, cluster=True).shard_prefix(agent) + "h/" + agent)


def spent_reserved(budget: Any) -> tuple[int, int]:
    window = next(iter(budget.periods.values()))
    return int(window.spent.value), int(window.reserved.value)


# -- a lost answer, then TRYAGAIN until the client gives up ------------------------------------


def test_a_cluster_that_kept_redirecting_says_what_it_means() -> None:
    exc = redis.exceptions.ClusterError("TTL exhausted.")
    read = rp.failure(exc, writing=False, cluster=True)
    assert read.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "TRYAGAIN" in read.message
    assert "nothing was allowed or changed" in read.message
    write = rp.failure(exc, writing=True, cluster=True)
    assert write.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in write.message
    assert "nothing was allowed" not in write.message


def lose_the_answer_of_the_next_commit(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]
) -> None:
    """The next EVALSHA runs and is answered, but the answer is lost (a timeout): ``then`` runs."""
    send = redis.connection.AbstractConnection.send_command
    read = redis.connection.AbstractConnection.read_response
    state = {"sent": False, "done": False}

    def sending(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args and str(args[0]).upper() == "EVALSHA" and not state["done"]:
            state["sent"] = True
        return send(self, *args, **kwargs)

    def reading(self: Any, *args: Any, **kwargs: Any) -> Any:
        answer = read(self, *args, **kwargs)
        if state["sent"] and not state["done"]:
            state["done"] = True
            then()
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return answer

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_command", sending)
    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", reading)


def test_a_confirm_applied_before_its_slot_began_to_migrate_is_not_said_undone(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confirm runs, its answer is lost, the slot starts migrating: the retry meets TRYAGAIN.

    The confirm emptied an index of the shard (Redis deletes an empty sorted
    set), so the retry names a key the node no longer has while it holds the
    others: TRYAGAIN, 16 times, then ``ClusterError``. Before, the error
    said "nothing was allowed or changed" while the confirm was recorded.
    """
    keys = prefix()
    storage = RedisStorage(cluster.url, key_prefix=keys, timeout=timedelta(seconds=1))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY)
    rid = engine.authorize(payment(PRICE, idempotency_key="p-1")).reservation_id
    assert rid is not None
    slot = shard_slot(cluster, keys, "agent-1")
    src = cluster.owner(slot)
    dst = cluster.other(src)
    lose_the_answer_of_the_next_commit(monkeypatch, lambda: cluster.begin(slot, src, dst))
    try:
        with pytest.raises(PolicyError) as caught:
            engine.confirm(rid)
        monkeypatch.undo()
        assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE
        assert "unknown" in caught.value.message, caught.value.message
        assert "nothing was allowed" not in caught.value.message
        assert "TRYAGAIN" in caught.value.message
        for key in cluster.keys_in(slot, src):
            cluster.move(key, src, dst)
        cluster.finish(slot, dst)
    finally:
        monkeypatch.undo()
        cluster.stable(slot)
    assert spent_reserved(engine.budget("agent-1", "daily")) == (PRICE, 0)  # it was recorded
    assert engine.confirm(rid).status.value == "confirmed"  # confirming again: unchanged
    events = [r.event for r in engine.history("agent-1", 1000)]
    assert events.count("confirm") == 1
    assert events.count("decision") == 1
    engine.close()


# -- many payers while the slot moves key by key ----------------------------------------------


class Tally:
    """What the payers saw, counted under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.allowed: list[str] = []
        self.denied: list[str] = []
        self.confirmed: list[str] = []
        self.errors: list[str] = []
        self.progress = threading.Condition(self.lock)

    def error(self, exc: PolicyError | str) -> None:
        """A store error a payer met (checked: ``STORAGE_UNAVAILABLE``, in true words)."""
        if isinstance(exc, PolicyError):
            assert exc.code is ErrorCode.STORAGE_UNAVAILABLE, exc
            check_words(exc.message)
        with self.lock:
            self.errors.append(str(exc))
            self.progress.notify_all()

    def wait_errors(self, at_least: int) -> None:
        """Until ``at_least`` store errors were seen (commits cannot pass a migrating slot)."""
        with self.lock:
            assert self.progress.wait_for(lambda: len(self.errors) >= at_least, timeout=30)


def check_words(message: str) -> None:
    """A store error during a migration: a commit's outcome unknown, or nothing changed."""
    assert ("unknown" in message) != ("nothing was allowed or changed" in message), message


def pay_until_decided(engine: PolicyEngine, key: str, tally: Tally) -> None:
    """Authorize then confirm, retrying each with the same key or id after a store error."""
    while True:
        try:
            decision = engine.authorize(payment(PRICE, idempotency_key=key))
            break
        except PolicyError as exc:
            tally.error(exc)
    if not decision.allowed:
        assert decision.code == "DAILY_LIMIT", decision
        with tally.lock:
            tally.denied.append(key)
        return
    assert decision.reservation_id is not None
    with tally.lock:
        tally.allowed.append(decision.reservation_id)
    while True:
        try:
            confirmed = engine.confirm(decision.reservation_id)  # again: reported unchanged
        except PolicyError as exc:
            tally.error(exc)
            continue
        assert confirmed.status.value == "confirmed"
        break
    with tally.lock:
        tally.confirmed.append(decision.reservation_id)


def migrate_under_load(
    cluster: Cluster, slot: int, tally: Tally, *, stall: str | None = None
) -> tuple[int, int]:
    """Move ``slot`` key by key while payers pay, waiting for errors at each stage.

    ``stall``: ``source-sleeps`` or ``target-sleeps`` (DEBUG SLEEP),
    ``source-paused`` (CLIENT PAUSE ALL): that node stops answering past
    the store's timeout once half the keys have moved.
    """
    src = cluster.owner(slot)
    dst = cluster.other(src)
    try:
        cluster.begin(slot, src, dst)
        tally.wait_errors(2)  # commits met TRYAGAIN (some keys here, the new ones not)
        keys = cluster.keys_in(slot, src)
        for i, key in enumerate(keys):
            cluster.move(key, src, dst)
            if i == len(keys) // 2:
                seen = len(tally.errors)
                if stall is not None:
                    side, how = stall.split("-")
                    node = src if side == "source" else dst
                    if how == "sleeps":  # the whole server stops, the admin's call too
                        cluster.admin[node].execute_command("DEBUG", "SLEEP", "1.5")
                    else:  # every client waits, the admin's next MIGRATE too
                        cluster.admin[node].execute_command("CLIENT", "PAUSE", 1500, "ALL")
                tally.wait_errors(seen + 2)  # split keys: TRYAGAIN on either side
        for key in cluster.keys_in(slot, src):  # written meanwhile? (nothing can be)
            cluster.move(key, src, dst)
        seen = len(tally.errors)
        tally.wait_errors(seen + 2)  # every key moved, the slot still migrating: ASK, TRYAGAIN
        cluster.finish(slot, dst)  # payers with the old map now meet MOVED, then pass
    finally:
        cluster.stable(slot)
    return src, dst


def check_ledger(engine: PolicyEngine, agent: str, tally: Tally, payers: int) -> None:
    assert len(tally.allowed) == FIT
    assert len(set(tally.allowed)) == FIT
    assert len(tally.denied) == payers - FIT
    assert sorted(tally.confirmed) == sorted(tally.allowed)
    assert spent_reserved(engine.budget(agent, "daily")) == (FIT * PRICE, 0)
    history = engine.history(agent, 10_000)
    decisions = [r for r in history if r.event == "decision"]
    keys = [r.request.idempotency_key for r in decisions if r.request is not None]
    assert len(keys) == len(decisions) == payers
    assert len(set(keys)) == payers
    assert sorted(r.reservation_id for r in decisions if r.code == "ALLOWED") == sorted(
        tally.allowed
    )
    confirms = [r.reservation_id for r in history if r.event == "confirm"]
    assert sorted(confirms) == sorted(tally.allowed)  # each confirmed once
    assert engine.sweep().reservations == ()


@pytest.mark.parametrize("stall", [None, "source-sleeps", "source-paused"])
def test_payers_during_a_slot_migration_end_with_exact_totals(
    cluster: Cluster, stall: str | None
) -> None:
    keys = prefix()
    clock = ManualClock()
    setup = PolicyEngine(storage=RedisStorage(cluster.url, key_prefix=keys), clock=clock)
    setup.set_policy("agent-1", DAILY)
    slot = shard_slot(cluster, keys, "agent-1")
    threads_n, per_thread = 4, 5  # 20 payers, 14 fit
    tally = Tally()
    engines = [
        PolicyEngine(
            storage=RedisStorage(cluster.url, key_prefix=keys, timeout=timedelta(seconds=0.3)),
            clock=clock,
        )
        for _ in range(threads_n)
    ]
    start = threading.Barrier(threads_n + 1)
    failures: list[BaseException] = []

    def payer(n: int) -> None:
        start.wait()
        try:
            for j in range(per_thread):
                pay_until_decided(engines[n], f"t{n}-{j}", tally)
        except BaseException as exc:  # reported below
            failures.append(exc)
            tally.error("payer failed")

    workers = [threading.Thread(target=payer, args=(n,)) for n in range(threads_n)]
    for w in workers:
        w.start()
    start.wait()
    migrate_under_load(cluster, slot, tally, stall=stall)
    for w in workers:
        w.join(60)
    assert not failures, failures
    check_ledger(setup, "agent-1", tally, threads_n * per_thread)
    for e in [setup, *engines]:
        e.close()


# -- the same through AsyncRedisStorage and AsyncPolicyEngine ------------------------------------


def lose_the_answer_of_the_next_async_commit(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]
) -> None:
    """As :func:`lose_the_answer_of_the_next_commit`, on ``redis.asyncio``'s connections."""
    import redis.asyncio.connection as aconn

    send = aconn.AbstractConnection.send_packed_command
    read = aconn.AbstractConnection.read_response
    state = {"sent": False, "done": False}

    async def sending(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        packed = command if isinstance(command, bytes | str) else b"".join(command)
        text = packed.encode() if isinstance(packed, str) else packed
        if b"EVALSHA" in text.upper() and not state["done"]:
            state["sent"] = True
        return await send(self, command, *args, **kwargs)

    async def reading(self: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await read(self, *args, **kwargs)
        if state["sent"] and not state["done"]:
            state["done"] = True
            then()
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return answer

    monkeypatch.setattr(aconn.AbstractConnection, "send_packed_command", sending)
    monkeypatch.setattr(aconn.AbstractConnection, "read_response", reading)


def test_async_a_confirm_applied_before_its_slot_began_to_migrate_is_not_said_undone(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = prefix()

    async def main() -> None:
        storage = AsyncRedisStorage(cluster.url, key_prefix=keys, timeout=timedelta(seconds=1))
        sync = RedisStorage(cluster.url, key_prefix=keys)
        engine = AsyncPolicyEngine(sync, ManualClock(), async_storage=storage)
        await engine.set_policy("agent-1", DAILY)
        rid = (await engine.authorize(payment(PRICE, idempotency_key="p-1"))).reservation_id
        assert rid is not None
        slot = shard_slot(cluster, keys, "agent-1")
        src = cluster.owner(slot)
        dst = cluster.other(src)
        lose_the_answer_of_the_next_async_commit(monkeypatch, lambda: cluster.begin(slot, src, dst))
        try:
            with pytest.raises(PolicyError) as caught:
                await engine.confirm(rid)
            monkeypatch.undo()
            assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE
            assert "unknown" in caught.value.message, caught.value.message
            assert "nothing was allowed" not in caught.value.message
            for key in cluster.keys_in(slot, src):
                cluster.move(key, src, dst)
            cluster.finish(slot, dst)
        finally:
            monkeypatch.undo()
            cluster.stable(slot)
        assert spent_reserved(await engine.budget("agent-1", "daily")) == (PRICE, 0)
        assert (await engine.confirm(rid)).status.value == "confirmed"
        events = [r.event for r in await engine.history("agent-1", 1000)]
        assert events.count("confirm") == 1
        assert events.count("decision") == 1
        await engine.close()
        sync.close()

    asyncio.run(main())


async def pay_until_decided_async(engine: AsyncPolicyEngine, key: str, tally: Tally) -> None:
    while True:
        try:
            decision = await engine.authorize(payment(PRICE, idempotency_key=key))
            break
        except PolicyError as exc:
            tally.error(exc)
    if not decision.allowed:
        assert decision.code == "DAILY_LIMIT", decision
        with tally.lock:
            tally.denied.append(key)
        return
    assert decision.reservation_id is not None
    with tally.lock:
        tally.allowed.append(decision.reservation_id)
    while True:
        try:
            confirmed = await engine.confirm(decision.reservation_id)
        except PolicyError as exc:
            tally.error(exc)
            continue
        assert confirmed.status.value == "confirmed"
        break
    with tally.lock:
        tally.confirmed.append(decision.reservation_id)


@pytest.mark.parametrize("stall", [None, "target-sleeps"])
def test_async_payers_during_a_slot_migration_end_with_exact_totals(
    cluster: Cluster, stall: str | None
) -> None:
    keys = prefix()
    clock = ManualClock()
    tasks_n, per_task = 4, 5
    tally = Tally()
    check = PolicyEngine(storage=RedisStorage(cluster.url, key_prefix=keys), clock=clock)
    check.set_policy("agent-1", DAILY)
    slot = shard_slot(cluster, keys, "agent-1")
    moved: list[BaseException] = []

    def mover() -> None:
        try:
            migrate_under_load(cluster, slot, tally, stall=stall)
        except BaseException as exc:  # reported below
            moved.append(exc)

    async def main() -> None:
        engines = [
            AsyncPolicyEngine(
                RedisStorage(cluster.url, key_prefix=keys),
                clock,
                async_storage=AsyncRedisStorage(
                    cluster.url, key_prefix=keys, timeout=timedelta(seconds=0.3)
                ),
            )
            for _ in range(2)
        ]  # two stores (as two processes), two payers on each
        thread = threading.Thread(target=mover)
        thread.start()

        async def payer(n: int) -> None:
            for j in range(per_task):
                await pay_until_decided_async(engines[n % 2], f"a{n}-{j}", tally)

        try:
            await asyncio.gather(*(payer(n) for n in range(tasks_n)))
        finally:
            await asyncio.to_thread(thread.join, 60)
            for e in engines:
                await e.close()

    asyncio.run(main())
    assert not moved, moved
    check_ledger(check, "agent-1", tally, tasks_n * per_task)
    check.close()


# -- releases and expiries across a migration -----------------------------------------------------


def test_releases_and_expiries_across_a_migration_leave_nothing_reserved(cluster: Cluster) -> None:
    """Six held; three released, tried at every stage of the move; three expire, swept after.

    While the slot migrates no commit of the agent can pass (the operation
    record it names is new): each release and sweep is refused in true
    words, and once the slot has its new owner they are applied once each.
    """
    keys = prefix()
    clock = ManualClock()
    engine = PolicyEngine(
        storage=RedisStorage(cluster.url, key_prefix=keys, timeout=timedelta(seconds=0.5)),
        clock=clock,
        reservation_ttl=timedelta(minutes=5),
    )
    engine.set_policy("agent-1", DAILY)
    held = [
        engine.authorize(payment(PRICE, idempotency_key=f"h{i}")).reservation_id for i in range(6)
    ]
    assert None not in held
    slot = shard_slot(cluster, keys, "agent-1")
    src = cluster.owner(slot)
    dst = cluster.other(src)
    refused: list[str] = []

    def release_refused(rid: str | None) -> None:
        assert rid is not None
        with pytest.raises(PolicyError) as caught:
            engine.release(rid)
        refused.append(caught.value.message)

    try:
        cluster.begin(slot, src, dst)
        release_refused(held[0])  # every key here but the new operation record: TRYAGAIN
        moving = cluster.keys_in(slot, src)
        for key in moving[: len(moving) // 2]:
            cluster.move(key, src, dst)
        release_refused(held[1])  # keys on both sides: TRYAGAIN on either
        for key in cluster.keys_in(slot, src):
            cluster.move(key, src, dst)
        release_refused(held[2])  # every key moved, the slot still migrating: ASK, TRYAGAIN
        clock.advance(minutes=6)
        with pytest.raises(PolicyError) as swept:
            engine.sweep()
        refused.append(swept.value.message)
        cluster.finish(slot, dst)
    finally:
        cluster.stable(slot)
    assert len(refused) == 4
    for message in refused:
        check_words(message)
        assert "TRYAGAIN" in message
    clock.set(clock.now - timedelta(minutes=6))  # as another process would see it
    assert spent_reserved(engine.budget("agent-1", "daily"))[1] == 6 * PRICE  # nothing applied
    for rid in held[:3]:
        assert rid is not None
        assert engine.release(rid).status.value == "released"
    assert spent_reserved(engine.budget("agent-1", "daily")) == (0, 3 * PRICE)
    clock.advance(minutes=6)
    expired = engine.sweep().reservations
    assert sorted(r.id for r in expired) == sorted(str(rid) for rid in held[3:])
    assert engine.sweep().reservations == ()
    assert spent_reserved(engine.budget("agent-1", "daily")) == (0, 0)
    events = [r.event for r in engine.history("agent-1", 1000)]
    assert events.count("decision") == 6
    assert events.count("release") == 3
    assert events.count("expire") == 3, events
    engine.close()


# -- reads while the slot is split between two nodes -------------------------------------------


def test_reads_of_a_split_slot_see_every_document_sync_and_async(cluster: Cluster) -> None:
    """Fresh stores (nothing cached) read the agent at each stage of the move: the same answers.

    A pipelined read of several keys meets ASK for those already moved; a
    key misread as absent would turn into a wrong dry-run or budget.
    """
    keys = prefix()
    clock = ManualClock()
    engine = PolicyEngine(storage=RedisStorage(cluster.url, key_prefix=keys), clock=clock)
    engine.set_policy("agent-1", DAILY)
    for i in range(3):
        rid = engine.authorize(payment(PRICE, idempotency_key=f"r{i}")).reservation_id
        assert rid is not None
        if i < 2:
            engine.confirm(rid)

    def seen_sync() -> tuple[Any, ...]:
        fresh = PolicyEngine(storage=RedisStorage(cluster.url, key_prefix=keys), clock=clock)
        try:
            dry = fresh.authorize(payment(PRICE, idempotency_key="r0"), dry_run=True)
            return (
                spent_reserved(fresh.budget("agent-1", "daily")),
                fresh.authorize(payment(PRICE), dry_run=True).code,
                dry.reservation_id,  # the first decision's, answered again
                [r.event for r in fresh.history("agent-1")],
            )
        finally:
            fresh.close()

    async def seen_async() -> tuple[Any, ...]:
        fresh = AsyncPolicyEngine(
            RedisStorage(cluster.url, key_prefix=keys),
            clock,
            async_storage=AsyncRedisStorage(cluster.url, key_prefix=keys),
        )
        try:
            dry = await fresh.authorize(payment(PRICE, idempotency_key="r0"), dry_run=True)
            return (
                spent_reserved(await fresh.budget("agent-1", "daily")),
                (await fresh.authorize(payment(PRICE), dry_run=True)).code,
                dry.reservation_id,
                [r.event for r in await fresh.history("agent-1")],
            )
        finally:
            await fresh.close()

    before = seen_sync()
    assert before[0] == (2 * PRICE, PRICE)
    assert before[1] == "ALLOWED"
    assert before[2] is not None
    assert asyncio.run(seen_async()) == before
    slot = shard_slot(cluster, keys, "agent-1")
    src = cluster.owner(slot)
    dst = cluster.other(src)
    stages = 0
    try:
        cluster.begin(slot, src, dst)
        moving = cluster.keys_in(slot, src)
        done = 0
        for cut in (0, len(moving) // 2, len(moving)):
            for key in moving[done:cut]:
                cluster.move(key, src, dst)
            done = cut
            assert seen_sync() == before
            assert asyncio.run(seen_async()) == before
            stages += 1
        cluster.finish(slot, dst)
    finally:
        cluster.stable(slot)
    assert stages == 3
    assert seen_sync() == before
    engine.close()


# -- a manual failover under load -----------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Until ``check()`` holds (a server's state, not the clock: at most 30 s, then fail)."""
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def replica_of(client: Any, node: str) -> str | None:
    """The primary ``client``'s node sees ``node`` replicate, if any."""
    for line in client.execute_command("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if fields[0] == node and "slave" in fields[2]:
            return str(fields[3])
    return None


def replicate(cluster: Cluster, spare: Any, src: int) -> None:
    """Make ``spare`` a replica of the node on port ``src``, in sync and known to every node."""
    spare.cluster("meet", "127.0.0.1", str(src))
    wait_for(
        "the replica knows the primary",
        lambda: cluster.ids[src] in spare.execute_command("CLUSTER", "NODES"),
    )
    cluster.admin[src].config_set("repl-diskless-sync-delay", 0)  # (5 s by default)
    spare.execute_command("CLUSTER", "REPLICATE", cluster.ids[src])
    mine = spare.cluster("myid")
    wait_for(
        "the replica is in sync, every node knows it",
        lambda: (
            spare.info("replication").get("master_link_status") == "up"
            and all(replica_of(c, mine) == cluster.ids[src] for c in cluster.admin.values())
        ),
    )


def give_back(cluster: Cluster, old: Any, spare: Any, replica: RedisServer) -> None:
    """The first node primary again (if it is not), the replica stopped and forgotten."""
    gone = spare.cluster("myid")
    try:
        if old.execute_command("ROLE")[0] != "master":
            # TAKEOVER: the primaries vote for one failover of a slot per 2 node timeouts
            old.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            wait_for("the first is back", lambda: old.execute_command("ROLE")[0] == "master")
    finally:
        spare.close()
        replica.stop()
    for client in cluster.admin.values():
        client.execute_command("CLUSTER", "FORGET", gone)


def test_payers_across_a_manual_failover_end_with_exact_totals(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A replica of the agent's node takes over (CLUSTER FAILOVER) while four payers pay.

    The old primary stops its writers until the replica has every write,
    then answers MOVED: payers that retry with the same key end with
    exactly the payments that fit, each decided once, nothing left reserved.
    """
    keys = prefix()
    clock = ManualClock()
    setup = PolicyEngine(storage=RedisStorage(cluster.url, key_prefix=keys), clock=clock)
    setup.set_policy("agent-1", DAILY)
    slot = shard_slot(cluster, keys, "agent-1")
    src = cluster.owner(slot)
    replica = RedisServer(
        tmp_path / "replica", "--cluster-enabled", "yes",
        "--cluster-config-file", str(tmp_path / "replica" / "nodes.conf"),
    )  # fmt: skip
    replica.start()
    spare = redis.Redis(port=replica.port, decode_responses=True)
    old = cluster.admin[src]
    try:
        replicate(cluster, spare, src)
        threads_n, per_thread = 4, 5
        tally = Tally()
        decided = threading.Semaphore(0)
        issued = threading.Event()
        engines = [
            PolicyEngine(
                storage=RedisStorage(cluster.url, key_prefix=keys, timeout=timedelta(seconds=0.5)),
                clock=clock,
            )
            for _ in range(threads_n)
        ]
        failures: list[BaseException] = []

        def payer(n: int) -> None:
            try:
                for j in range(per_thread):
                    if j == 2:  # the rest while the replica takes over, and after
                        assert issued.wait(30)
                    pay_until_decided(engines[n], f"f{n}-{j}", tally)
                    decided.release()
            except BaseException as exc:  # reported below
                failures.append(exc)
                decided.release()

        workers = [threading.Thread(target=payer, args=(n,)) for n in range(threads_n)]
        for w in workers:
            w.start()
        for _ in range(2 * threads_n):  # two payments each decided: take over
            assert decided.acquire(timeout=30)
        spare.execute_command("CLUSTER", "FAILOVER")
        issued.set()
        wait_for("the replica took over", lambda: spare.execute_command("ROLE")[0] == "master")
        for w in workers:
            w.join(60)
        assert not failures, failures
        check_ledger(setup, "agent-1", tally, threads_n * per_thread)
        for e in engines:
            e.close()
    finally:
        give_back(cluster, old, spare, replica)
    setup.close()
