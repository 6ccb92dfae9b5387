"""What confirm and release report: the request the ledger holds, never a stale copy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agentpolicy import PolicyEngine, ReservationStatus
from agentpolicy import engine as engine_module
from agentpolicy.ledger import keys
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment

DAILY = {"limits": {"daily": {"value": str(10**12)}}}


def make() -> tuple[PolicyEngine, MemoryStorage]:
    storage = MemoryStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY)
    return engine, storage


def test_a_stored_request_that_differs_from_the_authorized_one_is_the_one_reported() -> None:
    # the engine keeps the request it authorized to report it on confirm, but only while the
    # ledger holds that very request: a document changed underneath (a restored backup, a
    # repair by hand) is reported as stored
    engine, storage = make()
    rid = engine.authorize(payment(5, memo="as asked")).reservation_id
    assert rid is not None
    shard = storage._shards["agent-1"]
    name = keys.reservation(rid)
    version, doc = shard.docs[name]
    shard.docs[name] = (version, {**doc, "req": {**doc["req"], "memo": "as stored"}})
    reservation = engine.confirm(rid)
    assert reservation.status is ReservationStatus.CONFIRMED
    assert reservation.request.memo == "as stored"


def test_requests_kept_for_unsettled_reservations_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "_HANDOFFS", 3)
    engine, _ = make()
    rids = [engine.authorize(payment(1, memo=str(i))).reservation_id for i in range(10)]
    assert len(engine._requests) <= 3
    for i, rid in enumerate(rids):  # reported all the same, kept or not
        assert rid is not None
        assert engine.release(rid).request == payment(1, memo=str(i))
    assert engine._requests == {}


def test_a_subclassed_request_is_reported_as_a_plain_request() -> None:
    class Tagged(type(payment(1))):  # type: ignore[misc]
        pass

    engine, _ = make()
    mine = payment(1)
    tagged = Tagged(agent_id=mine.agent_id, amount=1, recipient=mine.recipient,
                    network=mine.network)  # fmt: skip
    rid = engine.authorize(tagged).reservation_id
    assert rid is not None
    reported = engine.confirm(rid).request
    assert type(reported) is type(mine)
    assert reported == mine


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin"])
def test_a_settled_reservation_reports_its_instants_in_utc_whatever_the_clock(zone: str) -> None:
    start = datetime(2026, 1, 19, 10, 0, 0, 123456, tzinfo=UTC).astimezone(ZoneInfo(zone))
    clock = ManualClock(start if zone != "UTC" else start.replace(tzinfo=UTC))
    engine = PolicyEngine(storage=MemoryStorage(), clock=clock)
    engine.set_policy("agent-1", DAILY)
    decision = engine.authorize(payment(5))
    assert decision.reservation_id is not None
    clock.advance(seconds=7)
    confirmed = engine.confirm(decision.reservation_id)
    again = engine.confirm(decision.reservation_id)  # read back from the ledger alone
    assert confirmed == again
    for field in ("created_at", "expires_at", "updated_at"):
        assert getattr(confirmed, field).tzinfo is UTC, field
        assert getattr(confirmed, field).isoformat() == getattr(again, field).isoformat()
    assert confirmed.created_at == start
    assert confirmed.expires_at == decision.expires_at
    assert confirmed.updated_at == start + timedelta(seconds=7)
