"""Redis storage beyond the contract suite: one command, stalls and resends, keys, outages."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy import ErrorCode, PolicyEngine, PolicyError, ReservationStatus, open_storage
from agentpolicy.ledger.keys import agent_of_id, new_id, tag
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.testing import ManualClock, payment
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
    server = RedisServer(tmp_path / "own", "--enable-debug-command", "yes")
    server.start()
    yield server
    server.stop()


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
    assert daily.remaining is not None
    assert (daily.spent.value, daily.reserved.value, daily.remaining.value) == (big, 5, 0)
    assert engine.authorize(payment(1, decimals=18)).code == "DAILY_LIMIT"


def test_redis_outage_fails_closed_and_recovers_without_a_restart(own_server: RedisServer) -> None:
    engine = PolicyEngine(storage=RedisStorage(own_server.url), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    kept = engine.authorize(payment(10 * USDT)).reservation_id
    assert kept is not None
    engine.confirm(kept)
    own_server.stop()
    started = time.monotonic()
    for call in (lambda: engine.authorize(payment(USDT)), lambda: engine.budget("agent-1"),
                 lambda: engine.confirm(kept)):  # fmt: skip
        with pytest.raises(PolicyError) as err:
            call()
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert time.monotonic() - started < 10  # fails closed quickly, no long retry loops
    own_server.start()  # same port, same append-only file
    assert engine.authorize(payment(USDT)).allowed
    assert engine.get_reservation(kept).status is ReservationStatus.CONFIRMED
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert daily.spent.value == 10 * USDT
    engine.close()


def test_the_script_survives_a_script_flush(own_server: RedisServer) -> None:
    engine = PolicyEngine(storage=RedisStorage(own_server.url), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    redis.Redis.from_url(own_server.url).script_flush()  # our own server: ours to flush
    assert engine.authorize(payment(USDT)).allowed
    engine.close()


def _stall(url: str, seconds: float) -> threading.Thread:
    def sleep() -> None:
        client = redis.Redis.from_url(url, socket_timeout=seconds + 5)
        client.execute_command("DEBUG", "SLEEP", seconds)
        client.close()

    stall = threading.Thread(target=sleep)
    stall.start()
    # until DEBUG SLEEP has reached the server (a fixed 0.1 s may not be enough on a busy
    # host): a ping then gets no answer; at most 0.25 s of the stall is spent finding out
    probe = redis.Redis.from_url(url, socket_timeout=0.25)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                probe.ping()
            except redis.TimeoutError:
                break
            assert time.monotonic() < deadline, "DEBUG SLEEP never reached the server"
            time.sleep(0.005)
    finally:
        probe.close()
    return stall


def test_a_commit_resent_after_a_stall_past_the_timeout_is_applied_once(
    own_server: RedisServer,
) -> None:
    """The server runs a commit the client gave up on; the resend must not apply it again."""
    storage = RedisStorage(own_server.url, timeout=timedelta(seconds=1))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    stall = _stall(own_server.url, 1.5)
    d = engine.authorize(payment(10 * USDT))  # times out once, is resent, answered once
    stall.join()
    assert d.allowed
    assert d.reservation_id is not None
    decisions = [h for h in engine.history("agent-1") if h.event == "decision"]
    assert [h.reservation_id for h in decisions] == [d.reservation_id]  # one record
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert daily.reserved.value == 10 * USDT  # held once, not twice
    engine.release(d.reservation_id)
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert daily.reserved.value == 0  # nothing stuck after the release
    engine.close()


def test_on_a_cluster_a_commit_stalled_past_the_timeout_is_applied_once(
    redis_cluster_url: str,
) -> None:
    keys = prefix()
    storage = RedisStorage(redis_cluster_url, key_prefix=keys, timeout=timedelta(seconds=1))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    node = storage.client.get_node_from_key(f"{keys}{{agent-1}}:h/agent-1")
    stall = _stall(f"redis://{node.host}:{node.port}/0", 1.5)
    d = engine.authorize(payment(10 * USDT))
    stall.join()
    assert d.allowed
    assert d.reservation_id is not None
    decisions = [h for h in engine.history("agent-1") if h.event == "decision"]
    assert [h.reservation_id for h in decisions] == [d.reservation_id]
    engine.release(d.reservation_id)
    daily = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert (daily.spent.value, daily.reserved.value) == (0, 0)
    engine.close()


def test_a_server_that_never_answers_says_the_outcome_is_unknown(own_server: RedisServer) -> None:
    storage = RedisStorage(own_server.url, timeout=timedelta(milliseconds=200))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    engine.authorize(payment(USDT))  # warm: the commit is the only command left
    stall = _stall(own_server.url, 2)
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(USDT))
    stall.join()
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in err.value.message  # not "nothing was changed": it may have been
    engine.close()


def test_the_commit_script_touches_only_keys_it_declares(own_server: RedisServer) -> None:
    """Every key a script call names is in its KEYS (MONITOR shows what the script does)."""
    engine = PolicyEngine(storage=RedisStorage(own_server.url), clock=ManualClock(),
                          webhook_endpoints=[{"url": "http://127.0.0.1:9/h", "secret": "s"}])  # fmt: skip
    assert engine.webhooks is not None
    engine.webhooks.close()  # keep the outbox still: only the commits matter here
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    listening = threading.Event()

    def monitor() -> None:
        client = redis.Redis.from_url(own_server.url, decode_responses=True)
        with client.monitor() as m:  # entered once the server has answered MONITOR
            listening.set()
            for command in m.listen():
                seen.append(command)
                if stop.is_set() and command["command"].startswith("PING"):
                    return

    watcher = threading.Thread(target=monitor)
    watcher.start()
    assert listening.wait(30)  # MONITOR must be in place before the commits
    engine.set_policy("agent-1", {**DAILY_100, "approvalConfig": {"thresholds": [
        {"amount": {"value": str(50 * USDT)}, "requiredApprovers": 1, "approvers": ["a"]}]}})  # fmt: skip
    rid = engine.authorize(payment(USDT, idempotency_key="k")).reservation_id
    assert rid is not None
    engine.confirm(rid)
    approval = engine.authorize(payment(60 * USDT)).approval_id
    assert approval is not None
    engine.decide(approval, "a", "approve")
    engine.authorize(payment(1000 * USDT))
    engine.sweep()
    stop.set()
    redis.Redis.from_url(own_server.url).ping()
    watcher.join(10)
    declared: set[str] = set()
    scripted = 0
    for command in seen:
        words = command["command"].split(" ")
        if command["client_type"] != "lua":
            if words[0] == "EVALSHA":
                declared = set(words[3 : 3 + int(words[2])])
            continue
        scripted += 1
        assert words[1] in declared, f"{words[0]} {words[1]} is not in KEYS"
    assert scripted > 30
    engine.close()


def test_every_key_of_an_agent_shares_its_hash_tag_and_closed_state_expires(
    redis_url: str,
) -> None:
    keys = prefix()
    engine = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=keys), clock=ManualClock())
    engine.set_policy("agent-1", {**DAILY_100, "approvalConfig": {"thresholds": [
        {"amount": {"value": str(50 * USDT)}, "requiredApprovers": 1, "approvers": ["a"]}]}})  # fmt: skip
    settled = engine.authorize(payment(USDT, idempotency_key="once")).reservation_id
    engine.confirm(settled or "")
    held = engine.authorize(payment(60 * USDT)).approval_id
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    found = sorted(client.scan_iter(match=keys + "*"))
    shared = [k for k in found if not k.startswith(keys + "@")]
    assert {k for k in found if k.startswith(keys + "@")} <= {
        keys + "@agents",
        keys + "@due",
        keys + "@pending",
        keys + "schema",
    }
    assert all(k.startswith(keys + "{agent-1}:") for k in shared if k != keys + "schema")
    open_ = [k for k in shared if k.endswith((f"a/{held}", f"r/{hold_of(engine, held)}"))]
    expiring = [k for k in shared if (":r/" in k or ":a/" in k or ":i/" in k or ":#op:" in k)
                and k not in open_]  # fmt: skip
    assert len(open_) == 2  # the pending approval and its hold: kept until the ledger closes them
    assert len(expiring) >= 5  # the confirmed reservation, 1 idempotency key, op records
    for key in expiring:
        assert client.pttl(key) > 0, key  # durations on the server's clock
    for key in open_:
        assert client.pttl(key) == -1, key
    assert client.pttl(keys + "{agent-1}:h/agent-1") == -1  # the head stays
    client.close()


def hold_of(engine: PolicyEngine, approval_id: str | None) -> str:
    assert approval_id is not None
    return engine.get_approval(approval_id).hold_id


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_tags_and_ids_are_injective(a: str, b: str) -> None:
    if a != b:
        assert tag(a) != tag(b)
    assert "{" not in tag(a)
    assert "}" not in tag(a)
    assert agent_of_id(new_id("res", a)) == a


def test_an_agent_named_like_another_agents_digest_cannot_touch_its_budget(
    redis_url: str,
) -> None:
    """0.1 tagged long ids with 'h' + 32 hex, itself a valid id: two agents shared keys."""
    engine = PolicyEngine(storage=RedisStorage(redis_url, key_prefix=prefix()), clock=ManualClock())
    long_id = "x" * 100
    lookalike = "h" + hashlib.sha256(long_id.encode()).hexdigest()[:32]
    engine.set_policy(long_id, DAILY_100)
    engine.set_policy(lookalike, DAILY_100)
    assert engine.authorize(payment(100 * USDT, agent_id=long_id)).allowed
    assert engine.authorize(payment(100 * USDT, agent_id=lookalike)).allowed
    for agent in (long_id, lookalike):
        daily = next(iter(engine.budget(agent, "daily").periods.values()))
        assert daily.reserved.value == 100 * USDT


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


def test_an_unreachable_redis_says_that_nothing_of_the_call_ran() -> None:
    # the first use checks the prefix for data of 0.1 (a conversion writes) before the call: a
    # failure there is told as of the call, which had not begun, never as a change of unknown fate
    import asyncio

    from agentpolicy.aio import AsyncPolicyEngine
    from tests.redis_servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    engine = PolicyEngine(storage=url)
    calls = [lambda: engine.history("a"), engine.list_policies, lambda: engine.budget("a"),
             lambda: engine.authorize(payment(USDT))]  # fmt: skip
    messages = []
    for call in calls:
        with pytest.raises(PolicyError) as err:
            call()
        messages.append(err.value.message)

    async def read_async() -> None:
        async with AsyncPolicyEngine(storage=url) as aengine:
            with pytest.raises(PolicyError) as err:
                await aengine.history("a")
            messages.append(err.value.message)

    asyncio.run(read_async())
    engine.close()
    assert len(messages) == 5
    for message in messages:
        assert message.startswith("Redis is unavailable (ConnectionError); nothing was allowed")
        assert "before the call began" in message
        assert "whether this change was recorded" not in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # redis-py reads a path that is not a number as database 0: two "tenants" shared it
        ("redis://127.0.0.1:6379/tenant-a", "the database of a Redis URL is a number"),
        ("redis://127.0.0.1:6379/-1", "the database of a Redis URL is a number"),
        ("redis://127.0.0.1:6379/0/", "the database of a Redis URL is a number"),
        ("redis://127.0.0.1:6379/\u0661", "the database of a Redis URL is a number"),
        ("redis+cluster://127.0.0.1:7000/3", "a Redis Cluster has only database 0"),
        ("redis://[::1", "not a valid Redis URL: Invalid IPv6 URL"),
        ("redis://u:s3cret@127.0.0.1:port/0", "not a valid Redis URL: Port could not be cast"),
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", "not a valid Redis URL: Invalid value"),
        # a password not percent-encoded: no part of it is quoted back
        ("redis://:s3/cret@127.0.0.1:6379/0", "Port could not be cast to a number (a / ? or #"),
        ("redis://:s3?cret@127.0.0.1:6379/0", "Port could not be cast to a number"),
        ("redis://:s3#cret@127.0.0.1:6379/0", "Port could not be cast to a number"),
        ("redis://[s3cret]:6379/0", "not a valid Redis URL: what is in [ ] is not an IPv6"),
        ("redis://u/s3cret@127.0.0.1:6379/0", "the database of a Redis URL is a number"),
        # an option redis-py passes on to its connection, which refused it at the first call,
        # reported as damaged stored data (a TypeError)
        ("redis://127.0.0.1:6379/0?unknown=1", "redis-py knows no option 'unknown'"),
        ("rediss+cluster://127.0.0.1:7000?sockettimeout=1", "knows no option 'sockettimeout'"),
        ("redis://127.0.0.1:6379/0?s-3cret=1&client_name=x", "redis-py knows no option of that"),
        # a TLS option on redis:// (a plain connection takes none: the same TypeError), and a
        # client name Redis refuses at the first connection (reported as a bug)
        ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "'ssl_cert_reqs' is for a TLS"),
        ("redis://127.0.0.1:6379/0?client_name=x%00y", "client_name may hold no spaces"),
        ("redis://127.0.0.1:6379/0?client_name=a%20b", "client_name may hold no spaces"),
    ],
)
def test_a_redis_url_that_cannot_be_read_is_invalid_input(url: str, message: str) -> None:
    from agentpolicy.storage import open_async_storage

    for opener in (open_storage, open_async_storage):
        with pytest.raises(PolicyError) as err:
            opener(url)
        assert err.value.code == ErrorCode.INVALID_INPUT
        assert message in str(err.value)
        assert "s3" not in str(err.value)


def test_a_redis_url_names_its_database_by_number_or_not_at_all() -> None:
    for url in ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/7"):
        assert isinstance(open_storage(url), RedisStorage)  # nothing connects until first use
    assert (
        RedisStorage("redis://127.0.0.1:6379/7").client.connection_pool.connection_kwargs["db"] == 7
    )


def test_a_redis_database_beyond_the_servers_is_storage_unavailable(redis_url: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    beyond = urlunsplit(urlsplit(redis_url)._replace(path="/99999"))
    engine = PolicyEngine(storage=RedisStorage(beyond, key_prefix=prefix()))
    for call in (lambda: engine.set_policy("a", DAILY_100), lambda: engine.authorize(payment(1))):
        with pytest.raises(PolicyError) as err:
            call()
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE  # it was INTERNAL
        assert "no database of the number in the storage URL" in str(err.value)


def test_redis_url_options_redis_py_takes_still_open() -> None:
    from agentpolicy.storage import open_async_storage
    from agentpolicy.storage._redis_protocol import cluster_url

    for query, schemes in (
        ("client_name=x&socket_keepalive=true", ("redis", "rediss")),
        ("health_check_interval=5&protocol=2", ("redis", "rediss")),
        ("ssl_cert_reqs=none&retry_on_timeout=true", ("rediss",)),  # TLS only (redis:// refused)
    ):
        for scheme in schemes:
            for opener in (open_storage, open_async_storage):
                opener(f"{scheme}://127.0.0.1:1/0?{query}")  # nothing connects until used
            cluster_url(f"{scheme}+cluster://127.0.0.1:1?{query}")  # a Cluster connects at once
