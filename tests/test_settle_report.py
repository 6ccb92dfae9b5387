"""What confirm and release report: the request the ledger holds, never a stale copy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agentpolicy import PolicyEngine, ReservationStatus
from agentpolicy import engine as engine_module
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import reservation_record
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


def test_reservations_of_an_hour_share_their_targets_and_report_their_own_windows() -> None:
    # the targets of a reservation (the counters it counts in) are one tuple for every
    # reservation of a book in an hour; the window keys read from them are worked out once
    engine, storage = make()
    engine.set_policy("agent-2", DAILY)
    first, second, other = (
        engine.authorize(payment(1, agent_id=agent)).reservation_id
        for agent in ("agent-1", "agent-1", "agent-2")
    )
    assert None not in (first, second, other)
    doc = storage._shards["agent-1"].docs[keys.reservation(first)][1]
    assert doc["tg"] is storage._shards["agent-1"].docs[keys.reservation(second)][1]["tg"]
    expected = tuple(w.key for w in engine.authorize(payment(1), dry_run=True).windows)
    assert engine.confirm(first).window_keys == expected
    assert engine.confirm(second).window_keys == expected
    assert engine.confirm(other).window_keys == expected  # another agent's own book


def test_window_keys_are_the_readers_own_whatever_was_read_before() -> None:
    # targets read back as lists (another process, a JSON store) and the same targets under
    # another agent's id: each answers the keys of the agent's own book
    targets = (("h/a", "usdt|daily:1", "c", 0), ("h/b", "usdt|daily:2", "c", 0),
               ("h/a", "usdt|roll:60", "r", 60))  # fmt: skip
    doc = {"agent": "a", "st": "reserved", "req": {"agentId": "a", "amount": "1",
           "recipient": "0xabc", "network": "eip155:8453", "decimals": 6, "symbol": "USDT"},
           "tg": targets, "c": 0, "x": 1, "u": 0, "pv": 1, "apr": None}  # fmt: skip
    assert reservation_record("res_x", doc).window_keys == ("daily:1",)
    assert reservation_record("res_x", {**doc, "agent": "b"}).window_keys == ("daily:2",)
    as_lists = {**doc, "tg": [list(t) for t in targets]}
    assert reservation_record("res_x", as_lists).window_keys == ("daily:1",)
