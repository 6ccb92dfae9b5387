"""A Redis user whose ACL refuses a write of the commit changes nothing (Redis 7.0+).

Redis undoes no write of a script that a refusal stops. Before, a user that
may run ``HSET`` but not ``ZADD`` (or ``LPUSH``, ``INCR``, ``PEXPIRE``...), or
may not write one kind of key, left a commit half-written: a reservation
without its index entry, a head moved without its history. The commit
script now asks Redis (``redis.acl_check_cmd``) whether the store's user
may run each write of the commit on its key before it makes the first, and
writes nothing when one is refused; the error says so. Each test runs on a
redis-server of its own, with ACL users made there, and compares every key
of the prefix (its ``DUMP`` and its expiry instant) before and after.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyError
from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage.base import NEXT_SEQ, Txn
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.redis_servers import RedisServer, unavailable

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
NOTHING_CHANGED = "nothing was allowed or changed"
PASSWORD = "Acl-Us3r-Pa55"
AT = 1_768_816_800_000_000  # 2026-01-19T10:00Z in microseconds

EVERY_KEY = ["~*"]
GLOBALS = "%W~*:@*"  # the global indexes (@due, @agents...): no hash tag
USERS = {  # name: key patterns and commands (ACL SETUSER rules), each with +@all first
    **{f"no-{cmd}": [*EVERY_KEY, f"-{cmd}"]
       for cmd in ("hset", "hincrby", "pexpire", "persist", "del", "zadd", "zrem", "incr",
                   "lpush", "ltrim", "lindex", "rpop", "set")},
    # EVALSHA names every key of the commit, and Redis checks them before the script runs:
    # a user that may not write the open reservations' indexes (o/...) is refused it whole
    "keys-but-open-index": ["%R~*", "%W~*}:[^o]*", GLOBALS],
    # a selector gives ZADD (LPUSH) on every key but the open indexes (the logs hc/, hd/...):
    # EVALSHA is allowed, and only a check of the command on its key finds the refusal
    "zadd-but-not-open-index": [*EVERY_KEY, "-zadd", "(~*}:[^o]* +zadd)"],
    "lpush-but-not-history": [*EVERY_KEY, "-lpush", "(~*}:[^h]* ~*}:h/* +lpush)"],
    "given-back": [*EVERY_KEY],
}  # fmt: skip


@dataclass
class Acl:
    """A Redis only these tests use, with ACL users, and a client of its default user."""

    server: RedisServer
    admin: redis.Redis

    def url(self, user: str | None = None) -> str:
        login = "" if user is None else f"{user}:{PASSWORD}@"
        return f"redis://{login}127.0.0.1:{self.server.port}/0"


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acl]:
    if shutil.which("redis-server") is None:
        unavailable("these tests start their own redis-server (none on PATH)")
    server = RedisServer(tmp_path_factory.mktemp("acl"))
    server.start()
    admin = redis.Redis(port=server.port)
    try:
        version = tuple(int(p) for p in admin.info("server")["redis_version"].split(".")[:2])
        if version < (7, 0):
            pytest.skip("Redis before 7.0 has no redis.acl_check_cmd: no such guarantee")
        for name, rules in USERS.items():
            admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}",
                                  "+@all", *rules)  # fmt: skip
        yield Acl(server, admin)
    finally:
        admin.close()
        server.stop()


def prefix() -> str:
    return f"acl-{uuid.uuid4().hex[:12]}:"


def snapshot(client: redis.Redis, keys: str) -> dict[Any, tuple[Any, Any]]:
    """Every key under ``keys``: its serialized value (type and contents) and expiry instant."""
    return {
        key: (client.dump(key), client.execute_command("PEXPIRETIME", key))
        for key in client.scan_iter(match=keys + "*")
    }


def engine_of(acl: Acl, keys: str, user: str | None = None) -> PolicyEngine:
    return PolicyEngine(storage=RedisStorage(acl.url(user), key_prefix=keys), clock=ManualClock())


def seeded(acl: Acl) -> tuple[str, str]:
    """A fresh prefix holding agent-1's policy and one open reservation of 1 USDT (and its id)."""
    keys = prefix()
    engine = engine_of(acl, keys)
    engine.set_policy("agent-1", DAILY_100)
    decision = engine.authorize(payment(USDT))
    engine.close()
    assert decision.allowed
    assert decision.reservation_id
    return keys, decision.reservation_id


def assert_nothing_changed(error: PolicyError, *words: str) -> None:
    """The error is the script's own refusal, saying that nothing changed, and naming ``words``."""
    assert error.code == ErrorCode.STORAGE_UNAVAILABLE, error.message
    assert "inside the commit script" in error.message, error.message
    assert NOTHING_CHANGED in error.message, error.message
    assert "part of this change" not in error.message, error.message
    assert "unknown" not in error.message, error.message
    assert PASSWORD not in error.message
    for word in words:
        assert word in error.message, (word, error.message)


# -- through an engine: authorize and confirm ----------------------------------------------------

REFUSED = [  # (user, operation, what the error names)
    ("no-zadd", "authorize", ("'zadd'", ":o/agent-1'")),
    ("no-lpush", "authorize", ("'lpush'", ":hc/agent-1'")),
    ("no-incr", "authorize", ("'incr'", ":#seq'")),
    ("no-persist", "authorize", ("'persist'",)),
    ("no-hincrby", "authorize", ("'hincrby'", ":r/res_")),
    ("no-set", "authorize", ("'set'", ":#op:")),
    ("no-rpop", "authorize", ("'rpop'", ":hc/agent-1'")),
    ("zadd-but-not-open-index", "authorize", ("'zadd'", ":o/agent-1'")),
    ("lpush-but-not-history", "authorize", ("'lpush'", ":hc/agent-1'")),
    ("no-zrem", "confirm", ("'zrem'", ":o/agent-1'")),
    ("no-pexpire", "confirm", ("'pexpire'", ":r/res_")),
    ("no-lpush", "confirm", ("'lpush'", ":hc/agent-1'")),
    ("no-incr", "confirm", ("'incr'", ":#seq'")),
    ("lpush-but-not-history", "confirm", ("'lpush'", ":hc/agent-1'")),
]


OPS: dict[str, Callable[[Any, str], Any]] = {  # an engine, sync or async, and a reservation
    "authorize": lambda engine, _: engine.authorize(payment(USDT)),
    "confirm": lambda engine, reservation: engine.confirm(reservation),
}


def _sync(acl: Acl, keys: str, user: str, op: str, reservation: str) -> PolicyError:
    engine = engine_of(acl, keys, user)
    try:
        with pytest.raises(PolicyError) as err:
            OPS[op](engine, reservation)
    finally:
        engine.close()
    return err.value


def _async(acl: Acl, keys: str, user: str, op: str, reservation: str) -> PolicyError:
    async def main() -> PolicyError:
        url = acl.url(user)
        engine = AsyncPolicyEngine(RedisStorage(url, key_prefix=keys), ManualClock(),
                                   async_storage=AsyncRedisStorage(url, key_prefix=keys))  # fmt: skip
        try:
            with pytest.raises(PolicyError) as err:
                await OPS[op](engine, reservation)
        finally:
            await engine.close()
        return err.value

    return asyncio.run(main())


@pytest.mark.parametrize("run", [_sync, _async], ids=["sync", "async"])
@pytest.mark.parametrize(("user", "op", "words"), REFUSED, ids=[f"{u}-{o}" for u, o, _ in REFUSED])
def test_a_refused_write_of_the_commit_changes_nothing(
    acl: Acl, run: Any, user: str, op: str, words: tuple[str, ...]
) -> None:
    keys, reservation = seeded(acl)
    before = snapshot(acl.admin, keys)
    error = run(acl, keys, user, op, reservation)
    assert_nothing_changed(error, *words)
    assert snapshot(acl.admin, keys) == before


@pytest.mark.parametrize("run", [_sync, _async], ids=["sync", "async"])
@pytest.mark.parametrize("op", ["authorize", "confirm"])
def test_a_key_the_user_may_not_write_refuses_the_whole_script(acl: Acl, run: Any, op: str) -> None:
    """Redis checks the keys EVALSHA names before the script runs (Redis 6 too)."""
    keys, reservation = seeded(acl)
    before = snapshot(acl.admin, keys)
    error = run(acl, keys, "keys-but-open-index", op, reservation)
    assert error.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "Redis refused the store's user access to its keys (NOPERM" in error.message
    assert NOTHING_CHANGED in error.message
    assert snapshot(acl.admin, keys) == before


def test_the_same_engine_works_once_the_command_is_given_back(acl: Acl) -> None:
    """Nothing of the refused commit lingers: the next one counts the payment exactly once."""
    keys, _ = seeded(acl)
    engine = engine_of(acl, keys, "given-back")
    try:
        assert engine.authorize(payment(USDT)).allowed  # connected, script loaded
        before = snapshot(acl.admin, keys)
        acl.admin.execute_command("ACL", "SETUSER", "given-back", "-zadd")
        try:
            with pytest.raises(PolicyError) as err:
                engine.authorize(payment(USDT))
            assert snapshot(acl.admin, keys) == before
        finally:
            acl.admin.execute_command("ACL", "SETUSER", "given-back", "+zadd")
        assert_nothing_changed(err.value, "'zadd'")
        assert engine.authorize(payment(USDT)).allowed
        periods = engine.budget("agent-1", "daily").periods.values()
        assert int(next(iter(periods)).reserved.value) == 3 * USDT
    finally:
        engine.close()


# -- the primitive: a commit that makes every kind of write -------------------------------------


def _every_write(op: str) -> Txn:
    """A commit that runs every write the script has, on documents :func:`_laid_out` made."""
    txn = Txn(op, AT + 1)
    txn.expect = {"d/kept": 1, "d/gone": 1}
    txn.put = {"d/kept": {"n": 2}, "d/new": {"n": 1}}  # HSET v b, and HINCRBY then HSET
    txn.ttl = {"d/new": 60_000}  # PEXPIRE; d/kept: PERSIST
    txn.delete = ["d/gone"]
    txn.index = [("o/a", "m1", 5), ("o/a", "m2", NEXT_SEQ), ("x/b", "old", None),
                 ("x/b", "older", None)]  # fmt: skip
    txn.append = [("l/a", {"e": 2}, AT, 2), ("l/a", {"e": 3}, AT, 2)]  # LPUSH, INCR, LTRIM...
    txn.result = "done"
    return txn


def _laid_out(storage: RedisStorage) -> None:
    txn = Txn("setup", AT - 10)
    txn.put = {"d/kept": {"n": 1}, "d/gone": {"n": 1}}
    txn.index = [("x/b", "old", 1)]
    txn.append = [("l/a", {"e": 1}, None, None)]
    with storage.session("s1") as session:
        assert session.commit(txn).applied


@pytest.mark.parametrize(
    "user", [name for name in USERS if name.startswith("no-")] + ["zadd-but-not-open-index"]
)
def test_each_write_the_script_makes_is_checked_before_the_first(acl: Acl, user: str) -> None:
    keys = prefix()
    owner = RedisStorage(acl.url(), key_prefix=keys)
    _laid_out(owner)
    before = snapshot(acl.admin, keys)
    storage = RedisStorage(acl.url(user), key_prefix=keys)
    try:
        with storage.session("s1") as session, pytest.raises(PolicyError) as err:
            session.commit(_every_write("op-1"))
        command = user.removeprefix("no-") if user.startswith("no-") else "zadd"
        assert_nothing_changed(err.value, f"'{command}' on the key '{keys}")
        assert snapshot(acl.admin, keys) == before
        with owner.session("s1") as session:  # the same commit, by a user who may: applied
            assert session.commit(_every_write("op-1")).applied
        assert snapshot(acl.admin, keys) != before
    finally:
        storage.close()
        owner.close()


def test_the_reply_of_a_refused_write_raises_and_touches_no_cache() -> None:
    """The ``"N"`` reply, without a server: the same error for both stores, the cache kept."""
    keys = rp.Keyspace("p:", cluster=False)
    keys.remember("p:{s1}:d/kept", (1, {"n": 1}))
    steps = keys.commit("p:{s1}:", _every_write("op-2"))
    request = next(steps)
    assert isinstance(request, rp.Eval)
    with pytest.raises(PolicyError) as err:
        steps.send(["N", "ZADD", "p:{s1}:x/a"])
    assert_nothing_changed(err.value, "'zadd' on the key 'p:{s1}:x/a'", "of @write")
    assert keys.cache == {"p:{s1}:d/kept": (1, {"n": 1})}
    long_key = "p:{s1}:" + "k" * 300
    message = rp.acl_refused("NOSUCH", long_key).message
    assert long_key not in message
    assert "'nosuch'" in message
    assert "a command of @" not in message
