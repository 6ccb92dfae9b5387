"""Engines whose clocks disagree, on one store shared by processes (SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from agentpolicy import PolicyEngine, Storage
from agentpolicy.testing import ManualClock, payment


def a_key_retried_after_housekeeping_ahead_answers_once(
    storage: Storage, other: Storage, prune_at_next_commit: Callable[[Storage], None]
) -> None:
    """An engine two hours ahead runs housekeeping; a key retried at 23 h answers its first decision.

    Housekeeping ran by the pruning engine's clock, and deleted for the whole
    store idempotency entries that engines with true clocks still answered
    with (one key, two payments). ``other`` is a second storage on the same
    store, for the engine ahead.
    """
    true_clock = ManualClock()
    engine = PolicyEngine(storage=storage, clock=true_clock)
    engine.set_policy("agent-y", {"limits": {"weekly": {"value": str(100 * 10**6)}}})
    engine.set_policy("agent-x", {})
    first = engine.authorize(payment(60 * 10**6, agent_id="agent-y", idempotency_key="order-42"))
    engine.confirm(first.reservation_id or "")
    true_clock.advance(hours=23)
    ahead = PolicyEngine(storage=other, clock=ManualClock(true_clock() + timedelta(hours=2)))
    prune_at_next_commit(other)
    ahead.authorize(payment(1, agent_id="agent-x"))
    again = engine.authorize(payment(60 * 10**6, agent_id="agent-y", idempotency_key="order-42"))
    assert again == first  # the first decision, counted once
    ahead.close()
    engine.close()
