"""No overspending under concurrency: real threads and real processes, exact counts."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentpolicy import PolicyEngine
from agentpolicy.storage import MemoryStorage, SQLiteStorage
from agentpolicy.testing import ManualClock, payment
from tests import workers

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}


def _reserved(engine: PolicyEngine) -> int:
    window = engine.budget("agent-1", "daily").periods
    w = next(iter(window.values()))
    return w.reserved.value + w.spent.value


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_8_threads_x_50_allow_exactly_100(tmp_path: Path, kind: str) -> None:
    storage = MemoryStorage() if kind == "memory" else SQLiteStorage(tmp_path / "t.db")
    engine = PolicyEngine(storage=storage, clock=ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", DAILY_100)
    start = threading.Barrier(8)

    def run() -> int:
        start.wait()
        return sum(engine.authorize(payment(USDT)).allowed for _ in range(50))

    with ThreadPoolExecutor(8) as pool:
        allowed = sum(pool.map(lambda _: run(), range(8)))
    assert allowed == 100
    assert _reserved(engine) == 100 * USDT
    engine.close()


def test_4_processes_x_60_on_one_sqlite_file_allow_exactly_100(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    setup = PolicyEngine(storage=SQLiteStorage(db), clock=ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", DAILY_100)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        results = pool.starmap(workers.authorize_many, [(db, 60, barrier)] * 4)
    ids = [r for chunk in results for r in chunk]
    assert len(ids) == 100
    assert len(set(ids)) == 100
    assert _reserved(setup) == 100 * USDT

    # a reservation made by one process is confirmed or released by another
    with ctx.Pool(2) as pool:
        confirmed, released = pool.starmap(
            workers.settle, [(db, ids[:10], "confirm"), (db, ids[10:20], "release")]
        )
    assert confirmed == ["confirmed"] * 10
    assert released == ["released"] * 10
    window = next(iter(setup.budget("agent-1", "daily").periods.values()))
    assert (window.spent.value, window.reserved.value) == (10 * USDT, 80 * USDT)
    setup.close()


def test_two_approvers_in_two_processes_at_the_same_instant_are_both_counted(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "votes.db")
    engine = PolicyEngine(storage=SQLiteStorage(db), clock=ManualClock(workers.FIXED_NOW))
    engine.set_policy(
        "agent-1",
        {
            "approvalConfig": {
                "thresholds": [
                    {"amount": {"value": "1"}, "requiredApprovers": 2, "approvers": ["a", "b"]}
                ]
            }
        },
    )
    approval_id = engine.authorize(payment(USDT)).approval_id
    assert approval_id is not None
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        statuses = pool.starmap(
            workers.vote, [(db, approval_id, "a", barrier), (db, approval_id, "b", barrier)]
        )
    assert sorted(statuses) == ["approved", "pending"]
    approval = engine.get_approval(approval_id)
    assert approval.status.value == "approved"
    assert sorted(v.approver for v in approval.votes) == ["a", "b"]
    engine.close()


def test_concurrent_votes_on_memory_threads_are_all_counted() -> None:
    engine = PolicyEngine(storage=MemoryStorage(), clock=ManualClock(workers.FIXED_NOW))
    approvers = [f"approver-{i}" for i in range(8)]
    engine.set_policy(
        "agent-1",
        {
            "approvalConfig": {
                "thresholds": [
                    {"amount": {"value": "1"}, "requiredApprovers": 8, "approvers": approvers}
                ]
            }
        },
    )
    approval_id = engine.authorize(payment(USDT)).approval_id
    assert approval_id is not None
    start = threading.Barrier(8)

    def run(who: str) -> None:
        start.wait()
        engine.decide(approval_id, who, "approve")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, approvers))
    approval = engine.get_approval(approval_id)
    assert (approval.status.value, approval.approvals) == ("approved", 8)
