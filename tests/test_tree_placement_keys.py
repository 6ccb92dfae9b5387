"""What an agent was answered before it joined a tree stays its answer, on every store.

An agent with no policy is decided (``NO_POLICY``) in its own shard; placed
in a tree, it lives in the tree's shard from then on. Memory and Redis keep a
shard's documents and logs apart, so the tree's shard alone does not see the
idempotency keys and denials recorded before: the engine reads them from the
agent's own shard, which changes no more once the agent is placed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import Code, ConflictError, ErrorCode, PolicyEngine
from agentpolicy.ledger import keys
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def fleet(backend: Backend) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    return engine, clock


def test_a_key_used_before_a_delegation_answers_as_before_for_its_window(
    backend: Backend,
) -> None:
    engine, clock = fleet(backend)
    ask = payment(5 * U, agent_id="kid", idempotency_key="k1")
    assert engine.authorize(ask).code == Code.NO_POLICY
    engine.delegate("bot", "kid", daily(10))
    again = engine.authorize(ask)
    assert (again.code, again.reservation_id) == (Code.NO_POLICY, None)
    fresh = backend.engine(clock)  # another process: nothing cached
    assert fresh.authorize(ask).code == Code.NO_POLICY
    assert fresh.authorize(ask, dry_run=True).code == Code.NO_POLICY
    with pytest.raises(ConflictError) as refused:
        fresh.authorize(payment(6 * U, agent_id="kid", idempotency_key="k1"))
    assert refused.value.code == ErrorCode.IDEMPOTENCY_CONFLICT
    assert engine.budget("kid", "daily").periods["daily"].reserved.value == 0  # type: ignore[index]
    clock.advance(timedelta(hours=24))  # the key's window is over: decided anew, in the tree
    later = fresh.authorize(ask)
    assert later.code == Code.ALLOWED
    assert fresh.authorize(ask).reservation_id == later.reservation_id


def test_the_denials_before_a_policy_naming_a_parent_stay_in_history_once(
    backend: Backend,
) -> None:
    engine, _ = fleet(backend)
    engine.authorize(payment(1 * U, agent_id="kid"))
    engine.authorize(payment(2 * U, agent_id="kid", idempotency_key="k2"))
    engine.set_policy("kid", daily(10, parent="bot"))
    assert engine.authorize(payment(3 * U, agent_id="kid")).allowed
    seen = backend.engine(ManualClock(T0)).history("kid")
    assert [(h.event, h.code, h.request and h.request.amount) for h in seen] == [
        ("decision", Code.ALLOWED, 3 * U),
        ("policy_set", None, None),
        ("decision", Code.NO_POLICY, 2 * U),
        ("decision", Code.NO_POLICY, 1 * U),
    ]
    assert [h.event for h in engine.history("kid", limit=2)] == ["decision", "policy_set"]
    assert [h.request and h.request.amount for h in engine.history("kid", limit=3)] == [
        3 * U,
        None,
        2 * U,
    ]


def test_a_payment_decided_in_the_agents_own_shard_after_it_was_placed_goes_to_the_tree(
    backend: Backend,
) -> None:
    """An engine that still took the agent for unplaced (its read came first) decides in the tree.

    Nothing is written in the agent's own shard once it is placed, so what is
    read from there stays what it was.
    """
    engine, clock = fleet(backend)
    stale = backend.engine(clock)
    own = stale._shard  # the shard as read before the delegation below: its own

    def before_the_delegation(agent_id: str) -> Any:
        if agent_id == "kid":
            return "kid"
            yield  # a flow that reads nothing
        return (yield from own(agent_id))

    stale._shard = before_the_delegation  # type: ignore[method-assign]
    engine.delegate("bot", "kid", daily(10))
    decided = stale.authorize(payment(4 * U, agent_id="kid", idempotency_key="k3"))
    assert decided.code == Code.ALLOWED
    assert engine.authorize(payment(4 * U, agent_id="kid", idempotency_key="k3")) == decided
    with stale.storage.session("kid", write=False) as session:  # type: ignore[attr-defined]
        left = session.get([keys.idempotency("kid", "k3")])
    if backend.name in ("memory", "redis", "redis-cluster"):
        assert left == {}  # its own shard holds nothing of it
