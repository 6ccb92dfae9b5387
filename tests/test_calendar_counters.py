"""Calendar counters move as their rule says, whatever the decimals and the stored shape.

``Book.calendars`` is checked against the rule written out plainly, for counters
of every stored shape (four fields from 0.1, five, six with fired alerts) and a
book copied or not: reserve adds the amount and one payment to what the
window used, release takes both back, settle changes nothing (an amount is
used from its reserve on; counters written before kept spent and reserved
apart, and are written as their sum when they next change); nothing goes
below zero; amounts in other decimals are brought to the finer of the two
exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agentpolicy import Amount, PolicyEngine
from agentpolicy.ledger.tallies import Book
from agentpolicy.storage._time import micros
from agentpolicy.testing import ManualClock, payment
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
    if op == "settle":
        return c
    if c is None:
        return None if op != "reserve" else [micros(_END), decimals, value, 0, 1]
    d = max(c[1], decimals)
    used = (c[2] + c[3]) * 10 ** (d - c[1])
    amount = value * 10 ** (d - decimals)
    count = c[4] if len(c) > 4 else 0
    if op == "reserve":
        used, count = used + amount, count + 1
    else:
        used, count = max(0, used - amount), max(0, count - 1)
    return [c[0], d, used, 0, count, *c[5:]]


@given(
    counter=_counters,
    others=st.lists(_counters.filter(lambda c: c is not None), max_size=3),
    value=_units,
    decimals=_decimals,
    op=st.sampled_from(["reserve", "unreserve", "settle"]),
    earliest=st.sampled_from([None, -1, 0, 1]),  # the book's earliest end, beside the window's
    copied=st.booleans(),
)
@example(  # a counter begun before the book's earliest end, the book not copied yet
    counter=None, others=[], value=5, decimals=6, op="reserve", earliest=1, copied=False
)
def test_a_calendar_counter_moves_by_its_rule(
    counter: list[Any] | None,
    others: list[list[Any]],
    value: int,
    decimals: int,
    op: str,
    earliest: int | None,
    copied: bool,
) -> None:
    end = micros(_END)
    stored = {f"usdt|other{i}": c for i, c in enumerate(others)}
    if counter is not None:
        stored["usdt|daily"] = counter
    read: dict[str, Any] = {"c": dict(stored)}
    if earliest is not None:
        read["pe"] = end + earliest * 3_600_000_000
    book = Book("h/agent", read, {"c": {}})
    if copied:  # something earlier in the step changed the book already
        book.own()
    book.calendars([("usdt|daily", _WINDOW)], value, decimals, op)
    expected = _expected(counter, value, decimals, op)
    assert book.body["c"].get("usdt|daily") == expected
    assert {k: v for k, v in book.body["c"].items() if k != "usdt|daily"} == {
        k: v for k, v in stored.items() if k != "usdt|daily"
    }
    begun = counter is None and op == "reserve"
    lowered = begun and earliest is not None and end < read["pe"]
    assert book.body.get("pe") == (end if lowered else read.get("pe"))
    # the document read is never changed in place
    assert read["c"] == stored
    assert read.get("pe") == (None if earliest is None else end + earliest * 3_600_000_000)
    assert book.changed is (copied or (counter is not None and op != "settle") or begun)


def test_a_counter_released_without_its_window_is_not_begun_again() -> None:
    book = Book("h/agent", {"c": {}}, {"c": {}})
    book.calendars([("usdt|daily", None)], 5, 6, "unreserve")
    book.calendars([("usdt|daily", None)], 5, 6, "reserve")
    assert book.body == {"c": {}}
    assert not book.changed


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_counter_begun_before_the_books_earliest_end_counts(kind: str, tmp_path: Path) -> None:
    # an idle agent whose hourly counter was pruned keeps its daily one, so the book's
    # earliest end is the day's; the next payment begins an hourly counter that ends sooner,
    # and must count in it (it once went into the document read, and the limit let a second
    # payment through)
    clock = ManualClock(datetime(2026, 12, 3, 10, 30, tzinfo=UTC))
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'a.db'}"
    engine = PolicyEngine(storage=url, clock=clock)
    engine.set_policy(
        "a", {"limits": {"hourly": {"value": "1000000"}, "daily": {"value": "100000000"}}}
    )
    assert engine.authorize(payment(1_000_000, agent_id="a")).allowed
    clock.advance(hours=2, minutes=1)  # past the hour's end and the counter grace
    engine.budget("a")  # a read that prunes the ended hour's counter
    assert engine.authorize(payment(1_000_000, agent_id="a")).allowed
    assert engine.authorize(payment(1_000_000, agent_id="a")).code == "HOURLY_LIMIT"
    hourly = engine.budget("a").periods[Period.HOURLY]
    assert hourly.reserved == Amount(1_000_000)
