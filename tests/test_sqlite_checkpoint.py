"""SQLite's checkpoint thread: started by commits, keeps the WAL short, stopped by close()."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from agentpolicy import Period, PolicyEngine
from agentpolicy.storage import SQLiteStorage
from agentpolicy.storage.sqlite import _CHECKPOINT_EVERY, _FALLBACK_AUTOCHECKPOINT
from agentpolicy.testing import ManualClock, payment


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "agentpolicy-sqlite-checkpoint"]


def _spent(engine: PolicyEngine) -> int:
    return engine.budget("agent-1").periods[Period.DAILY].spent.value


def _cycles(engine: PolicyEngine, n: int) -> None:
    for _ in range(n):
        d = engine.authorize(payment(1))
        assert d.reservation_id is not None
        engine.confirm(d.reservation_id)


def test_commits_start_the_thread_and_close_stops_it(tmp_path: Path) -> None:
    before = set(_threads())  # others' threads may end meanwhile, none may be added
    storage = SQLiteStorage(tmp_path / "c.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(10**12)}}})
    assert storage._checkpointer is None  # nothing started before it is needed
    _cycles(engine, _CHECKPOINT_EVERY)
    checkpointer = storage._checkpointer
    assert checkpointer is not None
    assert checkpointer.thread.is_alive()
    assert checkpointer.thread.daemon  # never holds a process open
    deadline = time.monotonic() + 10
    while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.checkpoints > 0
    engine.close()
    assert not checkpointer.thread.is_alive()
    assert set(_threads()) <= before
    # a storage used again after close() works, and starts a new thread when needed
    again = PolicyEngine(storage=storage, clock=ManualClock())
    _cycles(again, _CHECKPOINT_EVERY)
    assert storage._checkpointer is not None
    assert storage._checkpointer.thread.is_alive()
    assert _spent(again) == 2 * _CHECKPOINT_EVERY
    again.close()
    assert storage._checkpointer is None
    assert set(_threads()) <= before


def test_the_wal_stays_bounded_and_the_file_sound(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "w.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(10**12)}}})
    wal = tmp_path / "w.db-wal"
    biggest = 0
    for _ in range(20):
        _cycles(engine, _CHECKPOINT_EVERY // 2)
        biggest = max(biggest, os.path.getsize(wal))
    # about 10 pages per commit: 2,000 commits unchecked would be some 80 MB (20,000 pages of
    # 4 KiB and a 24-byte header each); the WAL starts over at 10,000 pages, once a commit's
    # checkpoint gets the lock: while the thread checkpoints a WAL that long, the commits made
    # meanwhile add their pages first (651 pages past it, once, in CI; 100 allowed before)
    assert biggest <= 32 + (_FALLBACK_AUTOCHECKPOINT + 2_000) * (4096 + 24)
    assert storage.integrity_check() == "ok"
    engine.close()
    reopened = SQLiteStorage(tmp_path / "w.db")
    assert _spent(PolicyEngine(storage=reopened, clock=ManualClock())) == 20 * (
        _CHECKPOINT_EVERY // 2
    )
    reopened.close()


def test_a_storage_that_only_reads_starts_no_thread(tmp_path: Path) -> None:
    PolicyEngine(storage=SQLiteStorage(tmp_path / "r.db"), clock=ManualClock()).close()
    storage = SQLiteStorage(tmp_path / "r.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    for _ in range(3 * _CHECKPOINT_EVERY):
        assert engine.get_policy("agent-1") is None
    assert storage._checkpointer is None
    engine.close()
