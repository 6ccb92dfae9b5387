"""Stores fail with structured errors: bad files, a cluster that is down, bad arguments, modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from agentpolicy import ErrorCode, PolicyEngine, PolicyError
from agentpolicy.storage import SQLiteStorage
from agentpolicy.testing import ManualClock, payment


def code_of(call: Any) -> str:
    with pytest.raises(PolicyError) as err:
        call()
    return str(err.value.code)


def test_a_file_that_is_not_a_database_is_storage_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite database" * 200)
    assert code_of(lambda: SQLiteStorage(path)) == "STORAGE_UNAVAILABLE"


def test_a_storage_that_is_not_one_is_invalid_input_at_once() -> None:
    for bad in (5, object(), b"memory://"):
        assert code_of(lambda bad=bad: PolicyEngine(storage=bad)) == "INVALID_INPUT"


@pytest.mark.parametrize("limit", [None, 0, -1, 10**30, True, "5"])
def test_webhook_deliveries_checks_its_limit(limit: Any) -> None:
    engine = PolicyEngine(clock=ManualClock())
    assert code_of(lambda: engine.webhook_deliveries(None, limit)) == "INVALID_INPUT"


def test_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "private.db"
    old = os.umask(0o022)  # a usual umask: without care the file would be 0644
    try:
        engine = PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock())
        engine.set_policy("agent-1", {})
        engine.authorize(payment())
        for name in ("private.db", "private.db-wal", "private.db-shm"):
            mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        engine.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ClusterDownError("The cluster is down"),
        redis.exceptions.ResponseError("CLUSTERDOWN Hash slot not served"),
        redis.exceptions.ResponseError("LOADING Redis is loading the dataset in memory"),
        redis.exceptions.ConnectionError("Connection refused"),
    ],
)
def test_a_redis_that_cannot_serve_is_storage_unavailable(error: Exception) -> None:
    from agentpolicy.storage.redis import RedisStorage

    storage = RedisStorage("redis://127.0.0.1:1/0")

    def fail() -> None:
        raise error

    code = code_of(lambda: storage.guard(fail))
    assert code == ErrorCode.STORAGE_UNAVAILABLE
    storage.close()


def test_a_script_error_of_ours_is_internal_not_unavailable() -> None:
    from agentpolicy.storage.redis import RedisStorage

    storage = RedisStorage("redis://127.0.0.1:1/0")

    def fail() -> None:
        raise redis.exceptions.ResponseError("ERR user_script:1: attempt to compare nil")

    assert code_of(lambda: storage.guard(fail)) == "INTERNAL"
    storage.close()
