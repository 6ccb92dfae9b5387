"""What-if: the replay against a brute-force model, and engine.simulate on every store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpolicy import AgentPolicy, Amount, Code, PaymentRequest, PolicyError, SpendingLimits
from agentpolicy.policy import CountLimit, RollingLimit, ScopedLimit, ScopeMatch, TimeRules
from agentpolicy.rules import assess, judge
from agentpolicy.shadow import flip_of
from agentpolicy.simulation import Freed, RecordedPayment, replay
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend
from tests.snapshots import store_state

U = 1_000_000
T0 = datetime(2026, 3, 10, 22, 0, tzinfo=UTC)
PASSING = (Code.ALLOWED, Code.APPROVAL_REQUIRED)

# -- the brute-force model ------------------------------------------------------------------------


def brute_force(candidate: AgentPolicy, events: list[Any]) -> dict[str, Any]:
    """The report, recomputed by summing every earlier payment still counting, one by one."""
    seen: list[dict[str, Any]] = []  # each payment: its event, keys, code, and whether it counts
    for event in events:
        if isinstance(event, Freed):
            p = seen[event.payment]
            p["live"] = False
            if not (event.approval and p["code"] is Code.ALLOWED):
                p["mine"] = False
            continue
        a = assess(candidate, event.request, event.at)
        usage: dict[str, tuple[int, int, int]] = {}
        for t in a.tallies:
            counted = [q for q in seen if q["mine"] and t.usage_key in q["keys"]
                       and (t.seconds is None or q["at"] > event.at - timedelta(seconds=t.seconds))]  # fmt: skip
            if counted:
                d = max(q["amount"].decimals for q in counted)
                usage[t.usage_key] = (sum(q["amount"].scaled_to(d) for q in counted), d,
                                      len(counted))  # fmt: skip
        if event.before is not None:
            code = event.before
        else:
            code = judge(a, usage).code
            if code in PASSING:
                if event.after is not None:
                    code = event.after
                elif code is Code.APPROVAL_REQUIRED or event.approval_elsewhere:
                    code = Code.APPROVAL_REQUIRED
        seen.append({"at": event.at, "amount": event.request.asset_amount, "code": code,
                     "keys": {t.usage_key for t in a.tallies}, "event": event,
                     "mine": code in PASSING, "live": event.live_code in PASSING,
                     "limits": [(label, t, limit, book.key[1]) for book in
                                (a.books if a.early is None and a.comparable else ())
                                for _, label, limit, t in book.limits() if t.window]})  # fmt: skip
    windows: dict[str, dict[str, Any]] = {}
    for p in seen:
        for label, t, limit, scope in p["limits"]:
            w = windows.setdefault(t.usage_key, {"window": label, "start": t.window.start,
                                                 "scope": scope, "limit": None, "max": None})  # fmt: skip
            w["limit" if isinstance(limit, Amount) else "max"] = limit
    for key, w in windows.items():
        for side in ("mine", "live"):
            counted = [p for p in seen if p[side] and key in p["keys"]]
            w[side] = (sum(Fraction(p["amount"].value, 10 ** p["amount"].decimals)
                           for p in counted), len(counted))  # fmt: skip
    return {
        "codes": [(p["event"].live_code, p["code"]) for p in seen],
        "windows": sorted(
            ((w["window"], w["start"], w["scope"], w["limit"], w["max"], w["mine"], w["live"])
             for w in windows.values()), key=repr,
        ),
    }  # fmt: skip


def fast(candidate: AgentPolicy, events: list[Any]) -> dict[str, Any]:
    report = replay("agent-1", candidate, events, since=T0, until=T0 + timedelta(days=30))
    codes = iter(report.changed)
    changed = next(codes, None)
    pairs = []
    for event in (e for e in events if isinstance(e, RecordedPayment)):
        if changed is not None and changed.at == event.at and changed.request is event.request:
            pairs.append((event.live_code, changed.candidate_code))
            changed = next(codes, None)
        else:
            pairs.append((event.live_code, event.live_code))
    total: dict[str, int] = {}
    for live, mine in pairs:
        total[mine.value] = total.get(mine.value, 0) + 1
        if flip_of(live, mine):
            assert report.flips[flip_of(live, mine)] >= 1  # type: ignore[index]
    assert dict(report.candidate_codes) == total
    assert report.payments == len(pairs)
    return {
        "codes": pairs,
        "windows": sorted(
            ((w.window, w.start, None if w.scope is None else (w.scope, w.group), w.limit,
             w.max_count, (Fraction(w.candidate.value, 10**w.candidate.decimals), w.candidate_count),
             (Fraction(w.live.value, 10**w.live.decimals), w.live_count))
            for w in report.windows), key=repr,
        ),
    }  # fmt: skip


# -- what hypothesis draws -------------------------------------------------------------------------

ROLLING = st.sampled_from(["10m", "1h", "24h"])
amounts = st.builds(lambda v, d: Amount(v * 10 ** max(0, d - 2), d, "USDT"),
                    st.integers(1, 100), st.sampled_from([2, 6]))  # fmt: skip


@st.composite
def candidates(draw: st.DrawFn) -> AgentPolicy:
    limits = SpendingLimits(
        hourly=draw(st.none() | amounts),
        daily=draw(st.none() | amounts),
        rolling=tuple({r.window: r for r in draw(st.lists(st.builds(
            RollingLimit, window=ROLLING, amount=amounts), max_size=2))}.values()),
        counts=tuple({c.window: c for c in draw(st.lists(st.builds(
            CountLimit, window=st.sampled_from(["daily", "1h"]), max=st.integers(1, 4)),
            max_size=2))}.values()),
    )  # fmt: skip
    scopes = ()
    if draw(st.booleans()):
        scopes = (ScopedLimit(
            name="vendors", match=ScopeMatch(categories=("data",)), group_by="recipient",
            limits=SpendingLimits(daily=draw(amounts), rolling=tuple(draw(st.lists(
                st.builds(RollingLimit, window=st.just("1h"), amount=amounts), max_size=1)))),
        ),)  # fmt: skip
    zone = draw(st.sampled_from([None, "UTC", "Asia/Kolkata"]))
    return AgentPolicy(limits=limits, scoped_limits=scopes,
                       time_rules=None if zone is None else TimeRules(timezone=zone))  # fmt: skip


@st.composite
def histories(draw: st.DrawFn) -> list[Any]:
    events: list[Any] = []
    pending: list[tuple[int, int, bool]] = []  # (after this many payments, payment, approval)
    at = T0
    for i in range(draw(st.integers(1, 14))):
        at += timedelta(seconds=draw(st.sampled_from([0, 1, 300, 1800, 3600, 7200])))
        for left, index, approval in list(pending):
            if left <= i:
                events.append(Freed(index, at, approval))
                pending.remove((left, index, approval))
        live = draw(st.sampled_from([Code.ALLOWED, Code.ALLOWED, Code.APPROVAL_REQUIRED,
                                     Code.DAILY_LIMIT]))  # fmt: skip
        request = PaymentRequest(
            "agent-1", draw(st.integers(1, 60)) * 10**4, draw(st.sampled_from(["0xa", "0xb"])),
            "eip155:1", category=draw(st.sampled_from([None, "data"])),
        )  # fmt: skip
        events.append(RecordedPayment(
            at, request, live,
            before=draw(st.sampled_from([None, None, None, Code.DELEGATION_REVOKED])),
            after=draw(st.sampled_from([None, None, None, Code.WEEKLY_LIMIT])),
            approval_elsewhere=draw(st.booleans()),
        ))  # fmt: skip
        if live in PASSING and draw(st.booleans()):
            pending.append((i + draw(st.integers(1, 3)), i, draw(st.booleans())))
    return events


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(candidate=candidates(), events=histories())
def test_the_replay_agrees_with_a_brute_force_model(
    candidate: AgentPolicy, events: list[Any]
) -> None:
    assert fast(candidate, events) == brute_force(candidate, events)


def test_the_replay_on_a_plain_history() -> None:
    def paid(minutes: int, units: int, live: Code = Code.ALLOWED, **more: Any) -> RecordedPayment:
        return RecordedPayment(T0 + timedelta(minutes=minutes), payment(units * U, **more), live)

    candidate = AgentPolicy(limits=SpendingLimits(daily=Amount(50 * U)))
    events = [
        paid(0, 30),
        paid(1, 30),  # the candidate would stop it
        Freed(1, T0 + timedelta(minutes=2)),  # ... so its release changes nothing for it
        paid(3, 10, Code.APPROVAL_REQUIRED),  # the candidate allows it at once
        Freed(2, T0 + timedelta(minutes=4), approval=True),  # refused live: still spent for it
        paid(5, 15, Code.DAILY_LIMIT),  # 40 + 15 > 50 (45 had the refusal freed it)
        paid(6, 10, Code.DAILY_LIMIT),  # denied live, allowed by the candidate: counted as spent
        paid(7, 1),
    ]
    report = replay("agent-1", candidate, events, since=T0, until=T0 + timedelta(hours=1))
    assert [(x.live_code, x.candidate_code, x.flip) for x in report.changed] == [
        (Code.ALLOWED, Code.DAILY_LIMIT, "allowed->denied"),
        (Code.APPROVAL_REQUIRED, Code.ALLOWED, "approval->allowed"),
        (Code.DAILY_LIMIT, Code.ALLOWED, "denied->allowed"),
        (Code.ALLOWED, Code.DAILY_LIMIT, "allowed->denied"),
    ]
    assert report.live == {"allowed": 3, "approval": 1, "denied": 2}
    assert report.candidate == {"allowed": 3, "approval": 0, "denied": 3}
    (day,) = report.windows
    assert (day.window, day.candidate, day.candidate_count) == ("daily", Amount(50 * U), 3)
    assert (day.live, day.live_count) == (Amount(31 * U), 2)  # 30 + 1; released and refused gone


# -- engine.simulate on every store ------------------------------------------------------------------


def test_simulate_replays_the_history_against_a_candidate_and_writes_nothing(
    backend: Backend,
) -> None:
    clock = ManualClock()
    engine = backend.engine(clock, reservation_ttl=timedelta(minutes=5))
    engine.set_policy("agent-1", {
        "limits": {"daily": {"value": str(100 * U)}},
        "approvalConfig": {"thresholds": [{"amount": {"value": str(60 * U)},
                                           "requiredApprovers": 1, "approvers": ["cfo"]}]},
    })  # fmt: skip
    engine.confirm(engine.authorize(payment(30 * U)).reservation_id or "")
    engine.release(engine.authorize(payment(30 * U)).reservation_id or "")
    engine.authorize(payment(30 * U))  # expires unconfirmed
    clock.advance(minutes=10)
    held = engine.authorize(payment(70 * U))
    approved = engine.decide(held.approval_id or "", "cfo", "approve")
    engine.confirm(approved.reservation_id or "")
    assert engine.authorize(payment(10 * U)).code == Code.DAILY_LIMIT
    assert engine.authorize(payment(65 * U)).code == Code.DAILY_LIMIT
    clock.advance(minutes=1)
    before = store_state(backend)

    tight = engine.simulate("agent-1", {"limits": {"daily": {"value": str(50 * U)}}},
                            since=timedelta(days=1))  # fmt: skip
    assert store_state(backend) == before
    assert tight.payments == 6
    assert dict(tight.live_codes) == {"ALLOWED": 3, "APPROVAL_REQUIRED": 1, "DAILY_LIMIT": 2}
    assert dict(tight.candidate_codes) == {"ALLOWED": 2, "DAILY_LIMIT": 4}
    assert dict(tight.flips) == {"allowed->denied": 2, "approval->denied": 1,
                                 "denied->allowed": 1}  # fmt: skip
    assert [x.request.amount // U for x in tight.changed] == [30, 30, 70, 10]
    (day,) = tight.windows
    assert (day.live, day.live_count) == (Amount(100 * U), 2)  # released and expired are gone
    assert (day.candidate, day.candidate_count) == (Amount(40 * U), 2)
    assert day.limit == Amount(50 * U)
    assert tight.notes == ()

    loose = engine.simulate("agent-1", {"limits": {"daily": {"value": str(1000 * U)}}},
                            since=clock.now - timedelta(hours=1))  # fmt: skip
    assert dict(loose.flips) == {"approval->allowed": 1, "denied->allowed": 2}
    assert (loose.windows[0].candidate, loose.windows[0].candidate_count) == (Amount(175 * U), 4)
    later = engine.simulate("agent-1", {"limits": {"daily": {"value": str(50 * U)}}},
                            since=clock.now)  # fmt: skip
    assert later.payments == 0


def test_simulate_a_budget_replays_the_payments_of_the_budgets_below_it(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("fleet", {"limits": {"daily": {"value": str(100 * U)}}})
    for bot in ("bot-1", "bot-2"):
        engine.set_policy(bot, {"parent": "fleet", "limits": {"daily": {"value": str(60 * U)}}})
    steps = [("bot-1", 50), ("bot-2", 50), ("bot-2", 10), ("bot-1", 70)]
    live = [engine.authorize(payment(n * U, agent_id=who)) for who, n in steps]
    assert [(d.code, d.budget_id) for d in live] == [
        (Code.ALLOWED, None), (Code.ALLOWED, None), (Code.DAILY_LIMIT, "fleet"),
        (Code.DAILY_LIMIT, "bot-1")]  # fmt: skip
    day = timedelta(days=1)
    fleet = engine.simulate("fleet", {"limits": {"daily": {"value": str(80 * U)}}}, since=day)
    assert fleet.payments == 4
    assert [(x.request.agent_id, x.live_code, x.candidate_code) for x in fleet.changed] == [
        ("bot-2", Code.ALLOWED, Code.DAILY_LIMIT),  # the fleet's candidate stops it
        ("bot-2", Code.DAILY_LIMIT, Code.ALLOWED),  # bot-2's own limit lets it through
    ]  # bot-1's 70 stays stopped by bot-1's own limit, checked before the fleet's
    bot = engine.simulate("bot-2", {"parent": "fleet", "limits": {"daily": {"value": str(100 * U)}}},
                          since=day)  # fmt: skip
    assert bot.payments == 2
    assert bot.changed == ()
    own = engine.simulate("bot-1", {"limits": {"daily": {"value": str(40 * U)}}}, since=day)
    assert [(x.live_code, x.candidate_code) for x in own.changed] == [
        (Code.ALLOWED, Code.DAILY_LIMIT)]  # fmt: skip


def test_simulate_says_what_history_no_longer_holds(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock, max_denials=100, history_retention=timedelta(days=7))
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "1"}}})
    for _ in range(170):
        engine.authorize(payment(2))  # denied, more than the log keeps
    report = engine.simulate("agent-1", {"limits": {"daily": {"value": "1000"}}},
                             since=timedelta(days=30))  # fmt: skip
    assert report.payments <= 100 + 64  # (SQLite trims in steps)
    assert any("history is kept for 7 days" in n for n in report.notes)
    assert any("denied payments of agent-1 are kept" in n for n in report.notes)


def test_simulate_checks_its_input(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    with pytest.raises(PolicyError) as err:
        engine.simulate("agent-1", {}, since=timedelta(days=1))
    assert err.value.code == "NO_POLICY"
    engine.set_policy("agent-1", {})
    with pytest.raises(PolicyError) as err:
        engine.simulate("agent-1", {"limits": 5}, since=timedelta(days=1))
    assert (err.value.code, err.value.path) == ("INVALID_INPUT", "$.policy.limits")
    with pytest.raises(PolicyError) as err:
        engine.simulate("agent-1", {}, since=datetime(2026, 1, 1))
    assert (err.value.code, err.value.path) == ("INVALID_INPUT", "$.since")
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("agent-1", {})
    later = clock.now + timedelta(microseconds=1)  # a report 'from 2999 to 2026' ran backwards
    with pytest.raises(PolicyError) as err:
        engine.simulate("agent-1", {}, since=later)
    assert (err.value.code, err.value.path) == ("INVALID_INPUT", "$.since")
    assert "must not be after now" in err.value.message
    assert engine.simulate("agent-1", {}, since=clock.now).payments == 0  # now itself: empty
