"""Settings from the environment, and the SQLite storage's refusals."""

from __future__ import annotations

import _thread
import os
import sqlite3
import stat
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agentpolicy import ErrorCode, PolicyEngine, PolicyError, PolicyValidationError
from agentpolicy.config import (
    build_engine,
    default_db_path,
    open_configured_storage,
    parse_bool,
    parse_duration,
    read_settings,
)
from agentpolicy.storage import MemoryStorage, SQLiteStorage
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
     ("1500ms", timedelta(milliseconds=1500)), ("5d", timedelta(days=5)),
     (" 90s ", timedelta(seconds=90))],
)  # fmt: skip
def test_durations(raw: str, value: timedelta) -> None:
    assert parse_duration(raw, "X") == value


@pytest.mark.parametrize("raw", ["0", "0s", "-5", "5w", "soon", "1.5m", "", "9" * 16 + "d"])
def test_bad_durations_and_booleans(raw: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        parse_duration(raw, "X")
    assert err.value.problems[0].path == "$X"
    if raw not in ("0", ""):
        with pytest.raises(PolicyValidationError):
            parse_bool(raw, "X")


def test_a_huge_duration_setting_is_not_echoed_whole() -> None:
    """AGENT_POLICY_RESERVATION_TTL of 100,000 digits gave an error line of 100 KB."""
    with pytest.raises(PolicyValidationError) as err:
        read_settings({"AGENT_POLICY_RESERVATION_TTL": "9" * 100_000})
    assert len(str(err.value)) < 300
    assert "(100002 characters)" in str(err.value)


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


def test_the_state_dir_follows_xdg_and_is_created_0700(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"  # not there yet
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    assert default_db_path() == state / "agentpolicy" / "agentpolicy.db"
    settings = read_settings({})
    url = settings.storage_url(fallback_to_file=True)
    assert url == f"sqlite:///{state / 'agentpolicy' / 'agentpolicy.db'}"
    assert not state.exists()  # naming the URL creates nothing
    open_configured_storage(settings).close()
    for folder in (state, state / "agentpolicy"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (state / "agentpolicy" / "agentpolicy.db").is_file()


@pytest.mark.parametrize("relative", ["state", "./state", "~/state"])
def test_a_relative_xdg_state_home_is_ignored(
    relative: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was used as it was: the store moved with the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", relative)
    monkeypatch.chdir(tmp_path)
    expected = tmp_path / "home" / ".local" / "state" / "agentpolicy" / "agentpolicy.db"
    assert default_db_path() == expected


def test_the_db_folder_is_created_0700_and_existing_folders_are_left_alone(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)
    db = tmp_path / "a" / "b" / "policies.db"
    engine = build_engine(read_settings({"AGENT_POLICY_DB": str(db)}))
    engine.set_policy("agent-1", {})
    engine.close()
    assert db.is_file()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_a_folder_that_cannot_be_created_is_storage_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(PolicyError) as err:
        build_engine(read_settings({"AGENT_POLICY_DB": str(tmp_path / "file" / "sub" / "x.db")}))
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "cannot create the folder" in err.value.message


@pytest.mark.parametrize(
    "url", ["redis://h:1/0", "rediss://h:1/0", "redis+cluster://h:1", "rediss+cluster://h:1"]
)
def test_every_documented_redis_url_is_accepted(url: str) -> None:
    assert read_settings({"AGENT_POLICY_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["http://h", "redis:/h", "sqlite:///x.db", "cluster://h"])
def test_other_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        read_settings({"AGENT_POLICY_REDIS_URL": url})
    assert err.value.problems[0].path == "$AGENT_POLICY_REDIS_URL"
    assert "redis+cluster://" in err.value.problems[0].message


def test_build_engine_reads_ttl_prefix_and_webhooks(tmp_path: Path) -> None:
    settings = read_settings({
        "AGENT_POLICY_DB": str(tmp_path / "e.db"),
        "AGENT_POLICY_RESERVATION_TTL": "90s",
        "AGENT_POLICY_WEBHOOK_URL": "http://127.0.0.1:9/h",
        "AGENT_POLICY_WEBHOOK_SECRET": "s",
        "AGENT_POLICY_WEBHOOK_TIMEOUT": "2s",
    })  # fmt: skip
    (endpoint,) = settings.webhook_endpoints
    assert endpoint.timeout == timedelta(seconds=2)
    engine = build_engine(settings, clock=ManualClock())
    try:
        assert engine.reservation_ttl == timedelta(seconds=90)
        assert engine.webhooks is not None
        assert list(engine.webhooks.endpoints) == [endpoint.id]
        engine.set_policy("agent-1", {})
        d = engine.authorize(payment())
        assert d.expires_at == ManualClock().now + timedelta(seconds=90)
    finally:
        engine.close()
    memory = build_engine(read_settings({}), fallback_to_file=False)
    assert isinstance(memory.storage, MemoryStorage)
    memory.close()


def test_the_storage_url_is_shown_without_its_password() -> None:
    settings = read_settings({"AGENT_POLICY_REDIS_URL": "redis://default:hunter2@r.example:6379/0"})
    assert (
        settings.shown_storage_url(fallback_to_file=True) == "redis://default:***@r.example:6379/0"
    )


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(PolicyValidationError) as err:
        read_settings({"AGENT_POLICY_ROLE": "root", "AGENT_POLICY_DEMO_MODE": "maybe",
                       "AGENT_POLICY_RESERVATION_TTL": "x", "AGENT_POLICY_AGENT_ID": " a",
                       "AGENT_POLICY_WEBHOOK_URL": "http://h"})  # fmt: skip
    assert {p.path for p in err.value.problems} == {
        "$AGENT_POLICY_ROLE", "$AGENT_POLICY_DEMO_MODE", "$AGENT_POLICY_RESERVATION_TTL",
        "$AGENT_POLICY_AGENT_ID", "$AGENT_POLICY_WEBHOOK_SECRET",
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


def test_a_file_name_the_system_refuses_is_storage_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(tmp_path / ("x" * 5000 + ".db"))  # ENAMETOOLONG
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "File name too long" in str(err.value)
    assert len(str(err.value)) < 400  # the name is cut short in the message


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


def test_a_held_lock_fails_the_call_after_one_busy_timeout_not_one_per_retry(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busy.db"
    storage = SQLiteStorage(path, busy_timeout=timedelta(milliseconds=400), busy_retries=8)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {})
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        started = time.monotonic()
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment())
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "held its lock past 0.4 s" in str(err.value)
    assert "nothing was allowed or changed" in str(err.value)
    # each of the 9 attempts waited the whole busy timeout before: at least 3.6 s; one
    # timeout (0.4 s) and the retries' bookkeeping stay well under 3 s on a busy host
    assert waited < 3.0
    assert [r.event for r in engine.history("agent-1")] == ["policy_set"]
    # the connection's own busy timeout is as it was after the retries
    conn = storage._connection()
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 400
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


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_a_thread_that_ended_leaves_no_connection_open(tmp_path: Path) -> None:
    """A program that runs each call on a new thread held a connection per thread it ever ran."""
    storage = SQLiteStorage(tmp_path / "t.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {})
    engine.authorize(payment())
    before = _open_fds()
    for _ in range(200):
        worker = threading.Thread(target=lambda: engine.authorize(payment()))
        worker.start()
        worker.join()
    assert len(storage._all) <= 2  # this thread's, and the last worker's until the next opens
    assert _open_fds() - before <= 8  # the last one's, the checkpointer's; was 2 per thread
    busy, held = threading.Event(), []

    def stays() -> None:
        engine.authorize(payment())
        held.append(storage._local.conn)
        busy.wait(30)

    alive = threading.Thread(target=stays)
    alive.start()
    for _ in range(20):
        worker = threading.Thread(target=lambda: engine.authorize(payment()))
        worker.start()
        worker.join()
    assert held[0] in [conn for _, _, conn in storage._all]  # a living thread's stays open
    assert held[0].execute("SELECT 1").fetchone() == (1,)
    busy.set()
    alive.join()
    # threads not started by threading (``_thread``, a C library's) end the same way
    for _ in range(50):
        done = _thread.allocate_lock()
        done.acquire()
        _thread.start_new_thread(
            lambda lock: (engine.authorize(payment()), lock.release()), (done,)
        )
        done.acquire()
        time.sleep(0.01)  # the thread's own end, after it released the lock
    assert len(storage._all) <= 3
    assert len(engine.history("agent-1", limit=1000)) == 273
    engine.close()
    assert storage._all == []


@pytest.fixture
def looking(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQLite storage checks its file before every transaction (not at most every 0.5 s)."""
    from agentpolicy.storage import sqlite

    monkeypatch.setattr(sqlite, "LOOK_SECONDS", 0.0)


@pytest.mark.parametrize("how", ["replaced", "recreated", "wal removed", "linked, wal removed"])
def test_a_file_replaced_while_open_is_storage_unavailable_not_a_second_budget(
    tmp_path: Path, looking: None, how: str
) -> None:
    """A storage working on a file nobody else sees any more spent a limit a second time."""
    import shutil

    path = tmp_path / "r.db"
    opened = path
    if how.startswith("linked"):  # SQLite keeps the -wal beside the file, not the link
        opened = tmp_path / "link.db"
        opened.symlink_to(path)
        SQLiteStorage(path).close()
    engine = PolicyEngine(storage=SQLiteStorage(opened), clock=ManualClock())
    engine.set_policy("a1", {"limits": {"daily": {"value": "100"}}})
    backup = tmp_path / "backup.db"
    with sqlite3.connect(path) as source, sqlite3.connect(backup) as target:
        source.backup(target)  # before any payment
    engine.confirm(engine.authorize(payment(100, agent_id="a1")).reservation_id or "")
    if how == "replaced":
        os.replace(backup, path)
    elif how == "recreated":
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink()
        shutil.copy(backup, path)
    else:
        for name in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink()
    with pytest.raises(PolicyError) as refused:
        engine.authorize(payment(100, agent_id="a1"))
    assert refused.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "replaced or removed while this storage had it open" in refused.value.message
    with pytest.raises(PolicyError):  # and every call after, not only the first
        engine.budget("a1")
    engine.close()


def test_a_file_left_in_place_is_looked_at_without_a_false_alarm(
    tmp_path: Path, looking: None
) -> None:
    storage = SQLiteStorage(tmp_path / "k.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("a1", {})
    other = PolicyEngine(storage=SQLiteStorage(tmp_path / "k.db"), clock=ManualClock())
    for _ in range(300):  # checkpoints truncate the -wal: the same file
        engine.confirm(engine.authorize(payment(1, agent_id="a1")).reservation_id or "")
        other.authorize(payment(1, agent_id="a1"))
    storage._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert engine.authorize(payment(1, agent_id="a1")).allowed
    other.close()
    assert engine.authorize(payment(1, agent_id="a1")).allowed  # another process closing too
    engine.close()


def _names(storage: SQLiteStorage) -> list[str]:
    with storage.session("", write=False) as session:
        return [row[0] for row in session.conn.execute("SELECT name FROM docs ORDER BY name")]


def _write(session: object, name: str) -> None:
    session.conn.execute(  # type: ignore[attr-defined]
        "INSERT INTO docs (name, version, body) VALUES (?, 1, '{}')", (name,)
    )


def test_a_sqlite_session_commits_on_leaving_and_rolls_back_on_any_error(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "s.db")
    with storage.session("s", write=True) as session:
        _write(session, "d/kept")

    def failing(error: BaseException | None) -> None:
        with storage.session("s", write=True) as session:
            _write(session, "d/gone")
            if error is None:
                session.conn.execute("SELECT * FROM no_such_table")
            else:
                raise error

    # a SQLite error inside is raised as STORAGE_UNAVAILABLE, and nothing of it is kept
    with pytest.raises(PolicyError) as caught:
        failing(None)
    assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "failed" in str(caught.value)
    # any other error goes on as it is, and nothing of it is kept either
    with pytest.raises(KeyError):
        failing(KeyError("the step's own error"))
    assert _names(storage) == ["d/kept"]
    # a session that leaves cleanly leaves no transaction open: the next one begins at once
    with storage.session("s", write=True) as session:
        assert session.conn.in_transaction
    assert not session.conn.in_transaction
    storage.close()


def test_a_file_damaged_while_it_is_open_is_storage_unavailable(tmp_path: Path) -> None:
    # overwritten or truncated under a running engine, its BEGIN raised sqlite3.DatabaseError
    # ("file is not a database") from authorize, set_policy and confirm: INTERNAL in a service

    path = tmp_path / "damaged.db"
    engine = PolicyEngine(storage=SQLiteStorage(str(path)), clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "100000000"}}})
    d = engine.authorize(payment(1_000_000))
    assert d.reservation_id is not None
    for _ in range(50):  # pages enough that a cut file misses some
        engine.authorize(payment(1))
    with sqlite3.connect(path) as other:  # everything into the file itself, the WAL emptied
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as damaged:  # its header overwritten
        damaged.write(b"x" * 100)
    calls = [lambda: engine.authorize(payment(1_000_000)),
             lambda: engine.set_policy("agent-1", {}),
             lambda: engine.confirm(d.reservation_id or "")]  # fmt: skip
    for call in calls:
        with pytest.raises(PolicyError) as err:
            call()
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert str(path) in err.value.message
    engine.close()


def test_a_relative_path_stays_the_same_file_after_the_directory_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, looking: None
) -> None:
    """A new thread's connection opened the name in the new working directory: another file."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    storage = SQLiteStorage("rel.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("a1", {"limits": {"daily": {"value": "100"}}})
    engine.authorize(payment(100, agent_id="a1"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    found: list[object] = []
    worker = threading.Thread(
        target=lambda: found.append(engine.authorize(payment(1, agent_id="a1")))
    )
    worker.start()
    worker.join()
    assert [getattr(d, "code", d) for d in found] == ["DAILY_LIMIT"]  # the same budget, spent
    assert not (tmp_path / "elsewhere" / "rel.db").exists()
    assert storage.path == "rel.db"  # shown as given
    engine.close()


def test_a_storage_used_after_close_is_no_false_alarm(tmp_path: Path, looking: None) -> None:
    storage = SQLiteStorage(tmp_path / "c.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("a1", {})
    storage.close()  # the last connection: SQLite removes the -wal, and makes a new one on use
    assert engine.authorize(payment(1, agent_id="a1")).allowed
    engine.close()


def _child_pays(
    engine: PolicyEngine, storage: SQLiteStorage, parent_conn: object, out: Any
) -> None:
    d = engine.authorize(payment(1, agent_id="a1"))
    mine = storage._local.conn
    out.put((d.allowed, mine is not parent_conn, len(storage._all)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    """The thread that forked went on in the child with its parent's connection."""
    import multiprocessing

    storage = SQLiteStorage(tmp_path / "f.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("a1", {"limits": {"daily": {"value": "3"}}})
    engine.authorize(payment(1, agent_id="a1"))
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_child_pays, args=(engine, storage, storage._local.conn, out))
    child.start()
    allowed, own, connections = out.get(timeout=30)
    child.join(30)
    assert (allowed, own, connections, child.exitcode) == (True, True, 1, 0)
    assert engine.authorize(payment(1, agent_id="a1")).allowed  # the parent goes on
    assert engine.authorize(payment(1, agent_id="a1")).code == "DAILY_LIMIT"  # 3 in all
    engine.close()
