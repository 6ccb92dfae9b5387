"""Dry runs on every store: authorize's answer and the headroom left, with nothing written."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import AgentPolicy, Amount, Code, ConflictError, PolicyEngine, PolicyError
from agentpolicy.rules import assess, headroom, judge
from agentpolicy.storage import SQLiteStorage, open_storage
from agentpolicy.testing import ManualClock, payment
from tests import strategies
from tests.backends import Backend
from tests.snapshots import store_state

U = 1_000_000
POLICY = {
    "limits": {
        "daily": {"value": str(200 * U)},
        "rolling": [{"window": "1h", "amount": {"value": str(100 * U)}}],
        "counts": [{"window": "daily", "max": 3}],
    },
    "scopedLimits": [{"name": "vendors", "match": {"categories": ["data"]}, "groupBy": "recipient",
                      "limits": {"daily": {"value": str(40 * U)}}}],
    "approvalConfig": {"thresholds": [{"amount": {"value": str(45 * U)}, "requiredApprovers": 1,
                                       "approvers": ["admin@company.com"]}]},
}  # fmt: skip
HOOK = [{"url": "http://127.0.0.1:9/hook", "secret": "s" * 32}]  # nothing listens: never reached


def rows(d: Any) -> list[tuple[Any, ...]]:
    return [(h.budget_id, h.kind, h.window, h.scope, h.group,
             h.used.value if h.used else h.count,
             h.remaining.value if h.remaining else h.remaining_count, h.fits)
            for h in d.headroom]  # fmt: skip


def test_a_dry_run_answers_what_authorize_would_and_writes_nothing(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock, webhook_endpoints=HOOK, webhook_backoff=3600.0)
    engine.set_policy("agent-1", POLICY)
    engine.confirm(engine.authorize(payment(30 * U, category="data")).reservation_id or "")
    before = store_state(backend)
    history = engine.history("agent-1")

    d = engine.authorize(payment(10 * U, category="data"), dry_run=True)
    assert (d.code, d.dry_run, d.reservation_id, d.expires_at) == (Code.ALLOWED, True, None, None)
    assert d.policy_version == 1
    assert rows(d) == [
        ("agent-1", "amount", "daily", None, None, 30 * U, 160 * U, True),
        ("agent-1", "amount", "1h", None, None, 30 * U, 60 * U, True),
        ("agent-1", "count", "daily", None, None, 1, 1, True),
        ("agent-1", "amount", "daily", "vendors", "0xvendor", 30 * U, 0, True),
    ]
    start = clock.now.replace(hour=0)
    assert (d.headroom[0].window_start, d.headroom[0].window_end) == (
        start, start + timedelta(days=1))  # fmt: skip
    held = engine.authorize(payment(45 * U), dry_run=True)
    assert (held.code, held.approval_id, held.requires_approval) == (
        Code.APPROVAL_REQUIRED, None, True)  # fmt: skip
    over = engine.authorize(payment(80 * U), dry_run=True)
    assert (over.code, over.allowed) == (Code.ROLLING_LIMIT, False)
    assert [h.fits for h in over.headroom] == [True, False, True]

    assert store_state(backend) == before  # no reservation, hold, history, event, key
    assert engine.history("agent-1") == history
    assert engine.webhook_deliveries() == []
    real = engine.authorize(payment(10 * U, category="data"))
    assert (real.code, real.evaluations) == (d.code, d.evaluations)
    assert real.reservation_id is not None
    assert not real.dry_run
    assert real.headroom == ()
    engine.authorize(payment(45 * U))
    assert len(engine.webhook_deliveries()) == 1  # a real approval does write its event
    engine.close()


def test_the_scope_in_a_dry_run_counts_only_what_it_matches(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", POLICY)
    engine.confirm(engine.authorize(payment(30 * U, category="data")).reservation_id or "")
    d = engine.authorize(payment(15 * U, category="data", recipient="0xother"), dry_run=True)
    scope = [h for h in d.headroom if h.scope == "vendors"]
    assert [(h.group, h.used, h.remaining, h.fits) for h in scope] == [
        ("0xother", Amount(0), Amount(25 * U), True)]  # fmt: skip
    same = engine.authorize(payment(15 * U, category="data"), dry_run=True)
    assert (same.code, same.budget_id) == (Code.SCOPED_LIMIT, "agent-1")
    assert [h.remaining for h in same.headroom if h.scope] == [Amount(0)]


def test_a_dry_run_applies_due_expiries_and_ended_windows_in_memory_only(
    backend: Backend,
) -> None:
    clock = ManualClock()
    engine = backend.engine(clock, reservation_ttl=timedelta(minutes=5))
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(100 * U)},
                                             "rolling": [{"window": "1h",
                                                          "amount": {"value": str(50 * U)}}]}})  # fmt: skip
    engine.confirm(engine.authorize(payment(40 * U)).reservation_id or "")
    engine.authorize(payment(10 * U))  # reserved, never confirmed
    clock.advance(hours=1)  # the reservation is due and the 1h window has moved on
    before = store_state(backend)
    d = engine.authorize(payment(50 * U), dry_run=True)
    assert d.allowed
    assert rows(d) == [
        ("agent-1", "amount", "daily", None, None, 40 * U, 10 * U, True),
        ("agent-1", "amount", "1h", None, None, 0, 0, True),
    ]
    assert store_state(backend) == before  # the expiry and the window were computed, not kept
    clock.advance(hours=23)  # a new day
    assert rows(engine.authorize(payment(50 * U), dry_run=True))[0][5] == 0
    assert store_state(backend) == before
    assert engine.authorize(payment(50 * U)).allowed


def test_a_dry_run_of_a_childs_payment_reports_every_budget_above(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("fleet", {"limits": {"daily": {"value": str(100 * U)}}})
    for bot in ("bot-1", "bot-2"):
        engine.set_policy(bot, {"parent": "fleet", "limits": {"daily": {"value": str(60 * U)}}})
    engine.confirm(engine.authorize(payment(50 * U, agent_id="bot-2")).reservation_id or "")
    before = store_state(backend)
    d = engine.authorize(payment(60 * U, agent_id="bot-1"), dry_run=True)
    assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, "fleet")
    assert [(h.budget_id, h.used, h.remaining, h.fits) for h in d.headroom] == [
        ("bot-1", Amount(0), Amount(0), True),
        ("fleet", Amount(50 * U), Amount(0), False),
    ]
    assert store_state(backend) == before


def test_idempotency_keys_and_dry_runs(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("agent-1", POLICY)
    engine.authorize(payment(5 * U, idempotency_key="k"), dry_run=True)
    first = engine.authorize(payment(6 * U, idempotency_key="k"))  # the key was still unused
    assert first.allowed
    again = engine.authorize(payment(6 * U, idempotency_key="k"), dry_run=True)
    assert (again.dry_run, again.reservation_id, again.headroom) == (
        True, first.reservation_id, ())  # fmt: skip
    with pytest.raises(ConflictError) as err:
        engine.authorize(payment(7 * U, idempotency_key="k"), dry_run=True)
    assert err.value.code == "IDEMPOTENCY_CONFLICT"


def test_dry_run_checks_its_input(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(1), dry_run="yes")  # type: ignore[arg-type]
    assert (err.value.code, err.value.path) == ("INVALID_INPUT", "$.dryRun")
    nobody = engine.authorize(payment(1, agent_id="nobody"), dry_run=True)
    assert (nobody.code, nobody.headroom) == (Code.NO_POLICY, ())


# -- no write lock --------------------------------------------------------------------------------


def test_a_dry_run_on_sqlite_takes_no_write_lock(tmp_path: Any) -> None:
    path = tmp_path / "p.db"
    clock = ManualClock()
    with PolicyEngine(storage=SQLiteStorage(path), clock=clock) as engine:
        engine.set_policy("agent-1", POLICY)
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # another process holds the one write lock
        try:
            started = time.monotonic()
            assert engine.authorize(payment(U), dry_run=True).allowed
            # it never waited for the lock (a wait is the 5 s busy timeout, then a failure)
            assert time.monotonic() - started < 4
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    busy = SQLiteStorage(path, busy_timeout=timedelta(milliseconds=50), busy_retries=1)
    with PolicyEngine(storage=busy, clock=clock) as engine:
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:  # the contrast: a real authorize needs the lock
            with pytest.raises(PolicyError) as err:
                engine.authorize(payment(U))
            assert err.value.code == "STORAGE_UNAVAILABLE"
        finally:
            writer.execute("ROLLBACK")
            writer.close()


def test_a_dry_run_on_postgres_takes_no_row_lock(pg_schema: str) -> None:
    import psycopg

    engine = PolicyEngine(storage=open_storage(pg_schema), clock=ManualClock())
    engine.set_policy("agent-1", POLICY)
    schema = pg_schema.rpartition("schema=")[2]
    holder = psycopg.connect(pg_schema.partition("?")[0])
    holder.execute(f'SELECT 1 FROM "{schema}".shards WHERE shard = %s FOR UPDATE', ("agent-1",))
    done: dict[str, Any] = {}

    def call(name: str, dry: bool) -> None:
        done[name] = engine.authorize(payment(U), dry_run=dry)

    dry = threading.Thread(target=call, args=("dry", True))
    real = threading.Thread(target=call, args=("real", False))
    dry.start()
    real.start()
    dry.join(10)
    time.sleep(0.3)
    assert done["dry"].allowed  # answered while another transaction holds the agent's row
    assert "real" not in done  # a real authorize waits for the row
    holder.rollback()
    holder.close()
    real.join(10)
    assert done["real"].reservation_id is not None
    engine.close()


# -- headroom, pure ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    policy=strategies.policies(),
    request=strategies.requests(),
    used=strategies.usage_amounts(),
    count=st.integers(0, 5),
)
def test_headroom_says_fits_exactly_where_judge_passes_the_limit(
    policy: AgentPolicy, request: Any, used: Amount, count: int
) -> None:
    a = assess(policy, request, datetime(2026, 3, 10, 12, tzinfo=UTC))
    usage = {t.usage_key: (used.value, used.decimals, count) for t in a.tallies}
    verdict = judge(a, usage)
    rooms = headroom(a, usage)
    failed = [c for c in verdict.checks if c[1] == "fail" and c[0].endswith(("_limit", "]"))
              and not c[0].startswith("per_transaction")]  # fmt: skip
    assert len([r for r in rooms if not r.fits]) == len(failed)
    for r in rooms:
        if r.kind == "count":
            assert r.count == count
            assert r.remaining_count == max(0, (r.max_count or 0) - count - 1)
            continue
        assert r.limit is not None
        assert r.used is not None
        assert r.remaining is not None
        if r.fits and used.decimals <= r.limit.decimals and request.decimals <= r.limit.decimals:
            assert r.used.value + request.asset_amount.scaled_to(r.limit.decimals) + \
                r.remaining.value == r.limit.value  # fmt: skip
        if not r.fits:
            assert r.remaining.value == 0


def test_a_dry_run_names_the_token_whose_payments_each_count_limit_counts() -> None:
    import io

    from agentpolicy.cli_output import print_decision
    from agentpolicy.views import decision_data, headroom_data

    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("a", {"limits": {"counts": [{"window": "daily", "max": 5}]}, "assets": [
        {"symbol": "USDC", "limits": {"daily": {"value": str(100 * U), "symbol": "USDC"},
                                      "counts": [{"window": "daily", "max": 3}]}}]})  # fmt: skip
    d = engine.authorize(payment(U, agent_id="a", symbol="USDC"), dry_run=True)
    # two daily counts, told apart: USDC's own and every token's
    assert sorted((h.kind, h.symbol or "", h.max_count or 0) for h in d.headroom) == [
        ("amount", "USDC", 0), ("count", "", 5), ("count", "USDC", 3),
    ]  # fmt: skip
    counts = [headroom_data(h) for h in d.headroom if h.kind == "count"]
    assert sorted((c["max"], c.get("symbol")) for c in counts) == [(3, "USDC"), (5, None)]
    out = io.StringIO()
    print_decision(decision_data(d), out)
    assert "0 of 3 USDC payments; 2 left after this one" in out.getvalue()
    assert "0 of 5 payments; 4 left after this one" in out.getvalue()
