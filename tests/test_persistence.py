"""State survives a close and reopen, and a SIGKILL mid-stream, on every store that keeps it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agentpolicy import ApprovalStatus, PolicyEngine, ReservationStatus, Storage
from agentpolicy.storage import SQLiteStorage
from agentpolicy.testing import ManualClock, payment
from tests import workers
from tests.backends import Backend
from tests.skew import a_key_retried_after_housekeeping_ahead_answers_once

ROOT = Path(__file__).resolve().parent.parent
USDT = 1_000_000


def test_a_reopened_engine_sees_everything(shared_backend: Backend) -> None:
    clock = ManualClock()
    policy = {
        "limits": {"daily": {"value": str(1000 * USDT)}},
        "approvalConfig": {
            "thresholds": [
                {"amount": {"value": str(100 * USDT)}, "requiredApprovers": 1, "approvers": ["a"]}
            ]
        },
    }
    with PolicyEngine(storage=shared_backend.open(), clock=clock) as engine:
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

    with PolicyEngine(storage=shared_backend.open(), clock=clock) as engine:
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


def test_sigkill_mid_stream_loses_nothing_confirmed_and_open_reservations_expire(
    shared_backend: Backend,
) -> None:
    assert shared_backend.spec is not None
    setup = PolicyEngine(storage=shared_backend.open(), clock=ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", {"limits": {"daily": {"value": str(10**9)}}})
    setup.close()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "crash", *shared_backend.spec],
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

    storage = shared_backend.handle()
    if isinstance(storage, SQLiteStorage):
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
    clock.advance(hours=49)  # SQLite deletes a day after their time (storage.base.PRUNE_SLACK_US)
    engine.authorize(payment(1, idempotency_key="day1"))

    def kept() -> int:
        if isinstance(storage, MemoryStorage):
            docs = storage._shards["agent-1"].docs
            return sum(name.startswith("i/") for name in docs)
        storage._commits_until_prune = 0  # SQLite prunes every 1000 commits: now
        engine.authorize(payment(1))
        query = "SELECT count(*) FROM docs WHERE name LIKE 'i/%'"
        return int(storage._connection().execute(query).fetchone()[0])

    assert kept() == 1
    engine.close()


def test_an_engine_whose_clock_runs_ahead_deletes_no_idempotency_entry_another_still_answers(
    tmp_path: Path,
) -> None:
    def prune_now(storage: Storage) -> None:
        storage._commits_until_prune = 0  # type: ignore[attr-defined]  # every 10,000 commits

    a_key_retried_after_housekeeping_ahead_answers_once(
        SQLiteStorage(tmp_path / "skew.db"), SQLiteStorage(tmp_path / "skew.db"), prune_now
    )
