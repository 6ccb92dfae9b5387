"""A Redis that refuses the login or a permission: STORAGE_UNAVAILABLE, and the message is true.

A refused login (``WRONGPASS``, ``NOAUTH``, a password to a server that has
none) or permission (``NOPERM``) means Redis ran nothing of the command: the
message says so, and names the command refused (and its category), never
the password. Before, every store said ``Redis did not answer
(AuthenticationError), so whether this change was recorded is unknown`` (the
sync store even for reads), a Cluster ``cannot reach Redis:
RedisClusterException`` and a ``NOPERM`` was ``INTERNAL``. Only a refusal
that answers an attempt sent again, after one that got no answer and may
have run, still says the outcome is unknown; a command refused inside the
commit script may follow its first writes, and says so.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis._parsers.base import BaseParser

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyError
from agentpolicy.mcp import create_server_with_redis
from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.storage.redis_async import AsyncRedisStorage
from agentpolicy.testing import ManualClock, payment
from tests.redis_servers import RedisServer, unavailable
from tests.test_redis import prefix
from tests.test_redis_faults import _RefusingProxy, _whole_commands

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
NOTHING_CHANGED = "nothing was allowed or changed"
PASSWORD = "Pa55-w0rd-S3cret"
SECRETS = (PASSWORD, "Wr0ng-Pa55w0rd", "Us3r-Pa55")


# -- failure(): what each refusal says --------------------------------------------------------

LOGINS = {
    "WRONGPASS invalid username-password pair or user is disabled.": "WRONGPASS",
    "NOAUTH Authentication required.": "NOAUTH",
    "ERR invalid password": "wrong",
    "ERR AUTH <password> called without any password configured for the default user. "
    "Are you sure your configuration is correct?": "has none",
    "ERR Client sent AUTH, but no password is set": "has none",
    "ERR wrong number of arguments for 'auth' command": "no user name",
}
PERMISSIONS = {
    "NOPERM this user has no permissions to run the 'evalsha' command": "'evalsha'",
    "NOPERM User app has no permissions to run the 'evalsha' command": "'evalsha'",  # 7.2
    "NOPERM this user has no permissions to run the 'hmget' command": "'hmget'",
    "NOPERM this user has no permissions to access one of the keys used as arguments": "keys",
    "NOPERM No permissions to access a key": "keys",  # 7.2
}
IN_SCRIPT = [
    "ERR The user executing the script can't run this command or subcommand script: 23ab, "
    "on @user_script:45.",  # Redis 7.0
    "ERR ACL failure in script: User app has no permissions to run the 'persist' command "
    "script: 23ab, on @user_script:45.",  # Redis 7.2
    "ERR Error running script (call to f_23ab): @user_script:45: @user_script: 45: The user "
    "executing the script can't run this command or subcommand",  # Redis 6
]


def refused(text: str) -> Exception:
    """The exception redis-py raises for the error reply ``text``."""
    exc: Exception = BaseParser.parse_error(text)
    return exc


@pytest.mark.parametrize("reply", list(LOGINS))
def test_a_refused_login_ran_nothing_and_says_why(reply: str) -> None:
    exc = refused(reply)
    for writing in (False, True):
        for cluster in (False, True):
            err = rp.failure(exc, writing=writing and not cluster, cluster=cluster)
            assert err.code == ErrorCode.STORAGE_UNAVAILABLE
            assert "Redis refused the login" in err.message
            assert LOGINS[reply] in err.message
            assert NOTHING_CHANGED in err.message
            assert "unknown" not in err.message
            assert "did not answer" not in err.message


@pytest.mark.parametrize("reply", list(PERMISSIONS))
def test_a_refused_permission_ran_nothing_and_names_the_command(reply: str) -> None:
    for exc in (refused(reply), _in_a_pipeline(refused(reply))):
        for writing in (False, True):
            err = rp.failure(exc, writing=writing)
            assert err.code == ErrorCode.STORAGE_UNAVAILABLE
            assert "NOPERM" in err.message
            assert PERMISSIONS[reply] in err.message
            assert NOTHING_CHANGED in err.message
    message = rp.failure(refused(reply), writing=True).message
    if "'evalsha'" in reply:
        assert "'evalsha' (NOPERM; a command of @scripting)" in message
    assert "User app" not in message


def _in_a_pipeline(exc: Exception) -> Exception:
    """``exc`` as redis-py raises it from a pipeline: its text begins with the command."""
    exc.args = (f"Command # 1 (HMGET k v b) of pipeline caused error: {exc.args[0]}",)
    return exc


@pytest.mark.parametrize("reply", IN_SCRIPT, ids=["7.0", "7.2", "6"])
def test_a_command_refused_inside_the_script_may_follow_its_first_writes(reply: str) -> None:
    """Redis undoes no write of a script that fails: what ran before the refusal stays."""
    err = rp.failure(refused(reply), writing=True)
    assert err.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "inside the commit script" in err.message
    assert "part of this change" in err.message
    assert NOTHING_CHANGED not in err.message
    if "'persist'" in reply:
        assert "'persist' inside the commit script (ACL; a command of @write)" in err.message


@pytest.mark.parametrize("reply", [*LOGINS, *PERMISSIONS])
def test_a_refusal_answering_a_resent_commit_says_the_outcome_is_unknown(reply: str) -> None:
    """An attempt got no answer (it may have run); the refusal answered the next one."""
    exc = refused(reply)
    for err in (rp.failure(exc, writing=True, again=True),
                rp.failure(exc, writing=True, cluster=True)):  # fmt: skip
        assert err.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "Redis refused" in err.message
        assert "unknown" in err.message
        assert NOTHING_CHANGED not in err.message
    read = rp.failure(exc, writing=False, cluster=True, again=True)
    assert NOTHING_CHANGED in read.message


def test_an_attempt_refused_its_login_is_not_an_attempt_without_an_answer() -> None:
    """redis-py retries an ``AuthenticationError`` (a ``ConnectionError``): it ran nothing."""
    handler = rp.noting(lambda error: None)
    rp.first_attempt()
    for _ in range(3):
        handler(refused("WRONGPASS invalid username-password pair or user is disabled."))
    assert not rp.resent()
    handler(redis.exceptions.TimeoutError("Timeout reading from socket"))
    handler(refused("NOAUTH Authentication required."))
    assert rp.resent()  # the timed-out attempt may have run: it stays noted


def test_a_cluster_client_refused_its_login_as_it_is_made() -> None:
    cause = refused("WRONGPASS invalid username-password pair or user is disabled.")
    wrapped = redis.exceptions.RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least one reachable node: "
        "invalid username-password pair or user is disabled."
    )
    wrapped.__cause__ = cause  # as redis-py raises it: ``raise ... from exception``
    for err in (rp.unreachable(wrapped), rp.failure(wrapped, writing=False, cluster=True)):
        assert "Redis refused the login" in err.message
        assert NOTHING_CHANGED in err.message


def test_the_conversion_s_own_calls_count_their_resends_too() -> None:
    """``guard`` (the 0.1 conversion's direct calls): a refusal after a resend is unknown."""
    storage = RedisStorage.__new__(RedisStorage)
    noted = rp.noting(lambda error: None)

    def resent_then_refused() -> None:
        noted(redis.exceptions.TimeoutError("Timeout reading from socket"))
        raise refused("NOAUTH Authentication required.")

    def refused_at_once() -> None:
        raise refused("NOAUTH Authentication required.")

    with pytest.raises(PolicyError) as after_resend:
        storage.guard(resent_then_refused, writing=True)
    assert "unknown" in after_resend.value.message
    noted(redis.exceptions.TimeoutError("an earlier command's, in this thread"))
    with pytest.raises(PolicyError) as at_once:
        storage.guard(refused_at_once, writing=True)
    assert NOTHING_CHANGED in at_once.value.message


# -- a real server with a password and ACL users ------------------------------------------------


@dataclass
class Locked:
    """A Redis only these tests use, with ``requirepass`` and ACL users."""

    server: RedisServer
    admin: redis.Redis

    def url(self, login: str = f":{PASSWORD}@") -> str:
        return f"redis://{login}127.0.0.1:{self.server.port}/0"


USERS = {  # name: ACL rules (each with the password SECRETS[2])
    "app": ["~*", "+@all"],
    "reader": ["~*", "+@read", "-@scripting"],
    "noscript": ["~*", "+@all", "-evalsha", "-script"],
    "otherkeys": ["~other:*", "+@all"],
    "nopersist": ["~*", "+@all", "-persist"],
}


def _own_server(folder: Path) -> RedisServer:
    if shutil.which("redis-server") is None:
        unavailable("these tests start their own redis-server (none on PATH)")
    server = RedisServer(folder)
    server.start()
    return server


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    server = _own_server(tmp_path_factory.mktemp("locked"))
    admin = redis.Redis(port=server.port, password=PASSWORD)
    setup = redis.Redis(port=server.port)
    for name, rules in USERS.items():
        setup.acl_setuser(name, enabled=True, passwords=[f"+{SECRETS[2]}"], reset_keys=True,
                          keys=[r.removeprefix("~") for r in rules if r.startswith("~")],
                          commands=[r for r in rules if not r.startswith("~")])  # fmt: skip
    setup.config_set("requirepass", PASSWORD)  # our own server: its default user's password
    setup.close()
    yield Locked(server, admin)
    admin.close()
    server.stop()


def snapshot(client: Any, keys: str) -> dict[str, bytes]:
    return {k: client.dump(k) for k in client.scan_iter(match=keys + "*")}


def reserved(budget: Any) -> int:
    return int(next(iter(budget.periods.values())).reserved.value)


def seeded(locked: Locked) -> str:
    """A fresh key prefix holding agent-1's policy and one reservation of 1 USDT."""
    keys = prefix()
    engine = PolicyEngine(storage=RedisStorage(locked.url(), key_prefix=keys), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    assert engine.authorize(payment(USDT)).allowed
    engine.close()
    return keys


SYNC_OPS: dict[str, Callable[[PolicyEngine], object]] = {
    "budget": lambda e: e.budget("agent-1", "daily"),
    "get_policy": lambda e: e.get_policy("agent-1"),
    "authorize": lambda e: e.authorize(payment(USDT)),
    "set_policy": lambda e: e.set_policy("agent-1", {"limits": {"daily": {"value": "7"}}}),
}
ALL = tuple(SYNC_OPS)


async def _async_op(engine: AsyncPolicyEngine, op: str) -> object:
    if op == "budget":
        return await engine.budget("agent-1", "daily")
    if op == "get_policy":
        return await engine.get_policy("agent-1")
    if op == "authorize":
        return await engine.authorize(payment(USDT))
    return await engine.set_policy("agent-1", {"limits": {"daily": {"value": "7"}}})


def sync_errors(url: str, keys: str) -> dict[str, PolicyError]:
    """The error of each operation that fails, each through a new store on ``url``."""
    out = {}
    for op, call in SYNC_OPS.items():
        engine = PolicyEngine(storage=RedisStorage(url, key_prefix=keys), clock=ManualClock())
        try:
            call(engine)
        except PolicyError as err:
            out[op] = err
        finally:
            engine.close()
    return out


def async_errors(url: str, keys: str, sync_url: str | None = None) -> dict[str, PolicyError]:
    async def main() -> dict[str, PolicyError]:
        out = {}
        for op in SYNC_OPS:
            engine = AsyncPolicyEngine(
                RedisStorage(sync_url or url, key_prefix=keys), ManualClock(),
                async_storage=AsyncRedisStorage(url, key_prefix=keys),
            )  # fmt: skip
            try:
                await _async_op(engine, op)
            except PolicyError as err:
                out[op] = err
            finally:
                await engine.close()
        return out

    return asyncio.run(main())


def assert_true_refusal(
    errors: dict[str, PolicyError], *words: str, ops: tuple[str, ...] = ()
) -> None:
    """Each operation of ``ops`` failed, and each error is a true refusal saying ``words``."""
    assert set(ops) <= set(errors), errors
    for op, error in errors.items():
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE, op
        assert NOTHING_CHANGED in error.message, (op, error.message)
        assert "unknown" not in error.message, (op, error.message)
        for word in words:
            assert word in error.message, (op, error.message)
        assert not any(secret in error.message for secret in SECRETS), error.message


LOGINS_REAL = {
    "wrong password": (":Wr0ng-Pa55w0rd@", "WRONGPASS"),
    "no password": ("", "NOAUTH"),
    "unknown user": ("nobody:Wr0ng-Pa55w0rd@", "WRONGPASS"),
    "user, wrong password": ("app:Wr0ng-Pa55w0rd@", "WRONGPASS"),
}


@pytest.mark.parametrize("login", list(LOGINS_REAL))
def test_a_wrong_login_refuses_reads_and_writes_truly_then_the_right_one_works(
    locked: Locked, login: str
) -> None:
    keys = seeded(locked)
    before = snapshot(locked.admin, keys)
    creds, code = LOGINS_REAL[login]
    url = locked.url(creds)
    assert_true_refusal(sync_errors(url, keys), "Redis refused the login", code, ops=ALL)
    assert_true_refusal(async_errors(url, keys), "Redis refused the login", code, ops=ALL)
    assert snapshot(locked.admin, keys) == before  # and it is true
    engine = PolicyEngine(storage=RedisStorage(locked.url(), key_prefix=keys), clock=ManualClock())
    assert engine.authorize(payment(USDT)).allowed  # a new store with the right password
    assert reserved(engine.budget("agent-1", "daily")) == 2 * USDT
    engine.close()


@pytest.mark.parametrize("user", ["reader", "noscript"])
def test_a_user_without_scripting_reads_and_is_refused_each_change(
    locked: Locked, user: str
) -> None:
    keys = seeded(locked)
    before = snapshot(locked.admin, keys)
    url = locked.url(f"{user}:{SECRETS[2]}@")
    engine = PolicyEngine(storage=RedisStorage(url, key_prefix=keys), clock=ManualClock())
    assert engine.get_policy("agent-1") is not None  # reads are allowed
    engine.close()
    words = ("Redis refused the store's user the permission to run 'evalsha'", "NOPERM",
             "of @scripting")  # fmt: skip
    writes = ("authorize", "set_policy")
    assert_true_refusal(sync_errors(url, keys), *words, ops=writes)
    assert_true_refusal(async_errors(url, keys), *words, ops=writes)
    assert snapshot(locked.admin, keys) == before


def test_a_user_whose_keys_miss_the_prefix_is_refused_every_read(locked: Locked) -> None:
    keys = seeded(locked)
    before = snapshot(locked.admin, keys)
    url = locked.url(f"otherkeys:{SECRETS[2]}@")
    words = ("Redis refused the store's user access to its keys", "NOPERM")
    assert_true_refusal(sync_errors(url, keys), *words, ops=ALL)
    assert_true_refusal(async_errors(url, keys), *words, ops=ALL)
    assert snapshot(locked.admin, keys) == before


def test_a_command_refused_inside_the_script_says_what_changed(locked: Locked) -> None:
    """PERSIST is refused: from Redis 7.0 the script checks it first and writes nothing.

    On Redis 6 the script sets the policy's hash before PERSIST is refused, and that write
    stays; the message says part of the change may have been written. More cases:
    tests/test_redis_acl_atomic.py.
    """
    keys = seeded(locked)
    before = snapshot(locked.admin, keys)
    url = locked.url(f"nopersist:{SECRETS[2]}@")
    engine = PolicyEngine(storage=RedisStorage(url, key_prefix=keys), clock=ManualClock())
    with pytest.raises(PolicyError) as err:
        engine.set_policy("agent-1", {"limits": {"daily": {"value": "7"}}})
    engine.close()
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "inside the commit script" in err.value.message
    major = int(locked.admin.info("server")["redis_version"].split(".")[0])
    if major >= 7:
        assert NOTHING_CHANGED in err.value.message
        assert "'persist'" in err.value.message
        assert snapshot(locked.admin, keys) == before
    else:
        assert NOTHING_CHANGED not in err.value.message
        assert "part of this change" in err.value.message
        assert snapshot(locked.admin, keys) != before  # it would have been untrue


def test_a_permission_taken_while_running_then_given_back(locked: Locked) -> None:
    """The same engines, sync and async: refused (nothing changed), then working again."""
    keys = seeded(locked)
    url = locked.url(f"app:{SECRETS[2]}@")
    engine = PolicyEngine(storage=RedisStorage(url, key_prefix=keys), clock=ManualClock())
    assert engine.authorize(payment(USDT)).allowed  # connected, script loaded

    async def warm() -> AsyncPolicyEngine:
        aengine = AsyncPolicyEngine(RedisStorage(url, key_prefix=keys), ManualClock(),
                                    async_storage=AsyncRedisStorage(url, key_prefix=keys))  # fmt: skip
        assert (await aengine.authorize(payment(USDT))).allowed
        return aengine

    loop = asyncio.new_event_loop()
    try:
        aengine = loop.run_until_complete(warm())
        before = snapshot(locked.admin, keys)
        locked.admin.acl_setuser("app", enabled=True, commands=["-evalsha"])
        try:
            with pytest.raises(PolicyError) as sync_err:
                engine.authorize(payment(USDT))
            with pytest.raises(PolicyError) as async_err:
                loop.run_until_complete(aengine.authorize(payment(USDT)))
            after = snapshot(locked.admin, keys)
        finally:
            locked.admin.acl_setuser("app", enabled=True, commands=["+evalsha"])
        assert_true_refusal({"sync": sync_err.value, "async": async_err.value},
                            "'evalsha'", "NOPERM")  # fmt: skip
        assert after == before
        assert engine.authorize(payment(USDT)).allowed  # no restart needed
        assert loop.run_until_complete(aengine.authorize(payment(USDT))).allowed
        assert reserved(engine.budget("agent-1", "daily")) == 5 * USDT
        loop.run_until_complete(aengine.close())
    finally:
        loop.close()
        engine.close()


def test_a_password_changed_while_running_refuses_every_attempt_truly(locked: Locked) -> None:
    """Each of redis-py's retries is refused its login: none ran, so nothing changed."""
    keys = seeded(locked)
    url = locked.url(f"app:{SECRETS[2]}@")
    engine = PolicyEngine(storage=RedisStorage(url, key_prefix=keys), clock=ManualClock())
    assert engine.authorize(payment(USDT)).allowed
    before = snapshot(locked.admin, keys)
    locked.admin.acl_setuser("app", enabled=True, passwords=[f"-{SECRETS[2]}", "+N3w-Pa55"])
    locked.admin.client_kill_filter(user="app")  # its open connections log in again
    try:
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment(USDT))
        after = snapshot(locked.admin, keys)
        renewed = PolicyEngine(
            storage=RedisStorage(locked.url("app:N3w-Pa55@"), key_prefix=keys), clock=ManualClock()
        )
        assert renewed.authorize(payment(USDT)).allowed  # a new store with the new password
        assert reserved(renewed.budget("agent-1", "daily")) == 3 * USDT
        renewed.close()
    finally:
        locked.admin.acl_setuser("app", enabled=True, passwords=["-N3w-Pa55", f"+{SECRETS[2]}"])
        engine.close()
    assert_true_refusal({"authorize": err.value}, "Redis refused the login", "WRONGPASS")
    assert after == before


# -- a resend refused its login after an attempt that ran ------------------------------------

NOAUTH = b"-NOAUTH Authentication required.\r\n"


class _NoAuthProxy(_RefusingProxy):
    """After :meth:`refuse`, new links are answered ``NOAUTH`` (a server restarted with a password)."""

    def _refuse(self, client: socket.socket) -> None:
        pending = b""
        client.settimeout(0.05)
        try:
            while not self.stopping:
                try:
                    data = client.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                pending += data
                commands, pending = _whole_commands(pending)
                self.refused += commands
                client.sendall(NOAUTH * commands)
        except OSError:
            pass
        finally:
            client.close()


def test_a_login_refused_to_a_resend_after_an_attempt_that_ran_is_unknown(
    locked: Locked,
) -> None:
    keys = seeded(locked)
    proxy = _NoAuthProxy(locked.url())
    try:
        quick = timedelta(milliseconds=300)
        url = proxy.url.replace("redis://", f"redis://:{PASSWORD}@")
        engine = PolicyEngine(
            storage=RedisStorage(url, key_prefix=keys, timeout=quick), clock=ManualClock()
        )
        assert engine.authorize(payment(USDT)).allowed  # the script is loaded, the link warm
        proxy.refuse()
        with pytest.raises(PolicyError) as caught:
            engine.authorize(payment(10 * USDT))
        assert proxy.refused >= 1  # the client did try again, and was refused
    finally:
        proxy.close()
    message = caught.value.message
    assert caught.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "Redis refused the login" in message
    assert "unknown" in message
    assert NOTHING_CHANGED not in message
    assert PASSWORD not in message
    direct = PolicyEngine(storage=RedisStorage(locked.url(), key_prefix=keys), clock=ManualClock())
    assert reserved(direct.budget("agent-1", "daily")) == 12 * USDT  # the first attempt ran
    direct.close()


# -- the MCP server and the command line ----------------------------------------------------


def test_the_mcp_server_and_the_cli_say_the_same(locked: Locked, tmp_path: Path) -> None:
    keys = seeded(locked)
    url = locked.url(f":{SECRETS[1]}@")
    server = create_server_with_redis(url, key_prefix=keys, role="admin")
    result = asyncio.run(server.handle_tool_call("agent_policy_budget", {"agentId": "agent-1"}))
    assert result["success"] is False
    assert result["error"]["code"] == "STORAGE_UNAVAILABLE"
    assert "Redis refused the login" in result["error"]["message"]
    assert NOTHING_CHANGED in result["error"]["message"]
    assert SECRETS[1] not in str(result)
    exe = str(Path(sys.executable).with_name("agentpolicy"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AGENT_POLICY_KEY_PREFIX": keys}
    done = subprocess.run([exe, "--redis-url", url, "budget", "agent-1"], capture_output=True,
                          text=True, timeout=60, env=env, check=False)  # fmt: skip
    shown = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Redis refused the login" in shown
    assert NOTHING_CHANGED in shown
    assert "Traceback" not in shown
    assert SECRETS[1] not in shown


# -- a Redis Cluster with a password ------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A three-master Cluster whose nodes take ``PASSWORD`` (set once it is made): a port."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli are needed for the cluster tests")
    root = tmp_path_factory.mktemp("locked-cluster")
    nodes = [
        RedisServer(root / f"n{i}", "--cluster-enabled", "yes",
                    "--cluster-config-file", str(root / f"n{i}" / "nodes.conf"))
        for i in range(3)
    ]  # fmt: skip
    try:
        for node in nodes:
            node.start()
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
        for node in nodes:
            with redis.Redis(port=node.port) as each:
                each.config_set("requirepass", PASSWORD)
        yield nodes[0].port
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.parametrize("login", ["wrong password", "no password"])
def test_a_cluster_refuses_a_wrong_login_truly(locked_cluster: int, login: str) -> None:
    creds, code = LOGINS_REAL[login]
    good = f"redis+cluster://:{PASSWORD}@127.0.0.1:{locked_cluster}"
    url = f"redis+cluster://{creds}127.0.0.1:{locked_cluster}"
    keys = prefix()
    engine = PolicyEngine(storage=RedisStorage(good, key_prefix=keys), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    assert engine.authorize(payment(USDT)).allowed
    with pytest.raises(PolicyError) as at_open:  # the sync client logs in as it is made
        RedisStorage(url, key_prefix=keys)
    assert_true_refusal({"open": at_open.value}, "Redis refused the login", code)
    assert_true_refusal(
        async_errors(url, keys, sync_url=good), "Redis refused the login", code, ops=ALL
    )
    assert engine.authorize(payment(USDT)).allowed
    assert reserved(engine.budget("agent-1", "daily")) == 2 * USDT  # nothing else was recorded
    engine.close()
