from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agentpolicy import Code, PolicyValidationError
from agentpolicy.codec import decode, encode
from agentpolicy.records import ReservationStatus
from agentpolicy.testing import DEFAULT_START, ManualClock, engine_with_policy, payment


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock()
    assert clock() == clock.now == DEFAULT_START
    assert clock.advance(minutes=5) == DEFAULT_START + timedelta(minutes=5)
    assert clock.advance(timedelta(hours=1)) == DEFAULT_START + timedelta(minutes=65)
    clock.set(datetime(2030, 1, 1, tzinfo=UTC))
    assert clock() == datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="aware"):
        clock.set(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        ManualClock(datetime(2030, 1, 1))


def test_engine_with_policy_and_payment_shortcuts() -> None:
    engine, clock = engine_with_policy({"limits": {"daily": {"value": "1000000"}}})
    assert engine.clock is clock
    assert engine.authorize(payment()).code == Code.ALLOWED
    assert engine.authorize(payment()).code == Code.DAILY_LIMIT


def test_stored_enums_are_read_back_strictly() -> None:
    assert decode(encode(ReservationStatus.HELD), ReservationStatus) is ReservationStatus.HELD
    with pytest.raises(PolicyValidationError, match="must be one of"):
        decode('"lost"', ReservationStatus)
    with pytest.raises(PolicyValidationError, match="not JSON"):
        decode("{", ReservationStatus)
