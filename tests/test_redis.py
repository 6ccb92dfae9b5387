"""Redis storage beyond the contract suite: processes, one command, exactness, outages."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import ErrorCode, PolicyEngine, PolicyError, ReservationStatus, open_storage
from agentpolicy.storage.redis import RedisStorage, agent_tag
from agentpolicy.testing import ManualClock, payment
from tests import workers
from tests.redis_servers import RedisServer

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def own_server(tmp_path: Path, redis_url: str) -> Iterator[RedisServer]:
    """A Redis only this test talks to (needs redis-server on PATH, like the session one)."""
    del redis_url  # skip or fail exactly as the session fixture does when Redis is missing
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("these tests start and stop their own redis-server")
    server = RedisServer(tmp_path / "own")
    server.start()
    yield server
    server.stop()


def test_4_processes_x_60_allow_exactly_100_and_settle_across_processes(redis_url: str) -> None:
    keys = prefix()
    setup = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=keys),
                         clock=ManualClock(workers.FIXED_NOW))  # fmt: skip
    setup.set_policy("agent-1", DAILY_100)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        chunks = pool.starmap(workers.authorize_many_redis, [(redis_url, keys, 60, barrier)] * 4)
    ids = [r for chunk in chunks for r in chunk]
    assert len(ids) == len(set(ids)) == 100
    with ctx.Pool(2) as pool:
        confirmed, released = pool.starmap(
            workers.settle_redis,
            [(redis_url, keys, ids[:7], "confirm"), (redis_url, keys, ids[7:10], "release")],
        )
    assert (confirmed, released) == (["confirmed"] * 7, ["released"] * 3)
    window = setup.budget("agent-1", "daily").periods
    daily = next(iter(window.values()))
    assert (daily.spent.value, daily.reserved.value) == (7 * USDT, 90 * USDT)
    setup.close()


def test_an_authorize_is_exactly_one_command_in_the_steady_state(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RedisStorage(own_server.url)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(10**20)}}})
    engine.authorize(payment(1))  # warm: the policy is now cached in the process
    sent: list[str] = []
    original = storage.client.execute_command

    def counting(*args: object, **kwargs: object) -> object:
        sent.append(str(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(storage.client, "execute_command", counting)
    probe = redis.Redis.from_url(own_server.url)
    before = int(probe.info("commandstats")["cmdstat_evalsha"]["calls"])
    for _ in range(25):
        assert engine.authorize(payment(1)).allowed
    after = int(probe.info("commandstats")["cmdstat_evalsha"]["calls"])
    assert sent == ["EVALSHA"] * 25  # what the client sent
    assert after - before == 25  # what the server received
    probe.close()
    engine.close()


def test_amounts_stay_exact_at_10_to_the_30(redis_url: str) -> None:
    engine = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=prefix()), clock=ManualClock())
    big = 10**30
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(big + 5)}}})
    first = engine.authorize(payment(big))
    assert first.allowed
    assert first.reservation_id is not None
    assert engine.authorize(payment(5)).allowed
    assert engine.authorize(payment(1)).code == "DAILY_LIMIT"
    engine.confirm(first.reservation_id)
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert (daily.spent.value, daily.reserved.value, daily.remaining) == (big, 5, daily.remaining)
    assert daily.remaining is not None
    assert daily.remaining.value == 0
    # finer decimals scale inside Lua without rounding
    fine = engine.authorize(payment(1, decimals=18))
    assert fine.code == "DAILY_LIMIT"


def test_redis_outage_fails_closed_and_recovers_without_a_restart(own_server: RedisServer) -> None:
    engine = PolicyEngine(storage=RedisStorage(own_server.url), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    kept = engine.authorize(payment(10 * USDT)).reservation_id
    assert kept is not None
    engine.confirm(kept)
    own_server.stop()
    for call in (lambda: engine.authorize(payment(USDT)), lambda: engine.budget("agent-1"),
                 lambda: engine.confirm(kept)):  # fmt: skip
        with pytest.raises(PolicyError) as err:
            call()
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    own_server.start()  # same port, same append-only file
    assert engine.authorize(payment(USDT)).allowed
    assert engine.get_reservation(kept).status is ReservationStatus.CONFIRMED
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert daily.spent.value == 10 * USDT
    engine.close()


def test_scripts_survive_a_script_flush(redis_url: str) -> None:
    engine = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=prefix()), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    redis.Redis.from_url(redis_url).script_flush()
    assert engine.authorize(payment(USDT)).allowed


def test_every_key_of_an_agent_shares_its_hash_tag_and_expires(redis_url: str) -> None:
    keys = prefix()
    engine = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=keys), clock=ManualClock())
    engine.set_policy("agent-1", {**DAILY_100, "approvalConfig": {"thresholds": [
        {"amount": {"value": str(50 * USDT)}, "requiredApprovers": 1, "approvers": ["a"]}]}})  # fmt: skip
    engine.authorize(payment(USDT, idempotency_key="once"))
    engine.authorize(payment(60 * USDT))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    found = sorted(client.scan_iter(match=keys + "*"))
    assert keys + "agents" in found
    agent_keys = [k for k in found if k != keys + "agents"]
    assert agent_keys
    assert all(k.startswith(keys + "{agent-1}:") for k in agent_keys)
    expiring = [k for k in agent_keys if ":c:" in k or ":r:" in k or ":idem:" in k or ":a:" in k]
    assert len(expiring) >= 7  # 4 counters, 2 reservations, 1 approval, 1 idempotency key
    for key in expiring:
        ttl = client.pttl(key)
        assert ttl > 0, key
        if ":c:daily:" in key:  # a duration from the server's clock, not the test clock's date
            assert ttl <= (14 + 1) * 3600 * 1000
    client.close()


def test_odd_agent_ids_get_a_safe_tag() -> None:
    assert agent_tag("agent-1") == "agent-1"
    assert agent_tag("a{b}c").startswith("h")
    assert agent_tag("x" * 100).startswith("h")
    assert agent_tag("a{b}c") != agent_tag("a{b}d")


def test_odd_agent_ids_work_end_to_end(redis_url: str) -> None:
    engine = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=prefix()), clock=ManualClock())
    odd = "org:{team}/" + "bot" * 30
    engine.set_policy(odd, DAILY_100)
    rid = engine.authorize(payment(USDT, agent_id=odd)).reservation_id
    assert rid is not None
    assert engine.confirm(rid).agent_id == odd


def test_urls_and_the_mcp_server_on_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentpolicy.mcp import AgentPolicyMcpServer, create_server_with_redis

    storage = open_storage(redis_url, key_prefix=prefix())
    assert isinstance(storage, RedisStorage)
    storage.close()
    keys = prefix()
    server = create_server_with_redis(redis_url, key_prefix=keys, role="admin")
    result = server.call("agent_policy_set", {"agentId": "a", "policy": DAILY_100})
    assert result["success"] is True
    monkeypatch.setenv("AGENT_POLICY_REDIS_URL", redis_url)
    monkeypatch.setenv("AGENT_POLICY_KEY_PREFIX", keys)
    from_env = AgentPolicyMcpServer(role="agent")
    assert from_env.call("agent_policy_get", {"agentId": "a"})["data"]["version"] == 1
    assert create_server_with_redis(redis_url, demo_mode=True).demo_mode


def test_an_unreachable_redis_is_storage_unavailable() -> None:
    from tests.redis_servers import free_port

    engine = PolicyEngine(storage=RedisStorage(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(USDT))
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE


def _lua_math(redis_url: str) -> Any:
    from importlib import resources

    common = (resources.files("agentpolicy.storage") / "redis_scripts" / "common.lua").read_text()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return client, client.register_script(
        common + "\nreturn {add(ARGV[1], ARGV[2]), sub0(ARGV[1], ARGV[2]), "
        "tostring(cmp(ARGV[1], ARGV[2])), scale(ARGV[1], tonumber(ARGV[3]))}"
    )


@settings(max_examples=200, deadline=None)
@given(
    a=st.one_of(st.integers(0, 10**15), st.integers(0, 10**45)),
    b=st.one_of(st.integers(0, 10**15), st.integers(0, 10**45)),
    n=st.integers(0, 30),
)
def test_lua_decimal_arithmetic_matches_python_integers(
    redis_url: str, a: int, b: int, n: int
) -> None:
    client, script = _lua_math(redis_url)
    added, subtracted, compared, scaled = script(keys=[], args=[str(a), str(b), n])
    client.close()
    assert int(added) == a + b
    assert int(subtracted) == max(0, a - b)
    assert int(compared) == (a > b) - (a < b)
    assert int(scaled) == a * 10**n
    assert added == str(a + b)  # no leading zeros, no exponent
