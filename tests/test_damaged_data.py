"""Stored data that is damaged (hand-edited, or written by something else) is a structured error.

Nothing read back from a store is trusted: a document that is not JSON, or
not shaped as the ledger wrote it, and a stored policy that does not load,
make the call fail with ``STORAGE_UNAVAILABLE`` naming the data, never a raw
``KeyError``/``TypeError``/``JSONDecodeError``, and the call allows nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyError
from agentpolicy.storage import SQLiteStorage
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.test_redis import prefix

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}

HEADS = {
    "not JSON": "{not json",
    "a list": "[]",
    "fields missing": '{"pv":1}',
    "fields of the wrong type": '{"pv":"x","c":5}',
}
POLICIES = {
    "no policy field": '{"x":1}',
    "a policy that does not load": '{"policy":{"limits":5}}',
}
CALLS: dict[str, Callable[[PolicyEngine], Any]] = {
    "authorize": lambda e: e.authorize(payment(USDT)),
    "budget": lambda e: e.budget("agent-1"),
    "set_policy": lambda e: e.set_policy("agent-1", DAILY_100),
}


def _sqlite_with(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / "damaged.db"
    engine = PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    assert engine.authorize(payment(USDT)).allowed
    engine.close()
    conn = sqlite3.connect(path)
    with conn:
        assert conn.execute("UPDATE docs SET body = ? WHERE name = ?", (body, name)).rowcount == 1
    conn.close()
    return path


def _assert_unreadable(err: PolicyError, where: str) -> None:
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert where in err.message
    assert "cannot be read" in err.message


def _reserved(path: Path) -> str:
    """The head document as stored (unchanged by a call that failed)."""
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT body FROM docs WHERE name = 'h/agent-1'").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("damage", sorted(HEADS))
def test_a_damaged_head_is_a_structured_error_that_changes_nothing(
    tmp_path: Path, damage: str, call: str
) -> None:
    path = _sqlite_with(tmp_path, "h/agent-1", HEADS[damage])
    engine = PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock())
    with pytest.raises(PolicyError) as caught:
        CALLS[call](engine)
    _assert_unreadable(caught.value, "of shard 'agent-1'")
    engine.close()
    assert _reserved(path) == HEADS[damage]


@pytest.mark.parametrize("damage", sorted(POLICIES))
def test_a_stored_policy_that_does_not_load_names_its_version(tmp_path: Path, damage: str) -> None:
    path = _sqlite_with(tmp_path, "p/agent-1/1", POLICIES[damage])
    engine = PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock())
    for call in (CALLS["authorize"], lambda e: e.get_policy("agent-1")):
        with pytest.raises(PolicyError) as caught:
            call(engine)
        _assert_unreadable(caught.value, "of policy version 1 of agent 'agent-1'")
    engine.close()


def test_the_async_engine_reports_damaged_data_alike(redis_url: str) -> None:
    """On the native async path (redis.asyncio) too, and a repaired head works again."""
    keys = prefix()
    sync = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=keys), clock=ManualClock())
    sync.set_policy("agent-1", DAILY_100)
    assert sync.authorize(payment(USDT)).allowed
    sync.close()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    (head,) = [k for k in client.scan_iter(match=keys + "*") if k.endswith(":h/agent-1")]
    good = client.hget(head, "b")
    client.hset(head, "b", '{"pv":1}')

    async def main() -> tuple[PolicyError, bool]:
        engine = AsyncPolicyEngine(
            RedisStorage(redis_url, key_prefix=keys),
            ManualClock(),
            async_storage=AsyncRedisStorage(redis_url, key_prefix=keys),
        )
        try:
            try:
                await engine.authorize(payment(USDT))
            except PolicyError as err:
                caught = err
            else:
                raise AssertionError("a damaged head was read without an error")
            client.hset(head, "b", good)
            client.hincrby(head, "v", 1)  # a new version: the store's cache reads it again
            return caught, (await engine.authorize(payment(USDT))).allowed
        finally:
            await engine.close()

    try:
        caught, repaired = asyncio.run(main())
    finally:
        client.close()
    _assert_unreadable(caught, "of shard 'agent-1'")
    assert repaired


def test_a_damaged_webhook_delivery_is_a_structured_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    approval = {**DAILY_100, "approvalConfig": {"thresholds": [
        {"amount": {"value": str(USDT)}, "requiredApprovers": 1, "approvers": ["boss"]}]}}  # fmt: skip
    hook = [{"url": "http://127.0.0.1:9/hook", "secret": "s3cret"}]
    engine = PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock(), webhook_endpoints=hook)
    engine.set_policy("agent-1", approval)
    assert engine.authorize(payment(2 * USDT)).approval_id is not None  # approval.created
    assert len(engine.webhook_deliveries()) == 1
    conn = sqlite3.connect(path)
    with conn:
        assert conn.execute("UPDATE docs SET body = '[1]' WHERE name LIKE 'w/%'").rowcount == 1
    conn.close()
    with pytest.raises(PolicyError) as caught:
        engine.webhook_deliveries()
    _assert_unreadable(caught.value, "of the webhook outbox")
    engine.close()
