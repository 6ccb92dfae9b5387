"""Calendar counters move as their rule says, whatever the decimals and the stored shape.

``Book.calendars`` takes a quick path for the common counter (five fields, the
payment's decimals); this checks it, and the general path, against the rule
written out plainly: reserve adds the amount and one payment, release takes
both back, settle moves the amount from reserved to spent; nothing goes below
zero; amounts in other decimals are brought to the finer of the two exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agentpolicy.ledger.tallies import Book
from agentpolicy.storage._time import micros
from agentpolicy.windows import Period, Window

_END = datetime(2026, 12, 4, tzinfo=UTC)
_WINDOW = Window(Period.DAILY, "daily:2026-12-03", _END - timedelta(days=1), _END)

_units = st.integers(0, 10**30)
_decimals = st.integers(0, 18)
_counters = st.one_of(
    st.none(),  # no counter yet
    st.tuples(_decimals, _units, _units),  # written by 0.1: no count
    st.tuples(_decimals, _units, _units, st.integers(0, 50)),
    st.tuples(
        _decimals,
        _units,
        _units,
        st.integers(0, 50),
        st.lists(st.sampled_from([50, 80, 100]), unique=True),
    ),  # alerts fired
).map(lambda v: None if v is None else [micros(_END), *v])


def _expected(c: list[Any] | None, value: int, decimals: int, op: str) -> list[Any] | None:
    if c is None:
        return None if op != "reserve" else [micros(_END), decimals, 0, value, 1]
    d = max(c[1], decimals)
    spent, reserved = c[2] * 10 ** (d - c[1]), c[3] * 10 ** (d - c[1])
    amount = value * 10 ** (d - decimals)
    count = c[4] if len(c) > 4 else 0
    if op == "reserve":
        reserved, count = reserved + amount, count + 1
    else:
        reserved = max(0, reserved - amount)
        if op == "unreserve":
            count = max(0, count - 1)
        else:
            spent += amount
    return [c[0], d, spent, reserved, count, *c[5:]]


@given(
    counter=_counters,
    value=_units,
    decimals=_decimals,
    op=st.sampled_from(["reserve", "unreserve", "settle"]),
)
def test_a_calendar_counter_moves_by_its_rule(
    counter: list[Any] | None, value: int, decimals: int, op: str
) -> None:
    read = {"c": {} if counter is None else {"usdt|daily": counter}, "pe": micros(_END)}
    book = Book("h/agent", read, {"c": {}})
    book.calendars([("usdt|daily", _WINDOW)], value, decimals, op)
    assert book.body["c"].get("usdt|daily") == _expected(counter, value, decimals, op)
    # the document read is never changed in place
    assert read["c"] == ({} if counter is None else {"usdt|daily": counter})
    assert book.changed is (counter is not None or op == "reserve")


def test_a_counter_released_without_its_window_is_not_begun_again() -> None:
    book = Book("h/agent", {"c": {}}, {"c": {}})
    book.calendars([("usdt|daily", None)], 5, 6, "unreserve")
    book.calendars([("usdt|daily", None)], 5, 6, "reserve")
    assert book.body == {"c": {}}
    assert not book.changed
