"""An adversarial probe of budget trees: a governed agent that delegates, races and is revoked.

Each test plays an agent (or a fleet of them) trying to get more out of a
tree than its budgets allow: paying from every level at once in real
processes, delegating past its bounds, after its revocation or through a
child, and spelling ids so that they meet another agent's.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from agentpolicy import (
    Code,
    ErrorCode,
    ForbiddenError,
    PolicyEngine,
)
from agentpolicy.testing import ManualClock, payment
from tests import workers
from tests.backends import Backend

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def used(engine: PolicyEngine, agent: str) -> int:
    w = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    return w.spent.value + w.reserved.value


# -- real processes (threads on the memory store) against one parent ---------------------------


def _pool(backend: Backend, n: int) -> tuple[Callable[..., list[Any]], Any]:
    """Run ``n`` workers as processes (shared stores) or threads (memory), and a barrier."""
    if backend.spec is None:
        storage = backend.handle()

        def run_threads(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(lambda a: fn(storage, *a), args))

        return run_threads, threading.Barrier(n)
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()

    def run_processes(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
        with ctx.Pool(n) as pool:
            return pool.starmap(fn, [(backend.spec, *a) for a in args])

    return run_processes, manager.Barrier(n)


def pay_or_revoke(spec: Any, agent: str, count: int, barrier: Any) -> list[str]:
    """Pay ``count`` times 1 USDT as ``agent``, or (``count == 0``) revoke ``agent`` at once."""
    engine = workers._engine(spec)
    barrier.wait()
    allowed = []
    if count == 0:
        engine.revoke(agent, by="fleet")
    for _ in range(count):
        d = engine.authorize(payment(U, agent_id=agent))
        if d.allowed:
            allowed.append(d.reservation_id or "")
    if isinstance(spec, tuple):
        engine.close()
    return allowed


def _fleet(engine: PolicyEngine) -> None:
    """fleet (100 a day) pays itself; fleet/a (60) delegates fleet/a/g (60); fleet/b (60)."""
    engine.set_policy("fleet", daily(100, delegation={"allowed": True, "maxDepth": 2}))
    engine.delegate("fleet", "fleet/a", daily(60, delegation={"allowed": True}), by_parent=True)
    engine.delegate("fleet/a", "fleet/a/g", daily(60), by_parent=True)
    engine.delegate("fleet", "fleet/b", daily(60), by_parent=True)


AGENTS = ["fleet", "fleet/a", "fleet/a/g", "fleet/b"]


def test_a_parent_its_child_grandchild_and_sibling_paying_at_once_never_pass_any_limit(
    backend: Backend,
) -> None:
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    _fleet(setup)
    run, barrier = _pool(backend, 4)
    chunks = run(pay_or_revoke, [(agent, 60, barrier) for agent in AGENTS])
    got = dict(zip(AGENTS, map(len, chunks), strict=True))
    ids = [r for chunk in chunks for r in chunk]
    assert len(ids) == len(set(ids)) == 100  # asked for 240: exactly the fleet's 100
    assert used(setup, "fleet") == 100 * U
    assert used(setup, "fleet/a") == (got["fleet/a"] + got["fleet/a/g"]) * U <= 60 * U
    assert used(setup, "fleet/a/g") == got["fleet/a/g"] * U
    assert used(setup, "fleet/b") == got["fleet/b"] * U <= 60 * U
    for agent in AGENTS:  # and nothing more now, from any level
        d = setup.authorize(payment(1, agent_id=agent))
        assert (d.allowed, d.code) == (False, Code.DAILY_LIMIT)


def test_a_child_revoked_while_it_its_child_and_its_parent_pay_at_once_never_overspends(
    backend: Backend,
) -> None:
    setup = backend.engine(ManualClock(workers.FIXED_NOW))
    _fleet(setup)
    run, barrier = _pool(backend, 5)
    chunks = run(pay_or_revoke, [*[(agent, 60, barrier) for agent in AGENTS],
                                 ("fleet/a", 0, barrier)])  # fmt: skip
    got = dict(zip(AGENTS, map(len, chunks[:4]), strict=True))
    assert sum(got.values()) == 100  # fleet and fleet/b alone asked for 120
    assert used(setup, "fleet") == 100 * U
    assert used(setup, "fleet/a") == (got["fleet/a"] + got["fleet/a/g"]) * U
    for agent in ("fleet/a", "fleet/a/g"):  # its payments before the revocation still count
        for rid in chunks[AGENTS.index(agent)]:
            assert setup.get_reservation(rid).status == "reserved"
        d = setup.authorize(payment(1, agent_id=agent))
        if agent == "fleet/a" or got[agent] < 60:
            assert (d.code, d.budget_id) == (Code.DELEGATION_REVOKED, "fleet/a")
        else:  # its own checks come first: its own day is used up (see the test below)
            assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, agent)


# -- delegating past the bounds ---------------------------------------------------------------


def tree(backend: Backend, **kw: Any) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock(T0)
    return backend.engine(clock, **kw), clock


@pytest.mark.parametrize("switched_off", [{"allowed": False}, None])
def test_switching_a_budgets_delegation_off_never_lets_its_sub_agents_delegate_deeper(
    backend: Backend, switched_off: dict[str, Any] | None
) -> None:
    """Tightening a budget's delegation rules must not lift the depth it allowed below it.

    team allows one level of sub-agents; its sub-agent team/x asks for seven.
    While team allows delegation, team/x may delegate nothing (a second level).
    Once an administrator switches team's delegation off (allowed false, or no
    block at all), team/x delegated three levels more (its maxDepth was no
    longer read from team, whose switch was off).
    """
    engine, _ = tree(backend)
    engine.set_policy("team", daily(20, delegation={"allowed": True, "maxDepth": 1}))
    engine.delegate("team", "team/x", daily(5, delegation={"allowed": True, "maxDepth": 7}),
                    by_parent=True)  # fmt: skip
    with pytest.raises(ForbiddenError, match="at most 1 level"):
        engine.delegate("team/x", "team/x/y", daily(1), by_parent=True)
    off = daily(20) if switched_off is None else daily(20, delegation=switched_off)
    engine.set_policy("team", off)
    with pytest.raises(ForbiddenError, match="does not let it delegate"):
        engine.delegate("team", "team/z", daily(1), by_parent=True)
    with pytest.raises(ForbiddenError) as refused:  # nor any sub-agent grown below it
        engine.delegate("team/x", "team/x/y", daily(1, delegation={"allowed": True}),
                        by_parent=True)  # fmt: skip
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "team's policy" in str(refused.value)
    assert engine.get_policy("team/x/y") is None
    engine.delegate("team/x", "team/x/y", daily(1))  # an administrator still may
    engine.set_policy("team", daily(20, delegation={"allowed": True, "maxDepth": 2}))
    engine.delegate("team/x", "team/x/w", daily(1), by_parent=True)  # switched on again: 2 levels


def test_an_agent_made_sub_agent_switched_off_stops_the_sub_agents_below_it_delegating(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("team", daily(20, delegation={"allowed": True, "maxDepth": 3}))
    grows = daily(5, delegation={"allowed": True, "maxDepth": 2})
    engine.delegate("team", "team/x", grows, by_parent=True)
    engine.delegate("team/x", "team/x/y", grows, by_parent=True)
    engine.delegate("team", "team/x", daily(5), by_parent=True)  # team switches team/x off
    with pytest.raises(ForbiddenError, match="team/x's policy"):
        engine.delegate("team/x/y", "team/x/y/z", daily(1), by_parent=True)
    assert engine.get_policy("team/x/y/z") is None


def test_below_a_revoked_budget_a_failing_check_of_the_payers_own_comes_first(
    backend: Backend,
) -> None:
    """The payer's own checks run before those of the budgets above it (the documented order)."""
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(100, delegation={"allowed": True, "maxDepth": 2}))
    engine.delegate("fleet", "fleet/a", daily(60, delegation={"allowed": True}))
    engine.delegate("fleet/a", "fleet/a/g", daily(5, merchantRules={"blacklist": ["0xbad"]}))
    engine.confirm(engine.authorize(payment(5 * U, agent_id="fleet/a/g")).reservation_id or "")
    engine.revoke("fleet/a")
    for agent, request, code, budget in (
        ("fleet/a", payment(200 * U, agent_id="fleet/a"), Code.DELEGATION_REVOKED, "fleet/a"),
        ("fleet/a/g", payment(1, agent_id="fleet/a/g"), Code.DAILY_LIMIT, "fleet/a/g"),
        ("fleet/a/g", payment(1, agent_id="fleet/a/g", recipient="0xbad"),
         Code.RECIPIENT_BLOCKED, "fleet/a/g"),
    ):  # fmt: skip
        d = engine.authorize(request)
        assert (d.allowed, d.code, d.budget_id) == (False, code, budget), agent
    engine.set_policy("fleet/a/g", daily(6, parent="fleet/a"))  # room of its own again
    d = engine.authorize(payment(1, agent_id="fleet/a/g"))
    assert (d.code, d.budget_id) == (Code.DELEGATION_REVOKED, "fleet/a")
