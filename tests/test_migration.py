"""Data written by agentpolicy 0.1 keeps working: SQLite files and Redis keys are converted.

The fixtures were written by agentpolicy 0.1 (commit fdebb37) with the script in
``tests/fixtures/make_v01.py.txt``: two agents, two policy versions, a confirmed, a
released and an open reservation, a pending approval holding 60 USDT, a denial, an
idempotency key, history. The tests open them with this version and use them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from agentpolicy import ApprovalStatus, PolicyEngine, ReservationStatus
from agentpolicy.errors import ErrorCode, PolicyError
from agentpolicy.storage import SQLiteStorage
from agentpolicy.storage.sqlite import SCHEMA_VERSION
from agentpolicy.testing import ManualClock, payment

FIXTURES = Path(__file__).parent / "fixtures"
AT = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
USDT = 1_000_000


def check_converted(engine: PolicyEngine, info: dict[str, Any]) -> None:
    stored = engine.get_policy("agent-1")
    assert stored is not None
    assert stored.version == 2
    assert [p.agent_id for p in engine.list_policies()] == ["agent-1", "org:agent 2"]
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    # 10 confirmed; 3 open + 60 held for the approval
    assert (daily.spent.value, daily.reserved.value) == (10 * USDT, 63 * USDT)
    events = [(h.event, h.code) for h in engine.history("agent-1")]
    assert events[-2:] == [("policy_set", None), ("policy_set", None)]
    assert ("decision", "DAILY_LIMIT") in events
    assert ("confirm", None) in events
    pending = engine.list_approvals()
    assert [a.id for a in pending] == [info["pending_approval"]]
    # ids handed out by 0.1 go on working
    assert engine.get_reservation(info["open_reservation"]).status is ReservationStatus.RESERVED
    assert engine.confirm(info["open_reservation"]).status is ReservationStatus.CONFIRMED
    approved = engine.decide(info["pending_approval"], "boss@example.com", "approve")
    assert approved.status is ApprovalStatus.APPROVED
    assert approved.reservation_id is not None
    engine.confirm(approved.reservation_id)
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert (daily.spent.value, daily.reserved.value) == (73 * USDT, 0)
    # the idempotency key of 0.1 still answers its first decision
    again = engine.authorize(payment(10 * USDT, idempotency_key="k1"))
    assert again.code == "ALLOWED"
    assert again.decided_at == datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    # and new payments count against the converted counters
    assert engine.authorize(payment(28 * USDT)).code == "DAILY_LIMIT"
    assert engine.authorize(payment(27 * USDT)).allowed
    other = next(iter(engine.budget("org:agent 2", "daily").periods.values()))
    assert other.spent.value == 1 * USDT


def copy_db(tmp_path: Path) -> Path:
    path = tmp_path / "v01.db"
    shutil.copy(FIXTURES / "v01.db", path)
    return path


def test_a_sqlite_file_of_0_1_is_converted_and_keeps_working(tmp_path: Path) -> None:
    path = copy_db(tmp_path)
    info = json.loads((FIXTURES / "v01-sqlite.json").read_text())
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
        check_converted(engine, info)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "reservations" not in tables  # the old tables are gone
    assert "docs" in tables


def test_a_sqlite_file_of_schema_1_is_converted_too(tmp_path: Path) -> None:
    path = copy_db(tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE outbox")
        conn.execute("UPDATE schema_version SET version = 1")
    info = json.loads((FIXTURES / "v01-sqlite.json").read_text())
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(AT)) as engine:
        check_converted(engine, info)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE reservations SET body = 'not json' WHERE rowid = 1",
        "UPDATE reservations SET body = '{\"agentId\": 5}' WHERE rowid = 1",
        "UPDATE policies SET body = '{' WHERE rowid = 1",
        "UPDATE policies SET updated_at = 'yesterday' WHERE rowid = 1",
        "UPDATE counters SET spent = '12abc' WHERE rowid = 1",
    ],
)
def test_a_damaged_0_1_file_is_refused_with_a_store_error_and_left_as_it_was(
    tmp_path: Path, damage: str
) -> None:
    path = copy_db(tmp_path)
    with sqlite3.connect(path) as conn:  # a damaged row: the conversion must stop, all or nothing
        conn.execute(damage)
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(path)
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "written by agentpolicy 0.1" in str(err.value)
    assert "left as it was" in str(err.value)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 5
        assert conn.execute("SELECT count(*) FROM policies").fetchone()[0] > 0


def load_redis_fixture(client: Any, prefix: str) -> dict[str, Any]:
    dump = json.loads((FIXTURES / "v01-redis.json").read_text())
    for key, item in dump["keys"].items():
        new = prefix + key.removeprefix("v01:")
        kind, value = item["type"], item["value"]
        if kind == "string":
            client.set(new, value)
        elif kind == "hash":
            client.hset(new, mapping=value)
        elif kind == "list":
            client.rpush(new, *value)
        elif kind == "set":
            client.sadd(new, *value)
        elif kind == "zset":
            client.zadd(new, dict(value))
    info: dict[str, Any] = dump["info"]
    return info


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_redis_data_of_0_1_is_converted_once_and_keeps_working(
    kind: str, request: pytest.FixtureRequest
) -> None:
    from agentpolicy.storage.redis import RedisStorage

    url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
    prefix = f"mig-{uuid.uuid4().hex[:8]}:"
    if kind == "redis":
        client: Any = redis.Redis.from_url(url, decode_responses=True)
    else:
        client = redis.cluster.RedisCluster.from_url(
            url.replace("+cluster", ""), decode_responses=True
        )
    info = load_redis_fixture(client, prefix)
    with PolicyEngine(storage=RedisStorage(url, key_prefix=prefix), clock=ManualClock(AT)) as e:
        check_converted(e, info)
    assert client.get(prefix + "schema") == "3"
    assert not client.exists(prefix + "{agent-1}:policy")  # the 0.1 keys are gone
    with PolicyEngine(storage=RedisStorage(url, key_prefix=prefix), clock=ManualClock(AT)) as e:
        assert e.get_policy("agent-1") is not None  # a second open converts nothing again
    client.close()


def test_damaged_redis_data_of_0_1_is_a_store_error_naming_the_agent(redis_url: str) -> None:
    from agentpolicy.storage.redis import RedisStorage

    prefix = f"mig-{uuid.uuid4().hex[:8]}:"
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        load_redis_fixture(client, prefix)
        client.hset(prefix + "{agent-1}:policy", "version", "two")  # not a number
        with (
            pytest.raises(PolicyError) as err,
            PolicyEngine(storage=RedisStorage(redis_url, key_prefix=prefix)) as engine,
        ):
            engine.get_policy("agent-1")
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "agent agent-1" in str(err.value)
        assert client.get(prefix + "schema") is None  # not marked done: converted on a later open
        assert client.hget(prefix + "{agent-1}:policy", "version") == "two"  # left as it was
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()
