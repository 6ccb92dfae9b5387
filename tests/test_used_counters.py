"""A calendar counter holds what its window used; a budget reads what is reserved from the open.

A confirm spends what its reserve already counted, so it changes no calendar
counter (nor the head that keeps them); a budget splits each counter's usage
into the amounts its open reservations hold (reserved) and the rest (spent).
Counters written before kept spent and reserved apart: they add up alike, and
their open reservations settle exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agentpolicy import PolicyEngine
from agentpolicy.ledger import keys
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import Storage, Txn, new_op
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def used(engine: PolicyEngine, agent: str) -> tuple[int, int, int]:
    w = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    assert w.remaining is not None
    return w.spent.value, w.reserved.value, w.remaining.value


def head(storage: Storage, agent: str) -> tuple[int, Any]:
    with storage.session(agent, write=False) as session:
        return session.get([keys.head(agent)])[keys.head(agent)]


def test_a_confirm_leaves_the_counters_and_the_budget_splits_them(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    first = engine.authorize(payment(10 * U, agent_id="bot"))
    second = engine.authorize(payment(5 * U, agent_id="bot"))
    assert used(engine, "bot") == (0, 15 * U, 85 * U)
    before = head(engine.storage, "bot")
    engine.confirm(first.reservation_id or "")
    assert head(engine.storage, "bot") == before  # not written: no counter moved
    assert used(engine, "bot") == (10 * U, 5 * U, 85 * U)
    daily_limit = next(lb for lb in engine.budget("bot").limits if lb.window == "daily")
    assert daily_limit.spent is not None
    assert daily_limit.reserved is not None
    assert (daily_limit.spent.value, daily_limit.reserved.value) == (10 * U, 5 * U)
    engine.release(second.reservation_id or "")
    assert used(engine, "bot") == (10 * U, 0, 90 * U)
    third = engine.authorize(payment(30 * U, agent_id="bot"))
    clock.advance(minutes=5)  # it expires unsent: given back
    assert engine.get_reservation(third.reservation_id or "").status == "expired"
    assert used(engine, "bot") == (10 * U, 0, 90 * U)
    assert engine.authorize(payment(90 * U, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).code == "DAILY_LIMIT"


def test_counters_written_apart_before_settle_exactly(backend: Backend) -> None:
    """A head whose counters keep spent and reserved apart (as written before) reads alike."""
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    done = engine.authorize(payment(10 * U, agent_id="bot"))
    engine.confirm(done.reservation_id or "")
    kept = engine.authorize(payment(20 * U, agent_id="bot"))
    given = engine.authorize(payment(30 * U, agent_id="bot"))
    version, body = head(engine.storage, "bot")
    counters = dict(body["c"])
    for key, c in counters.items():  # spent 10, reserved 50: as the counters were kept before
        if isinstance(c, list):
            assert c[2:4] == [60 * U, 0], key
            counters[key] = [c[0], c[1], 10 * U, 50 * U, *c[4:]]
    at = micros(T0)
    txn = Txn(new_op(at), at)
    txn.expect = {keys.head("bot"): version}
    txn.put[keys.head("bot")] = {**body, "c": counters}
    with engine.storage.session("bot") as session:
        assert session.commit(txn).applied
    fresh = backend.engine(clock)
    assert used(fresh, "bot") == (10 * U, 50 * U, 40 * U)
    fresh.confirm(kept.reservation_id or "")
    fresh.release(given.reservation_id or "")
    assert used(fresh, "bot") == (30 * U, 0, 70 * U)
    assert fresh.authorize(payment(70 * U, agent_id="bot")).allowed
    assert fresh.authorize(payment(1, agent_id="bot")).code == "DAILY_LIMIT"
    clock.advance(timedelta(days=1))
    assert used(fresh, "bot") == (0, 0, 100 * U)


def test_a_confirm_reads_no_head_unless_a_rolling_counter_needs_it(monkeypatch: Any) -> None:
    """A confirm moves no calendar counter, so it reads only the reservation (no contention
    with the agent's payments on an optimistic store); a rolling limit's entry is marked spent."""
    from agentpolicy.storage import memory

    read: list[str] = []
    get = memory._MemorySession.get

    def reading(self: Any, names: Any, guess: Any = frozenset()) -> Any:
        read.extend(names)
        return get(self, names, guess)

    clock = ManualClock(T0)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", daily(100))
    engine.set_policy(
        "roller", {"limits": {"rolling": [{"window": "1h", "amount": {"value": str(50 * U)}}]}}
    )
    plain = engine.authorize(payment(10 * U, agent_id="bot"))
    rolled = engine.authorize(payment(10 * U, agent_id="roller"))
    monkeypatch.setattr(memory._MemorySession, "get", reading)
    engine.confirm(plain.reservation_id or "")
    assert keys.head("bot") not in read
    engine.confirm(rolled.reservation_id or "")
    assert keys.head("roller") in read
    monkeypatch.undo()
    assert used(engine, "bot") == (10 * U, 0, 90 * U)
    rolling = next(lb for lb in engine.budget("roller").limits if lb.window == "1h")
    assert rolling.spent is not None
    assert rolling.spent.value == 10 * U
