"""Settings from the environment, and the SQLite storage's refusals."""

from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from agentpolicy import ErrorCode, PolicyEngine, PolicyError, PolicyValidationError
from agentpolicy.config import default_db_path, parse_bool, parse_duration, read_settings
from agentpolicy.storage import SQLiteStorage
from agentpolicy.storage.sqlite import SCHEMA_VERSION
from agentpolicy.testing import ManualClock, payment


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("TRUE", True), ("yes", True),
                                            ("on", True), ("0", False), ("false", False),
                                            ("", False), ("Off", False)])  # fmt: skip
def test_booleans(raw: str, value: bool) -> None:
    assert parse_bool(raw, "X") is value


@pytest.mark.parametrize(
    ("raw", "value"),
    [("300", timedelta(seconds=300)), ("300s", timedelta(seconds=300)),
     ("5m", timedelta(minutes=5)), ("1h", timedelta(hours=1)),
     ("1500ms", timedelta(milliseconds=1500))],
)  # fmt: skip
def test_durations(raw: str, value: timedelta) -> None:
    assert parse_duration(raw, "X") == value


@pytest.mark.parametrize("raw", ["0", "-5", "5d", "soon", "1.5m", ""])
def test_bad_durations_and_booleans(raw: str) -> None:
    with pytest.raises(PolicyValidationError):
        parse_duration(raw, "X")
    if raw not in ("0", ""):
        with pytest.raises(PolicyValidationError):
            parse_bool(raw, "X")


def test_redis_wins_over_the_db_and_the_state_dir_is_the_fallback(tmp_path: Path) -> None:
    both = read_settings({"AGENT_POLICY_REDIS_URL": "redis://h:1/0", "AGENT_POLICY_DB": "x.db"})
    assert both.storage_url(fallback_to_file=True) == "redis://h:1/0"
    db_only = read_settings({"AGENT_POLICY_DB": str(tmp_path / "p.db")})
    assert db_only.storage_url(fallback_to_file=False) == f"sqlite:///{tmp_path / 'p.db'}"
    nothing = read_settings({})
    assert nothing.storage_url(fallback_to_file=False) is None
    assert (nothing.role, nothing.demo_mode, nothing.key_prefix) == (
        "agent",
        False,
        "agent-policy:",
    )


def test_the_state_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "agentpolicy" / "agentpolicy.db"
    url = read_settings({}).storage_url(fallback_to_file=True)
    assert url == f"sqlite:///{tmp_path / 'agentpolicy' / 'agentpolicy.db'}"
    assert (tmp_path / "agentpolicy").is_dir()


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(PolicyValidationError) as err:
        read_settings({"AGENT_POLICY_ROLE": "root", "AGENT_POLICY_DEMO_MODE": "maybe",
                       "AGENT_POLICY_RESERVATION_TTL": "x", "AGENT_POLICY_AGENT_ID": " a"})  # fmt: skip
    assert {p.path for p in err.value.problems} == {
        "$AGENT_POLICY_ROLE", "$AGENT_POLICY_DEMO_MODE", "$AGENT_POLICY_RESERVATION_TTL",
        "$AGENT_POLICY_AGENT_ID",
    }  # fmt: skip


def test_a_file_from_a_newer_agentpolicy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SQLiteStorage(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(path)
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "upgrade agentpolicy" in err.value.message


def test_an_unopenable_file_is_storage_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(tmp_path / "missing-dir" / "x.db")
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE


def test_a_lock_held_too_long_is_storage_unavailable_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    storage = SQLiteStorage(path, busy_timeout=timedelta(milliseconds=20), busy_retries=1)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {})
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment())
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert engine.history("agent-1")[0].event == "policy_set"
    assert engine.authorize(payment()).allowed
    engine.close()


def test_connections_are_per_thread_and_all_closed(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "t.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {})
    worker = threading.Thread(target=lambda: engine.authorize(payment()))
    worker.start()
    worker.join()
    assert len(storage._all) == 2
    engine.close()
    assert storage._all == []
