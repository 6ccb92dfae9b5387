"""Shadow policies on every store: judged beside the live policy, never enforced, promoted atomically."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpolicy import (
    AgentPolicy,
    Amount,
    Code,
    ConflictError,
    NotFoundError,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
)
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from tests import strategies
from tests.backends import Backend

U = 1_000_000


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def codes(engine: PolicyEngine, amounts: list[int], agent: str = "agent-1") -> list[str]:
    found = []
    for amount in amounts:
        d = engine.authorize(payment(amount * U, agent_id=agent))
        if d.reservation_id:
            engine.confirm(d.reservation_id)
        found.append(d.code.value)
    return found


def test_a_shadow_is_judged_beside_the_live_policy_and_never_enforced(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("agent-1", daily(100))
    engine.confirm(engine.authorize(payment(20 * U)).reservation_id or "")  # before the shadow
    shadow = engine.set_shadow_policy("agent-1", {
        "limits": {"daily": {"value": str(50 * U)},
                   "rolling": [{"window": "1h", "amount": {"value": str(25 * U)}}]}})  # fmt: skip
    assert (shadow.live_version, shadow.set_at) == (1, clock.now)
    live = []
    for _ in range(4):
        clock.advance(minutes=10)
        live += codes(engine, [10])
    assert live == ["ALLOWED"] * 4  # the live policy alone decides
    report = engine.shadow_report("agent-1")
    assert report.payments == 4
    assert dict(report.live_codes) == {"ALLOWED": 4}
    # the daily window counts the 20 paid before the shadow; the 1h window only what came after
    assert dict(report.shadow_codes) == {"ALLOWED": 2, "ROLLING_LIMIT": 1, "DAILY_LIMIT": 1}
    assert dict(report.flips) == {"allowed->denied": 2}
    assert report.live == {"allowed": 4, "approval": 0, "denied": 0}
    assert report.shadow_outcomes == {"allowed": 2, "approval": 0, "denied": 2}
    assert [(x.live_code, x.shadow_code, x.flip, x.agent_id) for x in report.differences] == [
        (Code.ALLOWED, Code.DAILY_LIMIT, "allowed->denied", "agent-1"),
        (Code.ALLOWED, Code.ROLLING_LIMIT, "allowed->denied", "agent-1"),
    ]  # newest first
    assert report.differences[0].at == clock.now
    assert report.differences[0].request.amount == 10 * U
    budget = engine.budget("agent-1")
    assert [(x.window, x.spent) for x in budget.limits] == [("daily", Amount(60 * U))]


def test_the_shadows_own_counters_are_undone_by_release_and_expiry(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock, reservation_ttl=timedelta(minutes=5))
    engine.set_policy("agent-1", daily(100))
    engine.set_shadow_policy("agent-1", {
        "limits": {"rolling": [{"window": "1h", "amount": {"value": str(30 * U)}}],
                   "counts": [{"window": "24h", "max": 2}]}})  # fmt: skip
    engine.release(engine.authorize(payment(30 * U)).reservation_id or "")
    engine.authorize(payment(30 * U))  # expires unconfirmed
    clock.advance(minutes=5)
    engine.confirm(engine.authorize(payment(30 * U)).reservation_id or "")
    assert engine.shadow_report("agent-1").flips == {}  # what was given back no longer counts
    assert codes(engine, [1]) == ["ALLOWED"]
    report = engine.shadow_report("agent-1")
    assert (report.payments, dict(report.shadow_codes)) == (4, {"ALLOWED": 3, "ROLLING_LIMIT": 1})
    clock.advance(hours=1)
    assert codes(engine, [30]) == ["ALLOWED"]
    report = engine.shadow_report("agent-1")
    assert dict(report.shadow_codes) == {"ALLOWED": 3, "ROLLING_LIMIT": 1, "COUNT_LIMIT": 1}


def test_a_promoted_shadow_keeps_what_it_counted_and_is_removed_in_the_same_step(
    backend: Backend,
) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("agent-1", daily(100))
    scope = {
        "name": "per-vendor",
        "groupBy": "recipient",
        "limits": {"daily": {"value": str(20 * U)}},
    }
    engine.set_shadow_policy("agent-1", daily(100, scopedLimits=[scope]))
    assert codes(engine, [15, 15]) == ["ALLOWED", "ALLOWED"]
    report = engine.shadow_report("agent-1")
    assert [x.shadow_code for x in report.differences] == [Code.SCOPED_LIMIT]
    version = engine.promote_shadow_policy("agent-1")
    assert version == 2
    assert engine.get_shadow_policy("agent-1") is None
    found = engine.get_policy_version("agent-1", 2)
    assert (found.origin, found.current) == ("promote", True)
    assert found.policy.scoped_limits[0].name == "per-vendor"
    grouped = [x for x in engine.budget("agent-1").limits if x.scope == "per-vendor"]
    assert [(x.group, x.spent) for x in grouped] == [("0xvendor", Amount(30 * U))]
    d = engine.authorize(payment(U))
    assert (d.code, d.policy_version) == (Code.SCOPED_LIMIT, 2)
    events = [(h.event, h.detail) for h in engine.history("agent-1", 3)]
    assert events[1] == ("policy_set", "the shadow policy promoted")
    with pytest.raises(NotFoundError) as err:
        engine.promote_shadow_policy("agent-1")
    assert err.value.code == "SHADOW_NOT_FOUND"


def test_a_shadow_scope_that_redefines_a_live_scope_counts_apart(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    live_scope = {"name": "vendors", "match": {"categories": ["data"]},
                  "limits": {"daily": {"value": str(50 * U)}}}  # fmt: skip
    engine.set_policy("agent-1", daily(1000, scopedLimits=[live_scope]))
    other = {**live_scope, "match": {"categories": ["api"]},
             "limits": {"daily": {"value": str(10 * U)}}}  # fmt: skip
    engine.set_shadow_policy("agent-1", daily(1000, scopedLimits=[other]))
    for _ in range(3):  # api payments count in the shadow's vendors, never in the live one
        engine.confirm(engine.authorize(payment(5 * U, category="api")).reservation_id or "")
    spent = [x.spent for x in engine.budget("agent-1").limits if x.scope == "vendors"]
    assert spent == []  # the live scope has counted nothing: no group yet
    assert engine.authorize(payment(50 * U, category="data")).allowed  # live sees 0 of 50
    report = engine.shadow_report("agent-1")
    assert [x.shadow_code for x in report.differences] == [Code.SCOPED_LIMIT]


def test_a_shadow_on_a_parent_judges_every_childs_payment(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("fleet", daily(100))
    for bot in ("bot-1", "bot-2"):
        engine.set_policy(bot, daily(60, parent="fleet"))
    engine.set_shadow_policy("fleet", daily(50))
    engine.set_shadow_policy("bot-1", daily(20, parent="fleet"))
    assert codes(engine, [30], "bot-1") + codes(engine, [30], "bot-2") == ["ALLOWED"] * 2
    fleet = engine.shadow_report("fleet")
    assert fleet.payments == 2
    assert [(x.agent_id, x.shadow_code) for x in fleet.differences] == [
        ("bot-2", Code.DAILY_LIMIT)]  # fmt: skip
    own = engine.shadow_report("bot-1")
    assert [(x.agent_id, x.shadow_code) for x in own.differences] == [("bot-1", Code.DAILY_LIMIT)]
    assert engine.shadow_report("bot-1").payments == 1  # bot-2's payment is not bot-1's


def test_setting_clearing_and_checking_a_shadow(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    with pytest.raises(NotFoundError) as err:
        engine.set_shadow_policy("agent-1", daily(1))
    assert err.value.code == "NO_POLICY"
    engine.set_policy("team", daily(100))
    engine.set_policy("agent-1", daily(100))
    with pytest.raises(PolicyValidationError) as bad:
        engine.set_shadow_policy("agent-1", daily(1, parent="team"))
    assert bad.value.path == "$.policy.parent"
    with pytest.raises(PolicyValidationError) as bad:
        engine.set_shadow_policy("agent-1", {"limits": {"daily": {"value": "-1"}}})
    assert bad.value.path == "$.policy.limits.daily.value"
    assert engine.get_shadow_policy("agent-1") is None
    engine.set_shadow_policy("agent-1", daily(1))
    assert codes(engine, [2, 2, 2]) == ["ALLOWED"] * 3
    report = engine.shadow_report("agent-1", limit=2)
    assert (report.payments, len(report.differences)) == (3, 2)  # the newest two
    engine.set_shadow_policy("agent-1", daily(1))  # replaced: counting starts afresh
    assert engine.shadow_report("agent-1").payments == 0
    assert engine.shadow_report("agent-1").differences == ()
    codes(engine, [2])
    last = engine.clear_shadow_policy("agent-1")
    assert (last.payments, dict(last.flips)) == (1, {"allowed->denied": 1})
    assert engine.get_policy("agent-1").version == 1  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        engine.shadow_report("agent-1")
    with pytest.raises(NotFoundError):
        engine.clear_shadow_policy("agent-1")
    events = [h.event for h in engine.history("agent-1", 50)]
    assert events.count("shadow_set") == 2
    assert events.count("shadow_cleared") == 1
    with pytest.raises(PolicyError) as err:
        engine.shadow_report("agent-1", limit=0)
    assert err.value.code == "INVALID_INPUT"


def test_a_shadow_whose_parent_no_longer_matches_cannot_be_promoted(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("team", daily(100))
    engine.set_policy("agent-1", daily(50, parent="team"))
    engine.set_shadow_policy("agent-1", daily(40, parent="team"))
    engine.set_policy("agent-1", daily(50))  # no parent any more
    with pytest.raises(PolicyValidationError) as err:
        engine.promote_shadow_policy("agent-1")
    assert err.value.path == "$.policy.parent"
    assert engine.get_policy("agent-1").version == 2  # type: ignore[union-attr]
    assert engine.get_shadow_policy("agent-1") is not None  # nothing changed


@pytest.mark.parametrize("change", ["emergency", "rollback", "delegation"])
def test_a_shadow_set_before_the_live_version_is_not_promoted_over_it(
    backend: Backend, change: str
) -> None:
    """Promoting silently undid a version set after the shadow: an emergency stop came undone.

    Disable the policy in an emergency (version 2) beside a shadow set at
    version 1, then promote: version 3 was the shadow, enabled, and payments
    passed again. Now ``SHADOW_OUTDATED``, nothing changed; ``force`` promotes.
    """
    engine = backend.engine(ManualClock())
    if change == "delegation":
        engine.set_policy("team", daily(100))
        engine.delegate("team", "agent-1", daily(50))
        engine.set_shadow_policy("agent-1", daily(40, parent="team"))
        engine.delegate("team", "agent-1", daily(50, enabled=False))  # re-delegated, stopped
    else:
        engine.set_policy("agent-1", daily(100))
        engine.set_shadow_policy("agent-1", daily(50))
        engine.set_policy("agent-1", daily(100, enabled=False))  # the emergency stop
        if change == "rollback":
            engine.set_policy("agent-1", daily(10))
            engine.rollback_policy("agent-1", 2)  # version 4: version 2 again
    live = engine.get_policy("agent-1")
    assert live is not None
    assert live.version > 1
    with pytest.raises(ConflictError) as err:
        engine.promote_shadow_policy("agent-1")
    assert err.value.code == "SHADOW_OUTDATED"
    assert f"version {live.version} is live now" in err.value.message
    assert engine.get_policy("agent-1").version == live.version  # type: ignore[union-attr]
    assert engine.get_shadow_policy("agent-1") is not None  # nothing changed
    assert engine.authorize(payment(U)).code == Code.POLICY_DISABLED
    with pytest.raises(PolicyValidationError) as bad:
        engine.promote_shadow_policy("agent-1", force=1)  # type: ignore[arg-type]
    assert bad.value.path == "$.force"
    assert engine.promote_shadow_policy("agent-1", force=True) == live.version + 1
    assert engine.get_shadow_policy("agent-1") is None
    assert engine.authorize(payment(U)).allowed


def test_a_shadow_set_again_beside_the_live_version_is_promoted(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", daily(100))
    engine.set_shadow_policy("agent-1", daily(50))
    engine.set_policy("agent-1", daily(100, enabled=False))
    engine.set_shadow_policy("agent-1", daily(50))  # set again beside version 2
    assert engine.promote_shadow_policy("agent-1") == 3


def test_the_log_of_differences_is_bounded_like_denials(backend: Backend) -> None:
    engine = backend.engine(ManualClock(), max_denials=10)
    engine.set_policy("agent-1", daily(1000))
    engine.set_shadow_policy("agent-1", {"limits": {"perTransaction": {"value": "1"}}})
    for _ in range(100):
        engine.authorize(payment(2))  # each one differs
    report = engine.shadow_report("agent-1", limit=10_000)
    assert report.payments == 100  # the tallies are exact
    assert len(report.differences) <= 10 + 64  # the log is capped (SQLite trims in steps)
    assert events_of(engine).count("policy_set") == 1  # and evicts nothing of history


def events_of(engine: PolicyEngine) -> list[str]:
    return [h.event for h in engine.history("agent-1", 10_000)]


def test_concurrent_payments_are_each_tallied_once(backend: Backend) -> None:
    clock = ManualClock()
    setup = backend.engine(clock)
    setup.set_policy("agent-1", daily(1000))
    setup.set_shadow_policy("agent-1", daily(100))
    errors: list[BaseException] = []

    def worker() -> None:
        engine = backend.engine(clock)
        try:
            for _ in range(8):
                d = engine.authorize(payment(10 * U))
                engine.confirm(d.reservation_id or "")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    report = setup.shadow_report("agent-1", limit=100)
    assert report.payments == 32
    assert dict(report.shadow_codes) == {"ALLOWED": 10, "DAILY_LIMIT": 22}
    assert len(report.differences) == 22


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    live=strategies.policies(),
    shadow=strategies.policies(),
    steps=st.lists(
        st.tuples(
            strategies.requests(),
            st.integers(0, 7200),
            st.sampled_from(["confirm", "release", "keep"]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_a_shadow_never_changes_a_live_decision(
    live: AgentPolicy, shadow: AgentPolicy, steps: list[tuple[Any, int, str]]
) -> None:
    decided = []
    for with_shadow in (False, True):
        clock = ManualClock()
        engine = PolicyEngine(storage=MemoryStorage(), clock=clock)
        engine.set_policy("agent-1", live)
        if with_shadow:
            engine.set_shadow_policy("agent-1", shadow)
        found = []
        for request, seconds, then in steps:
            clock.advance(seconds=seconds)
            d = engine.authorize(request)
            found.append((d.code, d.budget_id, d.evaluations))
            if d.reservation_id and then != "keep":
                (engine.confirm if then == "confirm" else engine.release)(d.reservation_id)
        decided.append(found)
        if with_shadow:
            assert engine.shadow_report("agent-1").payments == len(steps)
    assert decided[0] == decided[1]
