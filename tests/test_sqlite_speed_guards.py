"""The SQLite store's hot-path shortcuts keep what they replace: statements, reads, fallbacks."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from agentpolicy import Period, PolicyEngine
from agentpolicy.storage import SQLiteStorage
from agentpolicy.storage.base import Txn
from agentpolicy.testing import ManualClock, payment


def test_a_thread_runs_its_sessions_on_one_cursor_of_its_own_connection(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "c.db")
    with storage.session("", write=True) as first:
        pass
    with storage.session("", write=False) as second:
        pass
    assert isinstance(first.cur, sqlite3.Cursor)
    assert first.cur is second.cur
    assert first.cur.connection is first.conn is storage._connection()
    other: list[Any] = []

    def work() -> None:
        with storage.session("", write=True) as session:
            other.append(session)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert other[0].cur is not first.cur
    assert other[0].cur.connection is other[0].conn is not first.conn
    storage.close()


class _Recorder:
    """A connection that notes every statement (benchmarks/run.py replays the store's SQL so)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.notes: list[str] = []
        self.in_transaction = False

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self.notes.append(sql)
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self.notes.append(sql)
        return self.conn.executemany(sql, rows)


def test_a_connection_put_in_the_threads_place_runs_every_statement(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "r.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "100"}}})
    real = storage._connection()
    recorder = _Recorder(real)
    storage._local.conn = recorder
    decision = engine.authorize(payment(30))
    assert decision.reservation_id is not None
    engine.confirm(decision.reservation_id)
    storage._local.conn = real
    notes = recorder.notes
    assert notes.count("BEGIN IMMEDIATE") == 2
    assert notes.count("COMMIT") == 2
    assert sum(note.startswith("INSERT INTO ops") for note in notes) == 2
    assert sum(note.startswith("SELECT") for note in notes) >= 2
    assert engine.budget("agent-1").periods[Period.DAILY].spent.value == 30
    engine.close()


def test_a_read_of_one_name_answers_and_notes_its_version_present_or_absent(
    tmp_path: Path,
) -> None:
    storage = SQLiteStorage(tmp_path / "g.db")
    txn = Txn("0000000000000000001", 1)
    txn.put["d/one"] = {"n": 1}
    with storage.session("", write=True) as session:
        assert session.get(["d/one"]) == {}
        assert session.read == {"d/one": 0}
        txn.expect["d/one"] = 0
        assert session.commit(txn).applied
    for write in (True, False):
        with storage.session("", write=write) as session:
            assert session.get(["d/one"]) == {"d/one": (1, {"n": 1})}
            assert session.read == {"d/one": 1}
            assert session.get(["d/none"]) == {}
            assert session.read == {"d/one": 1, "d/none": 0}
    # what another connection wrote is read from the file, not from what this one wrote last
    with sqlite3.connect(tmp_path / "g.db", isolation_level=None) as other:
        other.execute("UPDATE docs SET version = 2, body = '{\"n\":2}' WHERE name = 'd/one'")
    other.close()
    with storage.session("", write=True) as session:
        assert session.get(["d/one"]) == {"d/one": (2, {"n": 2})}
        stale = Txn("0000000000000000002", 2)
        stale.expect["d/one"] = 1
        stale.put["d/one"] = {"n": 3}
        assert session.commit(stale).conflict
    storage.close()
