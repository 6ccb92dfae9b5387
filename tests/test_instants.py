"""Instants as microseconds: exact, whatever the zone, and the same when asked again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from agentpolicy.storage._time import instant, micros

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ZONES = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
_INSTANTS = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=_ZONES
)


def _plainly(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)


@given(st.lists(_INSTANTS, min_size=1, max_size=8), st.lists(st.integers(0, 7), max_size=20))
def test_micros_is_exact_for_every_instant_asked_in_any_order(
    instants: list[datetime], order: list[int]
) -> None:
    # asked in turn, again at once (the very same object), and as an equal instant of
    # another zone: the last conversion kept may never answer for another instant
    for i in [*range(len(instants)), *order]:
        when = instants[i % len(instants)]
        expected = _plainly(when)
        assert micros(when) == expected
        assert micros(when) == expected
        assert micros(when.astimezone(UTC)) == expected
        assert instant(expected) == when
