"""SQLite state survives a close and reopen, and a SIGKILL in the middle of a stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agentpolicy import ApprovalStatus, PolicyEngine, ReservationStatus
from agentpolicy.storage import SQLiteStorage
from agentpolicy.testing import ManualClock, payment
from tests import workers

ROOT = Path(__file__).resolve().parent.parent
USDT = 1_000_000


def test_a_reopened_sqlite_engine_sees_everything(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    clock = ManualClock()
    policy = {
        "limits": {"daily": {"value": str(1000 * USDT)}},
        "approvalConfig": {
            "thresholds": [
                {"amount": {"value": str(100 * USDT)}, "requiredApprovers": 1, "approvers": ["a"]}
            ]
        },
    }
    with PolicyEngine(storage=SQLiteStorage(db), clock=clock) as engine:
        engine.set_policy("agent-1", policy)
        confirmed = engine.authorize(payment(10 * USDT)).reservation_id
        open_id = engine.authorize(payment(20 * USDT)).reservation_id
        approval_id = engine.authorize(payment(150 * USDT)).approval_id
        assert confirmed
        assert open_id
        assert approval_id
        engine.confirm(confirmed)
        before = engine.history("agent-1")
        budget = engine.budget("agent-1")

    with PolicyEngine(storage=f"sqlite:///{db}", clock=clock) as engine:
        stored = engine.get_policy("agent-1")
        assert stored is not None
        assert stored.version == 1
        assert engine.history("agent-1") == before
        assert engine.budget("agent-1") == budget
        assert engine.get_reservation(confirmed).status is ReservationStatus.CONFIRMED
        assert engine.get_approval(approval_id).status is ApprovalStatus.PENDING
        engine.release(open_id)
        approved = engine.decide(approval_id, "a", "approve")
        assert approved.reservation_id is not None
        engine.confirm(approved.reservation_id)
        window = next(iter(engine.budget("agent-1", "daily").periods.values()))
        assert (window.spent.value, window.reserved.value) == (160 * USDT, 0)


def test_open_storage_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentpolicy import PolicyValidationError, open_storage
    from agentpolicy.storage import MemoryStorage

    assert isinstance(open_storage("memory://"), MemoryStorage)
    absolute = open_storage(f"sqlite:///{tmp_path / 'abs.db'}")
    assert isinstance(absolute, SQLiteStorage)
    absolute.close()
    monkeypatch.chdir(tmp_path)
    relative = open_storage("sqlite:///rel.db")
    relative.close()
    assert (tmp_path / "rel.db").exists()
    for bad in ("postgres://x", "sqlite:///", "", "memory:"):
        with pytest.raises(PolicyValidationError):
            open_storage(bad)


def test_sigkill_mid_stream_loses_nothing_confirmed_and_open_reservations_expire(
    tmp_path: Path,
) -> None:
    db = tmp_path / "crash.db"
    setup = PolicyEngine(storage=SQLiteStorage(db), clock=ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", {"limits": {"daily": {"value": str(10**9)}}})
    setup.close()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "crash", str(db)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    printed = [child.stdout.readline().strip() for _ in range(150)]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    storage = SQLiteStorage(db)
    assert storage.integrity_check() == "ok"
    later = ManualClock(workers.FIXED_NOW + timedelta(minutes=10))
    engine = PolicyEngine(storage=storage, clock=later)
    for rid in printed:
        assert engine.get_reservation(rid).status is ReservationStatus.CONFIRMED
    engine.sweep()
    window = next(iter(engine.budget("agent-1", "daily").periods.values()))
    assert window.reserved.value == 0
    confirms = [h for h in engine.history("agent-1", 10_000) if h.event == "confirm"]
    assert window.spent.value == len(confirms) >= len(printed)
    engine.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_idempotency_entries_older_than_a_day_do_not_pile_up(tmp_path: Path, kind: str) -> None:
    from agentpolicy.storage import MemoryStorage

    storage = MemoryStorage() if kind == "memory" else SQLiteStorage(tmp_path / "i.db")
    clock = ManualClock()
    engine = PolicyEngine(storage=storage, clock=clock)
    engine.set_policy("agent-1", {"limits": {"monthly": {"value": str(10**12)}}})
    for i in range(5):
        engine.authorize(payment(1, idempotency_key=f"day0-{i}"))
    clock.advance(hours=25)
    engine.authorize(payment(1, idempotency_key="day1"))

    def kept() -> int:
        if isinstance(storage, MemoryStorage):
            return len(storage._tables.idempotency["agent-1"])
        return int(storage._connection().execute("SELECT count(*) FROM idempotency").fetchone()[0])

    assert kept() == 1
    engine.close()
