"""No overspending under concurrency, on every store: real threads and processes, exact counts.

Stores that processes can share (SQLite, Redis, Redis Cluster) are driven by real
processes; the memory store, which lives in one process, by real threads.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import PolicyEngine
from agentpolicy.storage import MemoryStorage
from agentpolicy.storage._time import micros
from agentpolicy.testing import ManualClock, payment
from tests import workers
from tests.backends import Backend

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}


def _used(engine: PolicyEngine, agent: str = "agent-1") -> int:
    window = engine.budget(agent, "daily").periods
    w = next(iter(window.values()))
    return w.reserved.value + w.spent.value


def _pool(backend: Backend, n: int) -> tuple[Any, Callable[..., list[Any]], Any]:
    """Run ``n`` workers as processes (shared stores) or threads (memory)."""
    if backend.spec is None:
        storage = backend.handle()
        barrier: Any = threading.Barrier(n)

        def run_threads(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(lambda a: fn(storage, *a), args))

        return storage, run_threads, barrier
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()

    def run_processes(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
        with ctx.Pool(n) as pool:
            return pool.starmap(fn, [(backend.spec, *a) for a in args])

    return backend.spec, run_processes, manager.Barrier(n)


def test_8_threads_x_50_on_one_engine_allow_exactly_100(backend: Backend) -> None:
    engine = backend.engine(ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", DAILY_100)
    start = threading.Barrier(8)

    def run() -> int:
        start.wait()
        return sum(engine.authorize(payment(USDT)).allowed for _ in range(50))

    with ThreadPoolExecutor(8) as pool:
        allowed = sum(pool.map(lambda _: run(), range(8)))
    assert allowed == 100
    assert _used(engine) == 100 * USDT


def test_4_workers_x_60_allow_exactly_100_and_settle_across_workers(backend: Backend) -> None:
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", DAILY_100)
    _, run, barrier = _pool(backend, 4)
    chunks = run(workers.authorize_many, [(60, barrier)] * 4)
    ids = [r for chunk in chunks for r in chunk]
    assert len(ids) == len(set(ids)) == 100
    assert _used(setup) == 100 * USDT
    # a reservation made by one worker is confirmed or released by another
    confirmed, released = run(workers.settle, [(ids[:10], "confirm"), (ids[10:20], "release")])
    assert (confirmed, released) == (["confirmed"] * 10, ["released"] * 10)
    window = next(iter(setup.budget("agent-1", "daily").periods.values()))
    assert (window.spent.value, window.reserved.value) == (10 * USDT, 80 * USDT)


def test_two_agents_hammered_at_once_are_both_exact(backend: Backend) -> None:
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", DAILY_100)
    setup.set_policy("agent-2", {"limits": {"daily": {"value": str(50 * USDT)}}})
    _, run, barrier = _pool(backend, 4)
    chunks = run(
        workers.authorize_many,
        [(40, barrier, "agent-1"), (40, barrier, "agent-2")] * 2,
    )
    assert sum(len(c) for c in chunks[0::2]) == 80  # agent-1: 80 asked, all fit in 100
    assert sum(len(c) for c in chunks[1::2]) == 50  # agent-2: exactly its 50
    assert (_used(setup, "agent-1"), _used(setup, "agent-2")) == (80 * USDT, 50 * USDT)


NEW_KINDS = {
    "rolling": {"limits": {"rolling": [{"window": "24h", "amount": {"value": str(100 * USDT)}}]}},
    "count": {"limits": {"counts": [{"window": "10m", "max": 100}]}},
    "grouped scope": {"scopedLimits": [{
        "name": "vendor", "match": {"recipients": ["0xvendor"]}, "groupBy": "recipient",
        "limits": {"daily": {"value": str(100 * USDT)}}}]},
}  # fmt: skip


@pytest.mark.parametrize("kind", list(NEW_KINDS))
def test_4_workers_x_60_against_a_rolling_a_count_and_a_grouped_scope_limit_allow_exactly_100(
    backend: Backend, kind: str
) -> None:
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", NEW_KINDS[kind])
    _, run, barrier = _pool(backend, 4)
    chunks = run(workers.authorize_many, [(60, barrier)] * 4)
    ids = [r for chunk in chunks for r in chunk]
    assert len(ids) == len(set(ids)) == 100
    [limit] = setup.budget("agent-1").limits
    used = limit.count if kind == "count" else limit.reserved.value  # type: ignore[union-attr]
    assert used == (100 if kind == "count" else 100 * USDT)


def test_4_siblings_in_4_workers_draw_on_one_parent_limit_exactly(backend: Backend) -> None:
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    setup.set_policy("fleet", DAILY_100)
    for i in range(4):  # each sibling alone could take 60
        setup.set_policy(f"bot-{i}", {"parent": "fleet",
                                      "limits": {"daily": {"value": str(60 * USDT)}}})  # fmt: skip
    _, run, barrier = _pool(backend, 4)
    chunks = run(workers.authorize_many, [(60, barrier, f"bot-{i}") for i in range(4)])
    ids = [r for chunk in chunks for r in chunk]
    assert len(ids) == len(set(ids)) == 100
    assert _used(setup, "fleet") == 100 * USDT
    assert sum(_used(setup, f"bot-{i}") for i in range(4)) == 100 * USDT
    # a sibling's reservation released in another worker frees the parent for the others
    run(workers.settle, [(ids[:30], "release")])
    more = run(workers.authorize_many, [(60, barrier, f"bot-{i}") for i in range(4)])
    assert sum(len(c) for c in more) == 30
    assert _used(setup, "fleet") == 100 * USDT


def test_two_approvers_at_the_same_instant_are_both_counted(backend: Backend) -> None:
    engine = backend.engine(ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", {"approvalConfig": {"thresholds": [
        {"amount": {"value": "1"}, "requiredApprovers": 2, "approvers": ["a", "b"]}]}})  # fmt: skip
    approval_id = engine.authorize(payment(USDT)).approval_id
    assert approval_id is not None
    _, run, _ = _pool(backend, 2)
    barrier = (threading.Barrier(2) if backend.spec is None
               else multiprocessing.get_context("spawn").Manager().Barrier(2))  # fmt: skip
    statuses = run(workers.vote, [(approval_id, "a", barrier), (approval_id, "b", barrier)])
    assert sorted(statuses) == ["approved", "pending"]
    approval = engine.get_approval(approval_id)
    assert approval.status.value == "approved"
    assert sorted(v.approver for v in approval.votes) == ["a", "b"]


def test_a_two_group_quorum_signed_in_two_workers_approves_once(backend: Backend) -> None:
    from agentpolicy.signing import SigningKey

    engine = backend.engine(ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", {"approvalConfig": {"requireSignedVotes": True, "thresholds": [
        {"amount": {"value": "1"}, "groups": [
            {"name": "finance", "approvers": ["fin"], "required": 1},
            {"name": "security", "approvers": ["sec"], "required": 1}]}]}})  # fmt: skip
    keys = {name: SigningKey.generate() for name in ("fin", "sec")}
    for name, key in keys.items():
        engine.register_approver(name, key.public_key)
    approval_id = engine.authorize(payment(USDT)).approval_id
    assert approval_id is not None
    _, run, _ = _pool(backend, 2)
    barrier = (threading.Barrier(2) if backend.spec is None
               else multiprocessing.get_context("spawn").Manager().Barrier(2))  # fmt: skip
    statuses = run(workers.vote_signed, [(approval_id, name, key.pem(), barrier)
                                         for name, key in keys.items()])  # fmt: skip
    assert sorted(statuses) == ["approved", "pending"]
    approval = engine.get_approval(approval_id)
    assert approval.status.value == "approved"
    assert sorted((v.approver, v.via, v.key_version) for v in approval.votes) == [
        ("fin", "signature", 1), ("sec", "signature", 1)]  # fmt: skip
    events = [h.event for h in engine.history("agent-1")]
    assert (events.count("vote"), events.count("approval_approved")) == (2, 1)
    engine.confirm(approval.reservation_id or "")


def test_one_link_redeemed_by_three_workers_at_once_casts_one_vote(backend: Backend) -> None:
    engine = backend.engine(ManualClock(workers.FIXED_NOW), link_secret=workers.LINK_SECRET)
    engine.set_policy("agent-1", {"approvalConfig": {"thresholds": [
        {"amount": {"value": "1"}, "requiredApprovers": 2, "approvers": ["a", "b"]}]}})  # fmt: skip
    approval_id = engine.authorize(payment(USDT)).approval_id
    assert approval_id is not None
    token = next(x.token for x in engine.approval_links(approval_id)
                 if (x.approver, x.decision) == ("a", "approve"))  # fmt: skip
    _, run, _ = _pool(backend, 3)
    barrier = (threading.Barrier(3) if backend.spec is None
               else multiprocessing.get_context("spawn").Manager().Barrier(3))  # fmt: skip
    outcomes = run(workers.redeem, [(token, barrier)] * 3)
    assert sorted(outcomes) == ["DUPLICATE_DECISION", "DUPLICATE_DECISION", "pending"]
    approval = engine.get_approval(approval_id)
    assert [(v.approver, v.via) for v in approval.votes] == [("a", "link")]
    assert [h.event for h in engine.history("agent-1")].count("vote") == 1


class _Shared:
    value = 0


def test_12_workers_on_the_real_clock_across_an_hour_boundary_never_overspend(
    backend: Backend,
) -> None:
    """The standing race: requests stamped just before the hour, committed just after it.

    Each worker's clock is the real clock moved so that an hour begins 3 s after
    they are released together (long enough for over 100 requests on each side on a
    busy host, where PostgreSQL gave 79 in 1.5 s). A request stamped 59:59.9 may wait for the lock
    until after the first request of the new hour; it must still see the old
    hour's usage. A run on a host too busy to contend both hours (100 requests
    each side) is run again on a fresh pair of hours, up to three times; every
    run must stay within the limit.
    """
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    setup.set_policy("agent-1", {"limits": {"hourly": {"value": "100", "decimals": 6}}})
    for attempt in range(3):
        # a fresh pair of hours each time: 01:00, then 03:00, then 05:00 (any hours)
        boundary = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(hours=1 + 2 * attempt)
        before, after = _race_across(backend, boundary)
        assert sum(before) <= 100  # never more than the limit in the hour that ended
        assert sum(after) <= 100
        if len(before) > 100 and len(after) > 100:  # both hours were really contended
            break
    assert len(before) > 100, (len(before), len(after))
    assert len(after) > 100, (len(before), len(after))
    assert sum(before) == 100  # the hour that ended gave exactly its limit
    assert sum(after) == 100  # and the new hour starts from zero


def _race_across(backend: Backend, boundary: datetime) -> tuple[list[bool], list[bool]]:
    """Run 12 workers from 3 s before ``boundary`` to 1.5 s after: (allowed before, after)."""
    n = 12
    stop = micros(boundary) + 1_500_000
    if backend.spec is None:
        storage = backend.handle()
        barrier: Any = threading.Barrier(n + 1)
        shared: Any = _Shared()
        pool = ThreadPoolExecutor(n)
        pending = [pool.submit(workers.across_the_hour, storage, shared, stop, barrier)
                   for _ in range(n)]  # fmt: skip
        collect: Callable[[], list[Any]] = lambda: [f.result() for f in pending]  # noqa: E731
    else:
        ctx = multiprocessing.get_context("spawn")
        manager = ctx.Manager()
        barrier, shared = manager.Barrier(n + 1), manager.Value("q", 0)
        procs = ctx.Pool(n)
        started = procs.starmap_async(
            workers.across_the_hour, [(backend.spec, shared, stop, barrier)] * n
        )
        collect = started.get
    barrier.wait()  # every worker is up
    shared.value = _us(boundary - (datetime.now(UTC) + timedelta(seconds=3)))
    barrier.wait()  # go
    results = collect()
    if backend.spec is None:
        pool.shutdown()
    else:
        procs.close()
        procs.join()
        manager.shutdown()
    decisions = [d for chunk in results for d in chunk]
    before = [allowed for at, allowed in decisions if at < micros(boundary)]
    after = [allowed for at, allowed in decisions if at >= micros(boundary)]
    return before, after


def _us(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1)


def test_two_agents_never_wait_on_each_others_lock() -> None:
    storage = MemoryStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", DAILY_100)
    engine.set_policy("agent-2", DAILY_100)
    held = threading.Event()
    release = threading.Event()

    def hold_agent_1() -> None:
        with storage.session("agent-1"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_agent_1)
    holder.start()
    assert held.wait(30)
    done: list[bool] = []
    other = threading.Thread(target=lambda: done.append(engine.authorize(
        payment(USDT, agent_id="agent-2")).allowed))  # fmt: skip
    other.start()
    other.join(30)  # ends at once unless it waits on agent-1's lock (held for up to 60 s)
    finished = not other.is_alive()
    release.set()
    holder.join()
    other.join()
    assert finished
    assert done == [True]


def test_open_storage_urls(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentpolicy import PolicyValidationError, open_storage
    from agentpolicy.storage import SQLiteStorage

    assert isinstance(open_storage("memory://"), MemoryStorage)
    absolute = open_storage(f"sqlite:///{tmp_path / 'abs.db'}")
    assert isinstance(absolute, SQLiteStorage)
    absolute.close()
    monkeypatch.chdir(tmp_path)
    relative = open_storage("sqlite:///rel.db")
    relative.close()
    assert (tmp_path / "rel.db").exists()
    for bad in ("postgres://x?schema=no-dashes", "mysql://x", "sqlite:///", "", "memory:"):
        with pytest.raises(PolicyValidationError):
            open_storage(bad)


def test_two_workers_resuming_one_approved_approval_pay_exactly_once(backend: Backend) -> None:
    engine = backend.engine(ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", {**DAILY_100, "approvalConfig": {"thresholds": [
        {"amount": {"value": str(50 * USDT)}, "requiredApprovers": 1, "approvers": ["a@x"]}]}})  # fmt: skip
    request = payment(60 * USDT, agent_id="agent-1")
    held = engine.authorize(request)
    engine.decide(held.approval_id or "", "a@x", "approve")
    _, run, barrier = _pool(backend, 2)
    ran = run(workers.resume_and_pay, [(held.approval_id, request, barrier)] * 2)
    assert sorted(ran) == [False, True]  # one block paid; the other was refused before paying
    approval = engine.get_approval(held.approval_id or "")
    assert engine.get_reservation(approval.reservation_id or "").status == "confirmed"
