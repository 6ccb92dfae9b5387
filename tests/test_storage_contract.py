"""The storage contract: every backend must pass this suite, unchanged, through the engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import (
    Amount,
    ApprovalStatus,
    Code,
    ErrorCode,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
    ReservationStatus,
)
from agentpolicy.ledger.flows import Run
from agentpolicy.ledger.state import EXPIRE_BATCH
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
APPROVALS = {
    "limits": {"daily": {"value": str(1000 * USDT)}},
    "approvalConfig": {
        "thresholds": [
            {"amount": {"value": str(100 * USDT)}, "requiredApprovers": 1,
             "approvers": ["admin@company.com", "ops@company.com"]},
            {"amount": {"value": str(500 * USDT)}, "requiredApprovers": 2,
             "approvers": ["admin@company.com", "ops@company.com", "cfo@company.com"]},
        ],
        "timeout": 3_600_000,
    },
}  # fmt: skip


def setup(backend: Backend, policy: dict[str, Any], **kw: Any) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock()
    engine = backend.engine(clock, **kw)
    engine.set_policy("agent-1", policy)
    return engine, clock


def code_of(call: Any) -> str:
    with pytest.raises(PolicyError) as err:
        call()
    return str(err.value.code)


def daily(engine: PolicyEngine) -> tuple[int, int, int]:
    b = engine.budget("agent-1", "daily").periods
    w = next(iter(b.values()))
    assert w.remaining is not None
    return w.spent.value, w.reserved.value, w.remaining.value


# --- reservations ---------------------------------------------------------------------


def test_allowed_payment_reserves_until_confirmed(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    d = engine.authorize(payment(30 * USDT))
    assert (d.allowed, d.code) == (True, Code.ALLOWED)
    assert d.reservation_id is not None
    assert d.policy_version == 1
    assert daily(engine) == (0, 30 * USDT, 70 * USDT)
    confirmed = engine.confirm(d.reservation_id)
    assert confirmed.status is ReservationStatus.CONFIRMED
    assert daily(engine) == (30 * USDT, 0, 70 * USDT)


def test_confirm_twice_is_a_no_op_reporting_the_same_reservation(backend: Backend) -> None:
    engine, clock = setup(backend, DAILY_100)
    rid = engine.authorize(payment(30 * USDT)).reservation_id
    assert rid is not None
    first = engine.confirm(rid)
    clock.advance(seconds=1)
    assert engine.confirm(rid) == first
    assert daily(engine) == (30 * USDT, 0, 70 * USDT)


def test_settling_reports_the_request_that_was_authorized(backend: Backend) -> None:
    # the authorizing engine reports the caller's own request; another engine on the same
    # store reads it back from the ledger: both report the same request, every field kept
    engine, clock = setup(backend, DAILY_100)
    other = backend.engine(clock)
    first = payment(30 * USDT, category="api_usage", memo="invoice 7", idempotency_key="k-1")
    second = payment(20 * USDT, recipient="0xother", memo="invoice 8")
    a, b = engine.authorize(first), engine.authorize(second)
    assert a.reservation_id is not None
    assert b.reservation_id is not None
    confirmed = engine.confirm(a.reservation_id)
    released = other.release(b.reservation_id)
    assert (confirmed.request, confirmed.amount) == (first, first.asset_amount)
    assert (released.request, released.amount) == (second, second.asset_amount)
    assert other.confirm(a.reservation_id) == confirmed
    assert engine.release(b.reservation_id) == released


def test_release_gives_budget_back_and_twice_is_a_no_op(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    rid = engine.authorize(payment(30 * USDT)).reservation_id
    assert rid is not None
    released = engine.release(rid)
    assert released.status is ReservationStatus.RELEASED
    assert engine.release(rid) == released
    assert daily(engine) == (0, 0, 100 * USDT)


def test_release_after_confirm_and_confirm_after_release_are_refused(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    a = engine.authorize(payment(USDT)).reservation_id
    b = engine.authorize(payment(USDT)).reservation_id
    assert a
    assert b
    engine.confirm(a)
    engine.release(b)
    assert code_of(lambda: engine.release(a)) == "RESERVATION_ALREADY_CONFIRMED"
    assert code_of(lambda: engine.confirm(b)) == "RESERVATION_RELEASED"
    assert daily(engine) == (USDT, 0, 99 * USDT)


def test_unknown_reservation_is_not_found(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    assert code_of(lambda: engine.confirm("res_nope")) == "RESERVATION_NOT_FOUND"
    assert code_of(lambda: engine.release("res_nope")) == "RESERVATION_NOT_FOUND"
    assert code_of(lambda: engine.get_reservation("res_nope")) == "RESERVATION_NOT_FOUND"


def test_reservation_expires_at_its_ttl_and_gives_budget_back_lazily(backend: Backend) -> None:
    engine, clock = setup(backend, DAILY_100, reservation_ttl=timedelta(minutes=2))
    d = engine.authorize(payment(60 * USDT))
    assert d.expires_at == clock.now + timedelta(minutes=2)
    assert d.reservation_id is not None
    clock.advance(minutes=2, microseconds=-1)
    assert daily(engine) == (0, 60 * USDT, 40 * USDT)  # one microsecond before expiry
    clock.advance(microseconds=1)  # now == expiresAt: expired
    assert daily(engine) == (0, 0, 100 * USDT)
    assert code_of(lambda: engine.confirm(d.reservation_id)) == "RESERVATION_EXPIRED"
    expired = engine.release(d.reservation_id)
    assert expired.status is ReservationStatus.EXPIRED
    assert engine.get_reservation(d.reservation_id).status is ReservationStatus.EXPIRED


def test_expiry_frees_budget_for_the_next_authorize_without_a_sweep(backend: Backend) -> None:
    engine, clock = setup(backend, DAILY_100)
    assert engine.authorize(payment(100 * USDT)).allowed
    assert engine.authorize(payment(USDT)).code == Code.DAILY_LIMIT
    clock.advance(minutes=5)
    assert engine.authorize(payment(100 * USDT)).allowed


def test_sweep_expires_due_reservations_and_reports_them(backend: Backend) -> None:
    engine, clock = setup(backend, DAILY_100)
    ids = {engine.authorize(payment(USDT)).reservation_id for _ in range(3)}
    kept = engine.authorize(payment(USDT)).reservation_id
    assert kept is not None
    engine.confirm(kept)
    assert engine.sweep().reservations == ()
    clock.advance(minutes=5)
    swept = engine.sweep()
    assert {r.id for r in swept.reservations} == ids
    assert all(r.status is ReservationStatus.EXPIRED for r in swept.reservations)
    assert engine.sweep().reservations == ()
    assert daily(engine) == (USDT, 0, 99 * USDT)


LIFETIME_20 = {
    "limits": {"lifetime": {"value": str(20 * USDT)}},
    "approvalConfig": {
        "thresholds": [{"amount": {"value": str(5 * USDT)}, "requiredApprovers": 1,
                        "approvers": ["admin@company.com"]}],
        "timeout": 3_600_000,
    },
}  # fmt: skip


def lifetime_reserved(engine: PolicyEngine) -> int:
    found = [w for w in engine.budget("agent-1").limits if w.window == "lifetime"]
    return found[0].reserved.value


@pytest.mark.parametrize("first_call", ["set_policy", "release", "get_reservation", "decide"])
def test_a_reservation_left_open_past_the_keep_closed_time_still_gives_its_budget_back(
    backend: Backend, first_call: str
) -> None:
    # an open reservation (and the hold of a pending approval) outlive the 8 days a closed one
    # is kept: the ledger closes them first, so their amounts always go back to the counters
    engine, clock = setup(backend, LIFETIME_20)
    first = engine.authorize(payment(4 * USDT)).reservation_id
    second = engine.authorize(payment(4 * USDT)).reservation_id
    approval = engine.authorize(payment(6 * USDT)).approval_id
    assert first is not None
    assert second is not None
    assert approval is not None
    assert lifetime_reserved(engine) == 14 * USDT
    clock.advance(days=9)
    if first_call == "set_policy":
        engine.set_policy("agent-1", LIFETIME_20)
    elif first_call == "release":
        assert engine.release(first).status is ReservationStatus.EXPIRED
    elif first_call == "get_reservation":
        assert engine.get_reservation(first).status is ReservationStatus.EXPIRED
    else:
        vote = lambda: engine.decide(approval, "admin@company.com", "approve")  # noqa: E731
        assert code_of(vote) == "APPROVAL_NOT_PENDING"
    assert lifetime_reserved(engine) == 0
    for rid in (first, second):
        assert engine.get_reservation(rid).status is ReservationStatus.EXPIRED
    assert engine.get_approval(approval).status is ApprovalStatus.EXPIRED
    assert engine.authorize(payment(4 * USDT)).allowed


def test_release_after_window_rollover_returns_budget_to_original_window(
    backend: Backend,
) -> None:
    clock = ManualClock(datetime(2026, 1, 19, 23, 58, tzinfo=UTC))
    engine = backend.engine(clock, reservation_ttl=timedelta(minutes=30))
    engine.set_policy("agent-1", DAILY_100)
    rid = engine.authorize(payment(80 * USDT)).reservation_id
    assert rid is not None
    clock.advance(minutes=4)  # the next day
    assert daily(engine) == (0, 0, 100 * USDT)  # the reservation counts in yesterday only
    assert engine.authorize(payment(100 * USDT)).allowed
    engine.release(rid)
    assert daily(engine) == (0, 100 * USDT, 0)  # today's counter is untouched


def test_confirm_after_window_rollover_spends_in_the_original_window(backend: Backend) -> None:
    clock = ManualClock(datetime(2026, 1, 19, 23, 58, tzinfo=UTC))
    engine = backend.engine(clock)
    engine.set_policy("agent-1", DAILY_100)
    rid = engine.authorize(payment(80 * USDT)).reservation_id
    assert rid is not None
    clock.advance(minutes=3)
    engine.confirm(rid)
    assert daily(engine) == (0, 0, 100 * USDT)


def test_counters_never_go_negative(backend: Backend) -> None:
    engine, clock = setup(backend, {"limits": {"hourly": {"value": str(10 * USDT)}}})
    rid = engine.authorize(payment(5 * USDT)).reservation_id
    assert rid is not None
    clock.advance(minutes=70)
    engine.release(rid)  # expired by now: a no-op
    b = engine.budget("agent-1", "hourly").periods
    w = next(iter(b.values()))
    assert (w.spent.value, w.reserved.value) == (0, 0)


# --- decisions, policies, history ----------------------------------------------------


def test_denials_reserve_nothing_and_are_recorded(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    d = engine.authorize(payment(101 * USDT))
    assert (d.allowed, d.code, d.reservation_id) == (False, Code.DAILY_LIMIT, None)
    assert daily(engine) == (0, 0, 100 * USDT)
    record = engine.history("agent-1", 1)[0]
    assert (record.event, record.code, record.policy_version) == ("decision", "DAILY_LIMIT", 1)
    assert record.request is not None
    assert record.request.amount == 101 * USDT


def test_five_payments_of_30_against_100_three_pass(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    codes = [engine.authorize(payment(30 * USDT)).code for _ in range(5)]
    assert codes == [Code.ALLOWED] * 3 + [Code.DAILY_LIMIT] * 2


def test_agents_are_isolated(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    engine.set_policy("agent-2", DAILY_100)
    assert engine.authorize(payment(100 * USDT)).allowed
    assert engine.authorize(payment(100 * USDT, agent_id="agent-2")).allowed
    assert engine.authorize(payment(USDT)).code == Code.DAILY_LIMIT


def test_no_policy_is_a_recorded_decision_and_budget_says_no_policy(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    d = engine.authorize(payment(agent_id="ghost"))
    assert (d.allowed, d.code, d.policy_version) == (False, Code.NO_POLICY, None)
    assert engine.history("ghost")[0].code == "NO_POLICY"
    assert code_of(lambda: engine.budget("ghost")) == "NO_POLICY"
    assert engine.get_policy("ghost") is None


def test_set_policy_bumps_the_version_and_decisions_name_it(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    assert engine.set_policy("agent-1", {"limits": {"daily": {"value": "5"}}}) == 2
    stored = engine.get_policy("agent-1")
    assert stored is not None
    assert stored.version == 2
    assert stored.policy.limits is not None
    assert stored.policy.limits.daily == Amount(5)
    d = engine.authorize(payment(6))
    assert (d.code, d.policy_version) == (Code.DAILY_LIMIT, 2)
    events = [h.event for h in engine.history("agent-1")]
    assert events == ["decision", "policy_set", "policy_set"]


def test_invalid_policy_is_refused_with_paths_and_stores_nothing(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    with pytest.raises(PolicyValidationError) as err:
        engine.set_policy("agent-1", {"limits": {"daily": {"value": "-1"}}})
    assert err.value.problems[0].path == "$.policy.limits.daily.value"
    stored = engine.get_policy("agent-1")
    assert stored is not None
    assert stored.version == 1


def test_a_policy_changed_by_another_engine_is_used_at_once(backend: Backend) -> None:
    engine, clock = setup(backend, DAILY_100)
    assert engine.authorize(payment(USDT)).allowed  # caches version 1
    other = backend.engine(clock)
    other.set_policy("agent-1", {"enabled": False})
    d = engine.authorize(payment(USDT))
    assert (d.code, d.policy_version) == (Code.POLICY_DISABLED, 2)


def test_list_policies_filters_by_org_prefix(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    engine.set_policy("acme:bot", DAILY_100)
    engine.set_policy("acme:crawler", DAILY_100)
    engine.set_policy("acmex:bot", DAILY_100)
    assert [p.agent_id for p in engine.list_policies("acme")] == ["acme:bot", "acme:crawler"]
    assert len(engine.list_policies()) == 4


def test_history_is_newest_first_and_records_state_changes(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    a = engine.authorize(payment(USDT)).reservation_id
    b = engine.authorize(payment(USDT)).reservation_id
    assert a
    assert b
    engine.confirm(a)
    engine.release(b)
    history = engine.history("agent-1", limit=10)
    assert [h.event for h in history] == [
        "release", "confirm", "decision", "decision", "policy_set",
    ]  # fmt: skip
    assert history[0].reservation_id == b
    assert [h.seq for h in history] == sorted((h.seq for h in history), reverse=True)
    assert len(engine.history("agent-1", limit=2)) == 2


# --- idempotency ------------------------------------------------------------------------


def test_same_idempotency_key_and_request_answers_the_first_decision_once(
    backend: Backend,
) -> None:
    engine, clock = setup(backend, DAILY_100)
    first = engine.authorize(payment(30 * USDT, idempotency_key="k1", memo="first"))
    clock.advance(minutes=1)
    again = engine.authorize(payment(30 * USDT, idempotency_key="k1", memo="retry"))
    assert again == first
    assert daily(engine) == (0, 30 * USDT, 70 * USDT)  # counted once


def test_same_idempotency_key_with_another_request_is_a_conflict(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    engine.authorize(payment(30 * USDT, idempotency_key="k1"))
    assert (
        code_of(lambda: engine.authorize(payment(31 * USDT, idempotency_key="k1")))
        == "IDEMPOTENCY_CONFLICT"
    )
    assert daily(engine) == (0, 30 * USDT, 70 * USDT)


def test_idempotency_keys_are_scoped_to_the_agent_and_last_24_hours(backend: Backend) -> None:
    engine, clock = setup(backend, {"limits": {"monthly": {"value": str(100 * USDT)}}})
    engine.set_policy("agent-2", DAILY_100)
    first = engine.authorize(payment(USDT, idempotency_key="k"))
    other = engine.authorize(payment(USDT, agent_id="agent-2", idempotency_key="k"))
    assert other.reservation_id != first.reservation_id
    clock.advance(hours=24)
    later = engine.authorize(payment(USDT, idempotency_key="k"))
    assert later.reservation_id != first.reservation_id


def test_a_denial_is_replayed_too(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    first = engine.authorize(payment(101 * USDT, idempotency_key="x"))
    assert engine.authorize(payment(101 * USDT, idempotency_key="x")) == first


# --- approvals ----------------------------------------------------------------------------


def test_payment_above_threshold_waits_and_holds_its_amount(backend: Backend) -> None:
    engine, _ = setup(backend, APPROVALS)
    d = engine.authorize(payment(150 * USDT))
    assert (d.allowed, d.requires_approval, d.code) == (False, True, Code.APPROVAL_REQUIRED)
    assert d.approval_id is not None
    assert d.reservation_id is None
    approval = engine.get_approval(d.approval_id)
    assert approval.status is ApprovalStatus.PENDING
    assert approval.reservation_id is None
    assert (approval.required_approvers, approval.approvers) == (
        1, ("admin@company.com", "ops@company.com"),
    )  # fmt: skip
    assert daily(engine) == (0, 150 * USDT, 850 * USDT)
    assert [a.id for a in engine.list_approvals("agent-1")] == [d.approval_id]


def test_two_pending_approvals_cannot_together_overspend(backend: Backend) -> None:
    engine, _ = setup(backend, APPROVALS)
    assert engine.authorize(payment(450 * USDT)).requires_approval
    assert engine.authorize(payment(450 * USDT)).requires_approval
    assert engine.authorize(payment(450 * USDT)).code == Code.DAILY_LIMIT


def test_approval_gives_a_reservation_whose_ttl_counts_from_the_approval(
    backend: Backend,
) -> None:
    engine, clock = setup(backend, APPROVALS, reservation_ttl=timedelta(minutes=5))
    d = engine.authorize(payment(150 * USDT))
    assert d.approval_id is not None
    clock.advance(minutes=30)
    approved = engine.decide(d.approval_id, "ADMIN@company.com", "approve", "ok")
    assert approved.status is ApprovalStatus.APPROVED
    assert approved.reservation_id is not None
    reservation = engine.get_reservation(approved.reservation_id)
    assert reservation.expires_at == clock.now + timedelta(minutes=5)
    assert engine.list_approvals() == []
    engine.confirm(approved.reservation_id)
    assert daily(engine) == (150 * USDT, 0, 850 * USDT)


def test_approved_reservation_expires_like_any_other(backend: Backend) -> None:
    engine, clock = setup(backend, APPROVALS)
    d = engine.authorize(payment(150 * USDT))
    assert d.approval_id is not None
    rid = engine.decide(d.approval_id, "ops@company.com", "approve").reservation_id
    assert rid is not None
    clock.advance(minutes=5)
    assert code_of(lambda: engine.confirm(rid)) == "RESERVATION_EXPIRED"
    assert daily(engine) == (0, 0, 1000 * USDT)
    assert engine.get_approval(d.approval_id).status is ApprovalStatus.APPROVED


def test_one_deny_denies_at_once_and_gives_the_budget_back(backend: Backend) -> None:
    engine, _ = setup(backend, APPROVALS)
    d = engine.authorize(payment(600 * USDT))  # needs 2 of 3
    assert d.approval_id is not None
    after_one = engine.decide(d.approval_id, "admin@company.com", "approve")
    assert after_one.status is ApprovalStatus.PENDING
    denied = engine.decide(d.approval_id, "cfo@company.com", "deny", "too much")
    assert denied.status is ApprovalStatus.DENIED
    assert denied.reservation_id is None
    assert [v.decision for v in denied.votes] == ["approve", "deny"]
    assert daily(engine) == (0, 0, 1000 * USDT)
    assert (
        code_of(
            lambda: engine.decide(d.approval_id, "ops@company.com", "approve")  # type: ignore[arg-type]
        )
        == "APPROVAL_NOT_PENDING"
    )


def test_enough_approvals_approve(backend: Backend) -> None:
    engine, _ = setup(backend, APPROVALS)
    d = engine.authorize(payment(600 * USDT))
    assert d.approval_id is not None
    engine.decide(d.approval_id, "admin@company.com", "approve")
    done = engine.decide(d.approval_id, "cfo@company.com", "approve")
    assert (done.status, done.approvals) == (ApprovalStatus.APPROVED, 2)


def test_unauthorized_and_duplicate_approvers_change_nothing(backend: Backend) -> None:
    engine, _ = setup(backend, APPROVALS)
    d = engine.authorize(payment(600 * USDT))
    aid = d.approval_id
    assert aid is not None
    assert code_of(lambda: engine.decide(aid, "mallory@evil.com", "approve")) == (
        "APPROVER_NOT_AUTHORIZED"
    )
    assert code_of(lambda: engine.decide(aid, "agent-1", "approve")) == "APPROVER_NOT_AUTHORIZED"
    engine.decide(aid, "admin@company.com", "approve")
    assert code_of(lambda: engine.decide(aid, "Admin@Company.com", "approve")) == (
        "DUPLICATE_DECISION"
    )
    approval = engine.get_approval(aid)
    assert (approval.status, len(approval.votes)) == (ApprovalStatus.PENDING, 1)


def test_approval_expires_after_its_timeout_and_gives_the_budget_back(backend: Backend) -> None:
    engine, clock = setup(backend, APPROVALS)
    d = engine.authorize(payment(150 * USDT))
    aid = d.approval_id
    assert aid is not None
    assert d.expires_at == clock.now + timedelta(hours=1)
    clock.advance(hours=1)
    assert engine.get_approval(aid).status is ApprovalStatus.EXPIRED
    assert daily(engine) == (0, 0, 1000 * USDT)
    assert code_of(lambda: engine.decide(aid, "admin@company.com", "approve")) == (
        "APPROVAL_NOT_PENDING"
    )
    assert engine.list_approvals() == []


def test_sweep_reports_expired_approvals(backend: Backend) -> None:
    engine, clock = setup(backend, APPROVALS)
    aid = engine.authorize(payment(150 * USDT)).approval_id
    clock.advance(hours=2)
    swept = engine.sweep()
    assert [a.id for a in swept.approvals] == [aid]
    assert swept.approvals[0].status is ApprovalStatus.EXPIRED


def test_unknown_approval_and_bad_decisions(backend: Backend) -> None:
    engine, _ = setup(backend, APPROVALS)
    assert code_of(lambda: engine.get_approval("apr_nope")) == "APPROVAL_NOT_FOUND"
    assert code_of(lambda: engine.decide("apr_nope", "a", "approve")) == "APPROVAL_NOT_FOUND"
    assert code_of(lambda: engine.decide("apr_nope", "a", "maybe")) == "INVALID_INPUT"


def test_the_seed_approval_walkthrough(backend: Backend) -> None:
    from agentpolicy.examples import approval_example_policy

    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("agent-123", approval_example_policy())
    d = engine.authorize(payment(500 * USDT, agent_id="agent-123", recipient="0xvendor"))
    assert d.requires_approval
    assert d.approval_id is not None
    approval = engine.decide(d.approval_id, "admin@company.com", "approve")
    assert approval.reservation_id is not None
    assert engine.confirm(approval.reservation_id).status is ReservationStatus.CONFIRMED


# --- budgets and input ----------------------------------------------------------------------


def test_budget_rounds_spent_up_and_remaining_down_for_finer_decimals(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100)
    rid = engine.authorize(payment(10**12 + 1, decimals=18)).reservation_id  # 0.000001000...1
    assert rid is not None
    engine.confirm(rid)
    assert daily(engine) == (2, 0, 100 * USDT - 2)


def test_budget_reports_limited_windows_or_the_one_asked_for(backend: Backend) -> None:
    engine, _ = setup(backend, {"limits": {"daily": {"value": "5"}, "monthly": {"value": "9"}}})
    assert [p.value for p in engine.budget("agent-1").periods] == ["daily", "monthly"]
    weekly = engine.budget("agent-1", "weekly").periods
    w = next(iter(weekly.values()))
    assert (w.limit, w.remaining) == (None, None)
    assert code_of(lambda: engine.budget("agent-1", "quarterly")) == "INVALID_INPUT"


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.confirm(""),
        lambda e: e.release(5),
        lambda e: e.budget(" agent-1"),
        lambda e: e.history("agent-1", 0),
        lambda e: e.history("agent-1", True),
        lambda e: e.decide("apr_x", "", "approve"),
        lambda e: e.authorize({"agentId": "agent-1"}),
        lambda e: e.set_policy("", {}),
        lambda e: e.list_policies(""),
    ],
)
def test_bad_input_is_invalid_input_and_changes_nothing(backend: Backend, call: Any) -> None:
    engine, _ = setup(backend, DAILY_100)
    before = engine.history("agent-1", 100)
    assert code_of(lambda: call(engine)) == ErrorCode.INVALID_INPUT
    assert engine.history("agent-1", 100) == before


def test_a_naive_clock_is_an_internal_error(backend: Backend) -> None:
    engine = PolicyEngine(storage=backend.handle(), clock=lambda: datetime(2026, 1, 1))
    assert code_of(engine.sweep) == "INTERNAL"


# --- time: windows, skew and the horizon ------------------------------------------------


def test_a_request_stamped_before_midnight_but_committed_after_sees_that_days_usage(
    backend: Backend,
) -> None:
    """Two engines whose clocks differ by 2 s across midnight (the boundary overspend)."""
    late = ManualClock(datetime(2026, 1, 19, 23, 59, 59, tzinfo=UTC))
    early = ManualClock(datetime(2026, 1, 20, 0, 0, 1, tzinfo=UTC))
    behind, ahead = backend.engine(late), backend.engine(early)
    behind.set_policy("agent-1", DAILY_100)
    assert behind.authorize(payment(100 * USDT)).allowed  # the 19th is spent
    assert ahead.authorize(payment(USDT)).allowed  # the 20th begins (in the other process)
    refused = behind.authorize(payment(100 * USDT))  # still stamped on the 19th
    assert refused.code == Code.DAILY_LIMIT
    assert ahead.authorize(payment(99 * USDT)).allowed  # the 20th has its own 100
    assert ahead.authorize(payment(USDT)).code == Code.DAILY_LIMIT


def test_a_clock_that_steps_back_within_the_grace_still_sees_the_old_window(
    backend: Backend,
) -> None:
    engine, clock = setup(backend, {"limits": {"hourly": {"value": str(10 * USDT)}}})
    clock.set(datetime(2026, 1, 19, 10, 59, 59, tzinfo=UTC))
    rid = engine.authorize(payment(10 * USDT)).reservation_id
    assert rid is not None
    engine.confirm(rid)
    clock.set(datetime(2026, 1, 19, 11, 30, tzinfo=UTC))
    assert engine.authorize(payment(USDT)).allowed  # a new hour
    clock.set(datetime(2026, 1, 19, 10, 59, 59, 500_000, tzinfo=UTC))  # NTP steps back
    assert engine.authorize(payment(USDT)).code == Code.HOURLY_LIMIT


def test_a_clock_behind_the_dropped_windows_is_refused_not_checked_against_nothing(
    backend: Backend,
) -> None:
    engine, clock = setup(backend, {"limits": {"hourly": {"value": str(10 * USDT)}}})
    clock.set(datetime(2026, 1, 19, 10, 30, tzinfo=UTC))
    rid = engine.authorize(payment(10 * USDT)).reservation_id
    assert rid is not None
    engine.confirm(rid)
    clock.set(datetime(2026, 1, 19, 13, 0, tzinfo=UTC))  # the 10:00 hour ended 2 h ago
    assert engine.authorize(payment(USDT)).allowed  # its counters are dropped now
    clock.set(datetime(2026, 1, 19, 10, 45, tzinfo=UTC))  # a clock 2 h 15 min behind
    before = engine.history("agent-1", 100)
    assert code_of(lambda: engine.authorize(payment(USDT))) == "STORAGE_UNAVAILABLE"
    assert engine.history("agent-1", 100) == before  # nothing was allowed or written


# Antarctica/Troll is at +00:00 in winter and +02:00 from 01:00 UTC on the last Sunday of
# March: its 29 March 2026 begins at 00:00+00:00 as UTC's does, but ends at 22:00 UTC, and
# its March at 22:00 UTC on the 31st. The windows in UTC have the same keys and end 2 h later.
_TROLL_ENDS_SOONER = [
    ("daily", datetime(2026, 3, 29, 23, 30, tzinfo=UTC), datetime(2026, 3, 30, tzinfo=UTC)),
    ("monthly", datetime(2026, 3, 31, 23, 30, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
]


def _100_spent_in_troll(
    backend: Backend, limits: dict[str, Any]
) -> tuple[PolicyEngine, ManualClock]:
    """An engine whose agent-1 spent 100 USDT at 10:00 UTC on 29 March under ``limits`` in Troll."""
    clock = ManualClock(datetime(2026, 3, 29, 10, tzinfo=UTC))
    engine = backend.engine(clock)
    engine.set_policy("agent-1", {**limits, "timeRules": {"timezone": "Antarctica/Troll"}})
    rid = engine.authorize(payment(100 * USDT)).reservation_id
    assert rid is not None
    engine.confirm(rid)
    return engine, clock


@pytest.mark.parametrize(("period", "late", "next_window"), _TROLL_ENDS_SOONER,
                         ids=["daily", "monthly"])  # fmt: skip
@pytest.mark.parametrize("read_first", [False, True], ids=["authorize", "budget-first"])
def test_a_counter_is_kept_until_the_window_in_force_under_its_key_ends(
    backend: Backend, period: str, late: datetime, next_window: datetime, read_first: bool
) -> None:
    """A timezone changed to one whose window has the same key but ends later keeps its counter.

    The counter begun in Troll was dropped an hour (the grace) after Troll's
    window ended, while the UTC window of the same key was still in force:
    200 passed in it against a limit of 100.
    """
    limits = {"limits": {period: {"value": str(100 * USDT)}}}
    engine, clock = _100_spent_in_troll(backend, limits)
    engine.set_policy("agent-1", {**limits, "timeRules": {"timezone": "UTC"}})
    clock.set(late)  # more than the grace after Troll's window ended; UTC's goes on
    if read_first:  # reading the budget moves the books too
        assert engine.budget("agent-1").periods[period].remaining.value == 0  # type: ignore[union-attr]
    assert engine.authorize(payment(100 * USDT)).code == getattr(Code, f"{period.upper()}_LIMIT")
    clock.set(next_window)
    assert engine.authorize(payment(100 * USDT)).allowed


@pytest.mark.parametrize("read_first", [False, True], ids=["authorize", "budget-first"])
def test_a_counter_a_shadow_in_another_timezone_still_counts_in_is_kept(
    backend: Backend, read_first: bool
) -> None:
    """The live policy's pruning dropped the day's counter that a UTC shadow still counted in.

    Live in Troll, shadow in UTC, both 100 a day: at 23:30 UTC Troll's day
    had ended, so the counter went; the shadow judged a payment of 1 against
    zero, and once promoted allowed 99 more (200 against 100 in UTC's day).
    """
    limits = {"limits": {"daily": {"value": str(100 * USDT)}}}
    clock = ManualClock(datetime(2026, 3, 29, 10, tzinfo=UTC))
    engine = backend.engine(clock)
    engine.set_policy("agent-1", {**limits, "timeRules": {"timezone": "Antarctica/Troll"}})
    engine.set_shadow_policy("agent-1", {**limits, "timeRules": {"timezone": "UTC"}})
    rid = engine.authorize(payment(100 * USDT)).reservation_id
    assert rid is not None
    engine.confirm(rid)
    clock.set(datetime(2026, 3, 29, 23, 30, tzinfo=UTC))  # Troll's 30 March; UTC's 29th goes on
    if read_first:  # reading the budget moves the books too
        engine.budget("agent-1")
    late = engine.authorize(payment(USDT))
    assert late.allowed  # Troll's new day
    assert engine.shadow_report("agent-1").flips  # the shadow would have refused it
    engine.confirm(late.reservation_id or "")
    engine.promote_shadow_policy("agent-1")
    assert engine.authorize(payment(99 * USDT)).code == Code.DAILY_LIMIT
    assert engine.budget("agent-1").periods["daily"].spent.value == 101 * USDT  # type: ignore[index]


@pytest.mark.parametrize("change", ["policy", "shadow"])
def test_a_budget_read_across_a_policy_change_drops_no_counter_the_new_policy_counts_in(
    backend: Backend, change: str
) -> None:
    """``budget`` took the windows from the head it read, then pruned in a later step.

    A policy (or a shadow, promoted later) set in between, Troll to UTC at
    23:30 UTC on 29 March, met a prune by Troll's windows: the day's counter
    went while UTC's day was in force, and 100 more passed against a daily
    limit of 100.
    """
    limits = {"limits": {"daily": {"value": str(100 * USDT)}}}
    engine, clock = _100_spent_in_troll(backend, limits)
    clock.set(datetime(2026, 3, 29, 23, 30, tzinfo=UTC))  # Troll's day ended 1.5 h ago

    def budget_with_a_policy_set_before_its_step() -> Any:
        flow = engine._budget("agent-1")
        request, changed = next(flow), False
        while True:
            if isinstance(request, Run) and not changed:  # the head was read: change it now
                utc = {**limits, "timeRules": {"timezone": "UTC"}}
                if change == "policy":
                    engine.set_policy("agent-1", utc)
                else:
                    engine.set_shadow_policy("agent-1", utc)
                changed = True
            try:
                request = flow.send((yield request))
            except StopIteration as done:
                assert changed
                return done.value

    engine._drive(budget_with_a_policy_set_before_its_step())
    if change == "shadow":
        engine.promote_shadow_policy("agent-1")
    assert engine.authorize(payment(100 * USDT)).code == Code.DAILY_LIMIT
    assert engine.budget("agent-1").periods["daily"].spent.value == 100 * USDT  # type: ignore[index]


_ROLLING_10 = {"window": "1h", "amount": {"value": str(10 * USDT), "decimals": 6, "symbol": "USDT"}}


@pytest.mark.parametrize(
    "limits",
    [{"daily": {"value": str(10 * USDT)}}, {"rolling": [_ROLLING_10]}],
    ids=["calendar", "rolling"],
)
def test_a_clock_before_1970_is_refused_and_says_so(
    backend: Backend, limits: dict[str, Any]
) -> None:
    engine, clock = setup(backend, {"limits": limits})
    clock.set(datetime(1969, 12, 31, 22, 0, tzinfo=UTC))  # a clock reset to before the epoch
    before = engine.history("agent-1", 100)
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(USDT))
    assert str(err.value.code) == "STORAGE_UNAVAILABLE"
    assert "reads 1969-12-31T22:00:00+00:00, before 1970-01-01T00:00:00Z" in str(err.value)
    assert engine.history("agent-1", 100) == before  # nothing was allowed or written


# --- history retention ------------------------------------------------------------------


def test_a_flood_of_denials_never_evicts_state_changes(backend: Backend) -> None:
    engine, _ = setup(backend, DAILY_100, max_denials=50)
    rid = engine.authorize(payment(USDT)).reservation_id
    assert rid is not None
    engine.confirm(rid)
    for _ in range(300):  # every one denied
        assert engine.authorize(payment(1000 * USDT)).code == Code.DAILY_LIMIT
    events = [h.event for h in engine.history("agent-1", 10_000)]
    assert events.count("decision") <= 50 + 64 + 1  # denials capped (SQLite trims in steps)
    assert events[-3:] == ["confirm", "decision", "policy_set"]


def test_history_is_kept_by_age_when_a_retention_is_set(backend: Backend) -> None:
    engine, clock = setup(backend, DAILY_100, history_retention=timedelta(days=1))
    clock.advance(days=2)
    for _ in range(130):  # enough appends for every store to trim
        engine.authorize(payment(1))
    events = [h.event for h in engine.history("agent-1", 10_000)]
    assert "policy_set" not in events  # two days old: dropped
    assert events.count("decision") == 130


def test_a_flood_of_10001_denials_on_the_defaults_keeps_the_policy_record() -> None:
    from agentpolicy.storage import MemoryStorage

    engine = PolicyEngine(storage=MemoryStorage(), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    for _ in range(10_001):
        engine.authorize(payment(1000 * USDT))
    assert all(h.event == "decision" for h in engine.history("agent-1", 10_000))
    denials = engine.storage.log("agent-1", "hd/agent-1", 20_000)
    changes = engine.storage.log("agent-1", "hc/agent-1", 20_000)
    assert len(denials) == 10_000  # the newest 10,000 denials
    assert [entry["ev"] for _, _, entry in changes] == ["policy_set"]  # never evicted


MANY_DUE = EXPIRE_BATCH + 50  # more due reservations than one step expires


@pytest.mark.parametrize("first_call", ["authorize", "dry_run", "budget", "sweep"])
def test_more_due_expiries_than_one_batch_are_all_applied_before_a_call_answers(
    backend: Backend, first_call: str
) -> None:
    # one step expires at most EXPIRE_BATCH reservations; a call that finds more due commits
    # them a batch at a time before it decides or reports, so none still counts as reserved
    engine, clock = setup(backend, {"limits": {"daily": {"value": str(MANY_DUE)}}})
    for _ in range(MANY_DUE):
        assert engine.authorize(payment(1)).allowed
    clock.advance(minutes=10)  # every reservation (ttl 5 minutes) has expired
    if first_call == "authorize":
        assert engine.authorize(payment(MANY_DUE)).allowed  # the whole limit is free again
    elif first_call == "dry_run":
        assert engine.authorize(payment(MANY_DUE), dry_run=True).allowed
    elif first_call == "budget":
        assert daily(engine)[1] == 0
    else:
        assert len(engine.sweep().reservations) == MANY_DUE
        assert engine.sweep().reservations == ()
    assert daily(engine)[1] == (MANY_DUE if first_call == "authorize" else 0)
    expired = [h for h in engine.history("agent-1", 10_000) if h.event == "expire"]
    assert len(expired) == MANY_DUE


def test_more_due_expiries_of_a_child_than_one_batch_free_the_parent_too(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("team", {"limits": {"daily": {"value": str(MANY_DUE)}}})
    engine.set_policy("bot", {"limits": {"daily": {"value": str(10 * MANY_DUE)}}, "parent": "team"})
    for _ in range(MANY_DUE):
        assert engine.authorize(payment(1, agent_id="bot")).allowed
    clock.advance(minutes=10)
    assert engine.authorize(payment(MANY_DUE, agent_id="bot")).allowed  # the parent's limit
    team = next(iter(engine.budget("team", "daily").periods.values()))
    assert (team.spent.value, team.reserved.value) == (0, MANY_DUE)
