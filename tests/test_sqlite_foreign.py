"""A SQLite file of another program is refused, and left byte for byte as it was.

``SQLiteStorage``, ``sqlite:///`` URLs and ``agentpolicy --db`` created
agentpolicy's tables inside any SQLite file they were pointed at, even for a
command that only reads. A file holding tables, none of them agentpolicy's
schema (now or 0.1's), is now ``STORAGE_UNAVAILABLE`` on open, as a file
that is not a database is. A new file, an empty one, a file of agentpolicy
(whole, or cut short by a first open killed midway, or with tables someone
added) and a file of 0.1 (converted) go on working.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agentpolicy import ErrorCode, PolicyEngine, PolicyError
from agentpolicy.storage import SQLiteStorage, open_storage
from agentpolicy.storage.sqlite import _SCHEMA, SCHEMA_VERSION
from agentpolicy.testing import ManualClock, payment

FIXTURES = Path(__file__).parent / "fixtures"
EXE = str(Path(sys.executable).with_name("agentpolicy"))
DAILY = {"limits": {"daily": {"value": "1000000"}}}


@contextlib.contextmanager
def connected(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def make(path: Path, *statements: str) -> None:
    with connected(path) as conn:
        for statement in statements:
            conn.execute(statement)


APP = (
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    "CREATE INDEX users_by_name ON users (name)",
    "CREATE TRIGGER users_upper AFTER INSERT ON users BEGIN SELECT 1; END",
    "INSERT INTO users (name) VALUES ('ann'), ('bob')",
)

FOREIGN: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (statements making the file, what the refusal names)
    "an app's tables": (APP, "'users'"),
    "an app's tables in WAL mode": (("PRAGMA journal_mode = WAL", *APP), "'users'"),
    "tables named as agentpolicy's, other columns": (
        ("CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT)",
         "CREATE TABLE logs (line TEXT)", "INSERT INTO docs (title) VALUES ('x')"),
        "'docs' (other columns), 'logs' (other columns)",
    ),
    "a table named as one of 0.1's, other columns": (
        ("CREATE TABLE history (id INTEGER PRIMARY KEY, event TEXT)",),
        "'history' (other columns)",
    ),
    "its own schema_version beside its tables": (
        ("CREATE TABLE schema_version (version INTEGER NOT NULL)",
         "INSERT INTO schema_version VALUES (7)", *APP),
        "'users'",
    ),
    "one table of 0.1's shape beside an app's": (
        ("CREATE TABLE current_policies (agent_id TEXT PRIMARY KEY, version INTEGER)", *APP),
        "'users'",
    ),
    "only a view": (("CREATE VIEW answer AS SELECT 42 AS n",), "view 'answer'"),
    "a virtual table named docs": (
        ("CREATE VIRTUAL TABLE docs USING fts5(name, version, body, expires)",),
        "'docs' (other columns), 'docs_data'",  # and fts5's other tables
    ),
}  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    """Every file of the folder (the database, and any -wal, -shm or -journal) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def foreign(tmp_path: Path, kind: str) -> tuple[Path, str]:
    statements, named = FOREIGN[kind]
    if "fts5" in kind + " ".join(statements):
        with connected(Path(":memory:")) as probe:
            try:
                probe.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
            except sqlite3.OperationalError:
                pytest.skip("this SQLite has no fts5")
    folder = tmp_path / "app"
    folder.mkdir()
    path = folder / "app.db"
    make(path, *statements)
    return path, named


def _direct(path: Path) -> None:
    SQLiteStorage(path).close()


def _url(path: Path) -> None:
    open_storage(f"sqlite:///{path}").close()


def _engine(path: Path) -> None:
    with PolicyEngine(storage=f"sqlite:///{path}") as engine:
        engine.list_policies()


OPENERS: dict[str, Callable[[Path], None]] = {"SQLiteStorage": _direct, "sqlite:///": _url,
                                              "PolicyEngine": _engine}  # fmt: skip


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("kind", FOREIGN)
def test_another_programs_file_is_refused_and_left_as_it_was(
    tmp_path: Path, kind: str, opener: str
) -> None:
    path, named = foreign(tmp_path, kind)
    before = files(path.parent)
    assert list(before) == ["app.db"]  # its creator closed it: no -wal nor -shm
    with pytest.raises(PolicyError) as err:
        OPENERS[opener](path)
    assert err.value.code is ErrorCode.STORAGE_UNAVAILABLE
    message = err.value.message
    assert f"SQLite database {path} holds another program's tables ({named}" in message
    assert "not agentpolicy's" in message
    assert "left this one as it was" in message
    assert files(path.parent) == before  # byte for byte, and no file left beside it


def test_many_tables_are_named_five_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    make(path, *(f"CREATE TABLE t{n} (x)" for n in range(8)))
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(path)
    assert "tables ('t0', 't1', 't2', 't3', 't4' and 3 more) and not" in err.value.message


def test_a_wal_file_the_other_program_holds_open_is_left_as_it_was(tmp_path: Path) -> None:
    """Its -wal holds commits not yet copied into the file: neither is touched."""
    path = tmp_path / "app.db"
    with connected(path) as app:
        app.execute("PRAGMA journal_mode = WAL")
        app.execute("PRAGMA wal_autocheckpoint = 0")
        for statement in APP:
            app.execute(statement)
        wal = tmp_path / "app.db-wal"
        kept = (path.read_bytes(), wal.read_bytes())
        assert len(kept[1]) > 0
        with pytest.raises(PolicyError) as err:
            SQLiteStorage(path)
        assert err.value.code is ErrorCode.STORAGE_UNAVAILABLE
        assert (path.read_bytes(), wal.read_bytes()) == kept
        assert app.execute("SELECT count(*) FROM users").fetchone() == (2,)
        tables = {r[0] for r in app.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"users"}


def test_a_wal_left_by_a_program_that_died_is_merged_by_sqlite_and_refused(
    tmp_path: Path,
) -> None:
    """SQLite's own recovery, as for any program reading the file (docs/storage.md): the
    file's bytes change, its data does not, and nothing is left beside it."""
    path = tmp_path / "app.db"
    with warnings.catch_warnings():  # fork with other threads about: the child only writes
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: writes into the WAL and dies holding it
        with contextlib.suppress(BaseException):
            app = sqlite3.connect(path, isolation_level=None)
            app.execute("PRAGMA journal_mode = WAL")
            app.execute("PRAGMA wal_autocheckpoint = 0")
            for statement in APP:
                app.execute(statement)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert (tmp_path / "app.db-wal").stat().st_size > 0
    with pytest.raises(PolicyError) as err:
        SQLiteStorage(path)
    assert "another program's tables ('users')" in err.value.message
    assert list(files(tmp_path)) == ["app.db"]
    with connected(path) as conn:
        assert conn.execute("SELECT name FROM users ORDER BY id").fetchall() == [("ann",), ("bob",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"users"}


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_POLICY_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    return subprocess.run(
        [EXE, *args], check=False, capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize("kind", ["an app's tables", "an app's tables in WAL mode"])
def test_a_read_only_command_on_another_programs_file_changes_nothing(
    tmp_path: Path, kind: str
) -> None:
    path, _ = foreign(tmp_path, kind)
    before = files(path.parent)
    done = cli(tmp_path, "--db", str(path), "policy", "list")
    assert done.returncode == 1, done
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"agentpolicy: STORAGE_UNAVAILABLE: SQLite database {path} holds ")
    assert files(path.parent) == before
    # the same code and exit status as a file that is not a database at all
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    done = cli(tmp_path, "--db", str(junk), "policy", "list")
    assert done.returncode == 1
    assert done.stderr.startswith("agentpolicy: STORAGE_UNAVAILABLE: ")


# -- what keeps working ----------------------------------------------------------------------------


def works(path: Path) -> None:
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock()) as engine:
        engine.set_policy("agent-1", DAILY)
        assert engine.authorize(payment(1)).allowed
    with PolicyEngine(storage=f"sqlite:///{path}", clock=ManualClock()) as engine:
        assert [p.agent_id for p in engine.list_policies()] == ["agent-1"]


def test_a_new_file_an_empty_one_and_memory_work(tmp_path: Path) -> None:
    works(tmp_path / "new.db")
    empty = tmp_path / "empty.db"
    empty.touch()
    works(empty)
    SQLiteStorage(":memory:").close()


STATEMENTS = [s.strip() for s in _SCHEMA.split(";") if s.strip()]


@pytest.mark.parametrize("done", range(len(STATEMENTS) + 1))
def test_a_first_open_killed_after_any_statement_is_finished_by_the_next(
    tmp_path: Path, done: int
) -> None:
    """A first open switches the file to WAL and creates the tables one statement at a time:
    whatever part of agentpolicy's tables it left, the next open (or a second process opening
    the same new file meanwhile) goes on."""
    path = tmp_path / "cut.db"
    make(path, "PRAGMA journal_mode = WAL", *STATEMENTS[:done])
    works(path)


def test_agentpolicys_file_with_a_table_someone_added_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "mine.db"
    SQLiteStorage(path).close()
    make(path, *APP)
    works(path)
    with connected(path) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (2,)


def copy_v01(tmp_path: Path) -> Path:
    path = tmp_path / "v01.db"
    shutil.copy(FIXTURES / "v01.db", path)
    return path


def converted(path: Path) -> None:
    with PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock()) as engine:
        assert [p.agent_id for p in engine.list_policies()] == ["agent-1", "org:agent 2"]
    with connected(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)


def test_a_file_of_0_1_with_a_table_someone_added_is_converted_and_keeps_it(
    tmp_path: Path,
) -> None:
    path = copy_v01(tmp_path)
    make(path, *APP)
    converted(path)
    with connected(path) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (2,)


@pytest.mark.parametrize("outbox", [True, False])
def test_a_file_of_0_1_cut_short_before_its_conversion_is_converted(
    tmp_path: Path, outbox: bool
) -> None:
    """Schema 2, or 1 (no outbox), with the new tables created and not yet filled."""
    path = copy_v01(tmp_path)
    if not outbox:
        make(path, "DROP TABLE outbox", "UPDATE schema_version SET version = 1")
    make(path, *STATEMENTS)
    converted(path)


@pytest.mark.parametrize("ms", [1, 20, 570, 5000])
def test_connections_keep_their_busy_timeout_to_the_millisecond(tmp_path: Path, ms: int) -> None:
    """connect() sets it now (a statement fewer at each open): 0.57 s is 570 ms, not 569."""
    storage = SQLiteStorage(tmp_path / "t.db", busy_timeout=timedelta(milliseconds=ms))
    assert storage._connection().execute("PRAGMA busy_timeout").fetchone() == (ms,)
    storage.close()
