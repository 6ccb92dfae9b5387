"""What one ledger step expires, it takes out once, on every store.

A step sees the store as it was when the step began, not its own writes.
Two things in one step used to act on the same reservation twice: expiring
under the agent's head and again under each ancestor's (a child's
reservation is listed under every budget above it), and expiring an entry
of a rolling window just before the window moved past that entry. Each
gave the amount back twice, eating another payment's reservation or a
confirmed payment's count, so the limit was passed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agentpolicy import PolicyEngine
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

T0 = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
APPROVAL_ABOVE_50 = {"timeout": 300_000, "thresholds": [
    {"amount": {"value": "50"}, "requiredApprovers": 1, "approvers": ["boss@x"]}]}  # fmt: skip


def engine_on(backend: Backend, **kw: Any) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock(T0)
    return backend.engine(clock, **kw), clock


def daily_of(engine: PolicyEngine, agent: str) -> tuple[int, int]:
    d = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    return d.spent.value, d.reserved.value


def test_a_child_reservation_that_expires_is_given_back_once_in_its_parent(
    backend: Backend,
) -> None:
    engine, clock = engine_on(backend)
    engine.set_policy("fleet", {"limits": {"daily": {"value": "100"},
                                           "counts": [{"window": "daily", "max": 3}]}})  # fmt: skip
    engine.set_policy("bot", {"parent": "fleet"})
    assert engine.authorize(payment(60, agent_id="bot")).allowed  # expires at 10:05
    clock.advance(minutes=3)
    second = engine.authorize(payment(30, agent_id="bot"))  # open until 10:08
    assert second.allowed
    clock.advance(minutes=3)  # 10:06: the first expires under bot's head and under fleet's
    d = engine.authorize(payment(100, agent_id="bot"))
    assert (d.code, d.budget_id) == ("DAILY_LIMIT", "fleet")  # 30 is still reserved
    assert daily_of(engine, "fleet") == (0, 30)
    assert engine.authorize(payment(70, agent_id="bot")).allowed
    (count,) = [x for x in engine.budget("fleet").limits if x.kind == "count"]
    assert count.count == 2  # the open 30 and the new 70


def test_an_approval_whose_hold_expires_in_a_three_level_tree_lapses_once(
    backend: Backend,
) -> None:
    engine, clock = engine_on(backend)
    engine.set_policy("fleet", {"limits": {"daily": {"value": "100"}}})
    engine.set_policy("mid", {"parent": "fleet"})
    engine.set_policy("bot", {"parent": "mid", "approvalConfig": {**APPROVAL_ABOVE_50,
                                                                  "timeout": 60_000}})  # fmt: skip
    assert engine.authorize(payment(60, agent_id="bot")).requires_approval
    clock.advance(minutes=2)
    assert engine.authorize(payment(1, agent_id="bot")).allowed
    events = [h.event for h in engine.history("bot", 20)]
    assert events.count("expire") == 1
    assert events.count("approval_expired") == 1


def test_a_sent_child_reservation_is_spent_once_and_leaves_the_others_reserved(
    backend: Backend,
) -> None:
    engine, clock = engine_on(backend)
    engine.set_policy("fleet", {"limits": {"daily": {"value": "100"}}})
    engine.set_policy("bot", {"parent": "fleet"})
    sent = engine.authorize(payment(30, agent_id="bot"))
    engine.mark_sent(sent.reservation_id or "")
    clock.advance(minutes=1)
    assert engine.authorize(payment(20, agent_id="bot")).allowed  # open until 10:06
    clock.advance(minutes=4, seconds=30)  # 10:05:30: the sent one expired as spent
    assert engine.authorize(payment(1, agent_id="bot")).allowed
    assert daily_of(engine, "fleet") == (30, 21)


def test_a_confirmed_payment_keeps_its_count_when_another_expires_as_the_window_moves(
    backend: Backend,
) -> None:
    engine, clock = engine_on(backend)
    engine.set_policy("bot", {"limits": {"counts": [{"window": "10m", "max": 2}]}})
    assert engine.authorize(payment(1, agent_id="bot")).allowed  # 10:00, never confirmed
    clock.advance(minutes=1)
    engine.confirm(engine.authorize(payment(1, agent_id="bot")).reservation_id or "")  # 10:01
    clock.advance(minutes=9)  # 10:10: the 10:00 entry expires and leaves the window at once
    assert engine.authorize(payment(1, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).code == "COUNT_LIMIT"


def test_an_open_reservation_keeps_its_amount_when_a_hold_expires_as_the_window_moves(
    backend: Backend,
) -> None:
    engine, clock = engine_on(backend, reservation_ttl=timedelta(minutes=30))
    engine.set_policy("bot", {"limits": {"rolling": [{"window": "10m", "amount": {"value": "100"}}]},
                              "approvalConfig": APPROVAL_ABOVE_50})  # fmt: skip
    assert engine.authorize(payment(60, agent_id="bot")).requires_approval  # held to 10:05
    clock.advance(minutes=1)
    assert engine.authorize(payment(40, agent_id="bot")).allowed  # open until 10:31
    clock.advance(minutes=9)  # 10:10
    (limit,) = engine.budget("bot").limits  # reading the budget moves the window too
    assert limit.reserved.value == 40
    assert engine.authorize(payment(65, agent_id="bot")).code == "ROLLING_LIMIT"
    assert engine.authorize(payment(60, agent_id="bot")).requires_approval


def test_a_sent_payment_that_expires_as_the_window_moves_leaves_the_window(
    backend: Backend,
) -> None:
    """Spent at expiry, then past the window in the same step: it counts no more."""
    engine, clock = engine_on(backend)
    engine.set_policy("bot", {"limits": {"rolling": [{"window": "10m",
                                                      "amount": {"value": "100"}}]}})  # fmt: skip
    sent = engine.authorize(payment(60, agent_id="bot"))
    engine.mark_sent(sent.reservation_id or "")
    clock.advance(minutes=11)  # it expires (spent) and its 10:00 entry leaves the window
    assert engine.authorize(payment(100, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).code == "ROLLING_LIMIT"
