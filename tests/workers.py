"""Code that runs in other processes for the concurrency and crash tests.

Functions here are imported by ``multiprocessing`` (spawn) workers; running the
module starts the crash worker: ``python -m tests.workers crash DB_PATH``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier

from agentpolicy import PolicyEngine
from agentpolicy.storage import SQLiteStorage
from agentpolicy.testing import ManualClock, payment

FIXED_NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def authorize_many(db_path: str, count: int, barrier: Barrier | None = None) -> list[str]:
    """Authorize ``count`` payments of 1 USDT; return the reservation ids that were allowed."""
    engine = PolicyEngine(storage=SQLiteStorage(db_path), clock=ManualClock(FIXED_NOW))
    if barrier is not None:
        barrier.wait()
    allowed = []
    for _ in range(count):
        d = engine.authorize(payment(1_000_000))
        if d.allowed:
            assert d.reservation_id is not None
            allowed.append(d.reservation_id)
    engine.close()
    return allowed


def settle(db_path: str, reservation_ids: list[str], action: str) -> list[str]:
    """Confirm or release reservations made by another process; return their statuses."""
    engine = PolicyEngine(storage=SQLiteStorage(db_path), clock=ManualClock(FIXED_NOW))
    done = [
        (engine.confirm(r) if action == "confirm" else engine.release(r)).status.value
        for r in reservation_ids
    ]
    engine.close()
    return done


def vote(db_path: str, approval_id: str, approver: str, barrier: Barrier) -> str:
    """Approve at the same instant as another process."""
    engine = PolicyEngine(storage=SQLiteStorage(db_path), clock=ManualClock(FIXED_NOW))
    barrier.wait()
    status = engine.decide(approval_id, approver, "approve").status.value
    engine.close()
    return status


def crash_worker(db_path: str) -> None:
    """Authorize and confirm forever, printing each confirmed id once it is committed."""
    engine = PolicyEngine(storage=SQLiteStorage(db_path), clock=ManualClock(FIXED_NOW))
    for i in range(1_000_000):
        d = engine.authorize(payment(1, idempotency_key=f"k{i}"))
        assert d.reservation_id is not None
        if i % 3 == 2:
            continue  # leave every third reservation open, as a crash would
        engine.confirm(d.reservation_id)
        sys.stdout.write(f"{d.reservation_id}\n")
        sys.stdout.flush()


def hold_for_approval(db_path: str) -> None:
    """Ask for a payment that needs approval, wait for a human, then pay and confirm it."""
    engine = PolicyEngine(storage=SQLiteStorage(db_path))
    d = engine.authorize(payment(500_000_000, agent_id="agent-123"))
    sys.stdout.write(f"{d.approval_id}\n")
    sys.stdout.flush()
    sys.stdin.readline()  # the test says when the approver has decided
    assert d.approval_id is not None
    approval = engine.get_approval(d.approval_id)
    assert approval.reservation_id is not None, approval.status
    sys.stdout.write(f"{engine.confirm(approval.reservation_id).status.value}\n")
    sys.stdout.flush()
    engine.close()


def authorize_many_redis(url: str, prefix: str, count: int, barrier: Barrier) -> list[str]:
    """Like :func:`authorize_many`, on Redis."""
    from agentpolicy.storage.redis import RedisStorage

    engine = PolicyEngine(
        storage=RedisStorage(url, key_prefix=prefix), clock=ManualClock(FIXED_NOW)
    )
    barrier.wait()
    allowed = [
        d.reservation_id
        for d in (engine.authorize(payment(1_000_000)) for _ in range(count))
        if d.reservation_id is not None
    ]
    engine.close()
    return allowed


def settle_redis(url: str, prefix: str, reservation_ids: list[str], action: str) -> list[str]:
    """Confirm or release, on Redis, reservations another process made."""
    from agentpolicy.storage.redis import RedisStorage

    engine = PolicyEngine(
        storage=RedisStorage(url, key_prefix=prefix), clock=ManualClock(FIXED_NOW)
    )
    done = [getattr(engine, action)(r).status.value for r in reservation_ids]
    engine.close()
    return done


def approvals_with_webhooks(db_path: str, url: str) -> None:
    """Create approvals (their events wait in the outbox: the receiver is down), then hang."""
    engine = PolicyEngine(
        storage=SQLiteStorage(db_path),
        clock=ManualClock(FIXED_NOW),
        webhook_endpoints=[{"url": url, "secret": "s3cret", "timeout": 1000}],
        webhook_backoff=0.01,
        webhook_backoff_cap=0.05,
    )
    for _ in range(3):
        engine.authorize(payment(500_000_000, agent_id="agent-123"))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()  # killed before this returns


if __name__ == "__main__":
    if sys.argv[1] == "webhooks":
        approvals_with_webhooks(sys.argv[2], sys.argv[3])
    else:
        {"crash": crash_worker, "hold": hold_for_approval}[sys.argv[1]](sys.argv[2])
