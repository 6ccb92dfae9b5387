"""Code that runs in other processes (or threads) for the concurrency and crash tests.

Functions here are imported by ``multiprocessing`` (spawn) workers; each opens
the store named by a spec (URL and key prefix, see :mod:`tests.backends`).
Running the module starts a crash worker: ``python -m tests.workers crash URL PREFIX``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier
from typing import Any

from agentpolicy import PolicyEngine, Storage
from agentpolicy.storage import open_storage
from agentpolicy.testing import ManualClock, payment

FIXED_NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def _engine(spec: tuple[str, str] | Storage, clock: Callable[[], datetime] | None = None,
            **kwargs: Any) -> PolicyEngine:  # fmt: skip
    storage = spec if not isinstance(spec, tuple) else open_storage(spec[0], key_prefix=spec[1])
    return PolicyEngine(storage=storage, clock=clock or ManualClock(FIXED_NOW), **kwargs)


def authorize_many(
    spec: Any, count: int, barrier: Any = None, agent_id: str = "agent-1"
) -> list[str]:
    """Authorize ``count`` payments of 1 USDT; return the reservation ids that were allowed."""
    engine = _engine(spec)
    if barrier is not None:
        barrier.wait()
    allowed = []
    for _ in range(count):
        d = engine.authorize(payment(1_000_000, agent_id=agent_id))
        if d.allowed:
            assert d.reservation_id is not None
            allowed.append(d.reservation_id)
    if isinstance(spec, tuple):
        engine.close()
    return allowed


def settle(spec: Any, reservation_ids: list[str], action: str) -> list[str]:
    """Confirm or release reservations made by another process; return their statuses."""
    engine = _engine(spec)
    done = [getattr(engine, action)(r).status.value for r in reservation_ids]
    if isinstance(spec, tuple):
        engine.close()
    return done


def vote(spec: Any, approval_id: str, approver: str, barrier: Barrier) -> str:
    """Approve at the same instant as another process."""
    engine = _engine(spec)
    barrier.wait()
    status = engine.decide(approval_id, approver, "approve").status.value
    if isinstance(spec, tuple):
        engine.close()
    return status


def vote_signed(spec: Any, approval_id: str, approver: str, pem: bytes, barrier: Any) -> str:
    """Approve with a signature made in this process, at the same instant as another one."""
    from agentpolicy.signing import SigningKey

    engine = _engine(spec)
    key = SigningKey.from_pem(pem)
    at = engine.clock()
    signature = key.sign(engine.vote_message(approval_id, approver, "approve", at))
    barrier.wait()
    approval = engine.decide(approval_id, approver, "approve", signature=signature, signed_at=at)
    if isinstance(spec, tuple):
        engine.close()
    return approval.status.value


LINK_SECRET = "the link secret of the concurrency tests, 40+ chars"


def redeem(spec: Any, token: str, barrier: Any) -> str:
    """Redeem a link at the same instant as others; the approval's status, or the error's code."""
    from agentpolicy import PolicyError

    engine = _engine(spec, link_secret=LINK_SECRET)
    barrier.wait()
    try:
        outcome = engine.redeem_link(token).status.value
    except PolicyError as err:
        outcome = err.code.value
    if isinstance(spec, tuple):
        engine.close()
    return outcome


def across_the_hour(spec: Any, shared: Any, stop_us: int, barrier: Any) -> list[tuple[int, bool]]:
    """Authorize 1 unit in a loop on the real clock moved by ``shared.value`` us, until ``stop_us``.

    Waits at ``barrier`` twice: when ready, and for the go (the offset is set in
    between). Returns ``(decision time in microseconds, allowed)`` for every decision.
    """
    shift = timedelta(0)

    def clock() -> datetime:
        return datetime.now(UTC) + shift

    engine = _engine(spec, clock)
    barrier.wait()
    barrier.wait()
    shift = timedelta(microseconds=shared.value)
    seen: list[tuple[int, bool]] = []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    while True:
        d = engine.authorize(payment(1))
        assert d.decided_at is not None
        at = (d.decided_at - epoch) // timedelta(microseconds=1)
        seen.append((at, d.allowed))
        if at >= stop_us:
            break
    if isinstance(spec, tuple):
        engine.close()
    return seen


def open_fresh(spec: Any, agent_id: str, barrier: Any) -> int:
    """Open a store that may not exist yet at the same instant as others; set a policy."""
    storage = open_storage(spec[0], key_prefix=spec[1])
    engine = PolicyEngine(storage=storage, clock=ManualClock(FIXED_NOW))
    barrier.wait()
    version = engine.set_policy(agent_id, {"limits": {"daily": {"value": "100"}}})
    engine.close()
    return version


def crash_worker(url: str, prefix: str) -> None:
    """Authorize and confirm forever, printing each confirmed id once it is committed."""
    engine = _engine((url, prefix))
    for i in range(1_000_000):
        d = engine.authorize(payment(1, idempotency_key=f"k{i}"))
        assert d.reservation_id is not None
        if i % 3 == 2:
            continue  # leave every third reservation open, as a crash would
        engine.confirm(d.reservation_id)
        sys.stdout.write(f"{d.reservation_id}\n")
        sys.stdout.flush()


def hold_for_approval(url: str, prefix: str) -> None:
    """Ask for a payment that needs approval, wait for a human, then pay and confirm it."""
    engine = PolicyEngine(storage=open_storage(url, key_prefix=prefix))
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


def approvals_with_webhooks(url: str, prefix: str, hook: str) -> None:
    """Create approvals (their events wait in the outbox: the receiver is down), then hang."""
    engine = _engine(
        (url, prefix),
        webhook_endpoints=[{"url": hook, "secret": "s3cret", "timeout": 1000}],
        webhook_backoff=0.01,
        webhook_backoff_cap=0.05,
    )
    for _ in range(3):
        engine.authorize(payment(500_000_000, agent_id="agent-123"))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()  # killed before this returns
    time.sleep(3600)


def _store_args(args: list[str]) -> tuple[str, str, list[str]]:
    """``URL PREFIX rest...``, or a bare SQLite path followed by the rest."""
    if "://" not in args[0]:
        return f"sqlite:///{args[0]}", "", args[1:]
    return args[0], args[1], args[2:]


if __name__ == "__main__":
    url, prefix, rest = _store_args(sys.argv[2:])
    if sys.argv[1] == "webhooks":
        approvals_with_webhooks(url, prefix, rest[0])
    else:
        {"crash": crash_worker, "hold": hold_for_approval}[sys.argv[1]](url, prefix)


def resume_and_pay(spec: Any, approval_id: str, request: Any, barrier: Any) -> bool:
    """Resume an approved approval through the payment guard; whether the block ran."""
    from agentpolicy import PaymentDenied

    engine = _engine(spec)
    barrier.wait()
    try:
        with engine.payment(request, approval_id=approval_id):
            time.sleep(0.05)  # the payment takes a moment: the other worker is entering now
            ran = True
    except PaymentDenied:
        ran = False
    if isinstance(spec, tuple):
        engine.close()
    return ran
