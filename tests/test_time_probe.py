"""Time correctness, probed against an oracle of our own.

The oracle below reads a zone's transitions from the pure-Python
``zoneinfo`` implementation (its transition list and the POSIX rule after
it) and works out each window with plain datetime arithmetic: a window is
the longest stretch over which the local calendar unit (date and hour with
its offset, date, ISO week, month, year) stays the same. It never calls
agentpolicy's window code. The engine is then driven with a ManualClock
across clock changes and the exact totals allowed are checked against the
limits, window by window.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import zoneinfo
import zoneinfo._zoneinfo as pure_zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import PolicyEngine
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from agentpolicy.windows import Period, window_at

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
U = 1_000_000  # one USDT in base units
TICK = timedelta(microseconds=1)
NY = ZoneInfo("America/New_York")

HARD_ZONES = [
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Pacific/Apia",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
    "America/Sao_Paulo",
    "America/Havana",
    "Antarctica/Troll",
    "Africa/Casablanca",
    "America/St_Johns",
    "UTC",
]
PERIODS = ["hourly", "daily", "weekly", "monthly", "yearly"]

# -- the oracle ---------------------------------------------------------------------------


@functools.cache
def _transitions(name: str) -> tuple[list[int], list[int], int]:
    """UTC seconds of each transition, the offset (seconds) after it, and the one before all."""
    z: Any = pure_zoneinfo.ZoneInfo.no_cache(name)
    pairs = [
        (int(ts), int(tti.utcoff.total_seconds()))
        for ts, tti in zip(z._trans_utc, z._ttinfos, strict=False)
    ]
    after = z._tz_after
    if isinstance(after, pure_zoneinfo._TZStr):  # type: ignore[attr-defined]
        last = pairs[-1][0] if pairs else -(10**12)
        std, dst = int(after.std.utcoff.total_seconds()), int(after.dst.utcoff.total_seconds())
        for year in range(1970, 2102):
            on, off = after.transitions(year)  # local standard / daylight time of the changes
            for ts, offset in ((on - std, dst), (off - dst, std)):
                if ts > last:
                    pairs.append((ts, offset))
        pairs.sort()
        first = pairs[0][1] if z._tti_before is None else int(z._tti_before.utcoff.total_seconds())
    elif not pairs:
        first = int(after.utcoff.total_seconds())
    else:
        first = int(z._tti_before.utcoff.total_seconds()) if z._tti_before else pairs[0][1]
    return [ts for ts, _ in pairs], [off for _, off in pairs], first


def _offset(name: str, u: datetime) -> int:
    times, offsets, first = _transitions(name)
    i = bisect.bisect_right(times, (u - EPOCH) // timedelta(seconds=1)) - 1
    return first if i < 0 else offsets[i]


def _label(period: str, name: str, u: datetime) -> object:
    off = _offset(name, u)
    wall = (u + timedelta(seconds=off)).replace(tzinfo=None)
    day = wall.date()
    if period == "hourly":
        return day, wall.hour, off
    if period == "daily":
        return day
    if period == "weekly":
        return day.toordinal() - day.weekday()
    if period == "monthly":
        return day.year, day.month
    return day.year


_SPAN = {
    "hourly": timedelta(hours=3),
    "daily": timedelta(days=2),
    "weekly": timedelta(days=8),
    "monthly": timedelta(days=33),
    "yearly": timedelta(days=368),
}


def _unit_starts(period: str, lo: datetime, hi: datetime) -> Iterator[datetime]:
    """Naive wall-clock starts of the period's units in ``[lo, hi]``."""
    if period == "hourly":
        wall = lo.replace(minute=0, second=0, microsecond=0)
    elif period == "daily":
        wall = datetime.combine(lo.date(), time())
    elif period == "weekly":
        wall = datetime.combine(lo.date() - timedelta(days=lo.weekday()), time())
    elif period == "monthly":
        wall = datetime(lo.year, lo.month, 1)
    else:
        wall = datetime(lo.year, 1, 1)
    while wall <= hi:
        if wall >= lo:
            yield wall
        if period == "hourly":
            wall += timedelta(hours=1)
        elif period == "daily":
            wall += timedelta(days=1)
        elif period == "weekly":
            wall += timedelta(days=7)
        elif period == "monthly":
            wall = datetime(wall.year + wall.month // 12, wall.month % 12 + 1, 1)
        else:
            wall = datetime(wall.year + 1, 1, 1)


def oracle(period: str, name: str, instant: datetime) -> tuple[datetime, datetime, str]:
    """The (start, end, key) of the window of ``period`` containing ``instant`` in zone ``name``."""
    t = instant.astimezone(UTC)
    lo, hi = t - _SPAN[period], t + _SPAN[period]
    times, _, _ = _transitions(name)
    cuts = [
        EPOCH + timedelta(seconds=ts)
        for ts in times[bisect.bisect_left(times, (lo - EPOCH).total_seconds()) :]
    ]
    cuts = [c for c in cuts if c <= hi]
    candidates = set(cuts)
    edges = [lo, *cuts, hi]
    for a, b in itertools.pairwise(edges):
        if b <= a:
            continue
        off = timedelta(seconds=_offset(name, a))
        for wall in _unit_starts(
            period, (a + off).replace(tzinfo=None), (b + off).replace(tzinfo=None)
        ):
            candidates.add(wall.replace(tzinfo=UTC) - off)
    bounds = sorted(
        c for c in candidates if _label(period, name, c - TICK) != _label(period, name, c)
    )
    start = max(c for c in bounds if c <= t)
    end = min(c for c in bounds if c > t)
    local = start.astimezone(timezone(timedelta(seconds=_offset(name, start))))
    return start, end, f"{period}:{local.isoformat()}"


def lib(period: str, name: str, instant: datetime) -> tuple[datetime, datetime, str]:
    w = window_at(Period(period), instant, ZoneInfo(name))
    return w.start, w.end, w.key


@st.composite
def near_a_change(draw: st.DrawFn, since: int = 1900) -> tuple[str, datetime]:
    name = draw(st.sampled_from(HARD_ZONES))
    times, _, _ = _transitions(name)
    lo = (datetime(since, 1, 4, tzinfo=UTC) - EPOCH).total_seconds()
    hi = (datetime(2090, 1, 1, tzinfo=UTC) - EPOCH).total_seconds()
    usable = [ts for ts in times if lo <= ts <= hi]
    if not usable:
        return name, draw(_anywhere.filter(lambda t: t.year >= since))
    ts = draw(st.sampled_from(usable))
    shift = draw(
        st.sampled_from([0, -1, 1, -60_000_000, 30 * 60_000_000, -45 * 60_000_000])
        | st.integers(-3 * 86_400_000_000, 3 * 86_400_000_000)
    )
    return name, EPOCH + timedelta(seconds=ts, microseconds=shift)


_anywhere = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)


# -- the windows against the oracle -------------------------------------------------------


def test_the_oracle_agrees_with_hand_worked_windows() -> None:
    # New York's fall-back day is 25 hours; its repeated 01:00 hours are two windows
    start, end, key = oracle("daily", "America/New_York", datetime(2026, 11, 1, 12, tzinfo=UTC))
    assert (start, end) == (
        datetime(2026, 11, 1, 4, tzinfo=UTC),
        datetime(2026, 11, 2, 5, tzinfo=UTC),
    )
    assert key == "daily:2026-11-01T00:00:00-04:00"
    assert oracle("hourly", "America/New_York", datetime(2026, 11, 1, 6, 30, tzinfo=UTC))[2] == (
        "hourly:2026-11-01T01:00:00-05:00"
    )
    # Apia skipped Friday 30 December 2011: Thursday ends at 10:00 UTC and Saturday begins
    start, end, key = oracle("daily", "Pacific/Apia", datetime(2011, 12, 30, 9, tzinfo=UTC))
    assert end == datetime(2011, 12, 30, 10, tzinfo=UTC)
    assert key == "daily:2011-12-29T00:00:00-10:00"
    # Kathmandu's day starts at 18:15 UTC
    assert oracle("daily", "Asia/Kathmandu", datetime(2026, 5, 5, tzinfo=UTC))[0] == datetime(
        2026, 5, 4, 18, 15, tzinfo=UTC
    )


@settings(max_examples=250, deadline=None)
@given(near_a_change(), st.sampled_from(PERIODS))
def test_windows_near_clock_changes_match_the_oracle(
    zone_and_instant: tuple[str, datetime], period: str
) -> None:
    name, instant = zone_and_instant
    assert lib(period, name, instant) == oracle(period, name, instant)


@pytest.mark.parametrize(
    ("name", "instant", "end"),
    [  # Kiritimati went from 30 December 1994 to 1 January 1995 (UTC-10 to UTC+14)
        ("Pacific/Kiritimati", datetime(1994, 1, 2, tzinfo=UTC), datetime(1994, 12, 31, 10, tzinfo=UTC)),
        ("Pacific/Kiritimati", datetime(1994, 12, 31, 9, tzinfo=UTC), datetime(1994, 12, 31, 10, tzinfo=UTC)),
        ("Pacific/Kiritimati", datetime(1995, 6, 1, tzinfo=UTC), datetime(1995, 12, 31, 10, tzinfo=UTC)),
        # Apia skipped Friday 30 December 2011: 2011 still ends with its 31 December
        ("Pacific/Apia", datetime(2011, 6, 1, tzinfo=UTC), datetime(2011, 12, 31, 10, tzinfo=UTC)),
    ],
)  # fmt: skip
def test_a_year_whose_last_day_was_skipped_ends_where_the_next_year_begins(
    name: str, instant: datetime, end: datetime
) -> None:
    # the year's last day is found from the noon of 31 December; a zone that skipped that
    # date reads its noon in 1 January (the offset before the change): the year must not
    # take the next one's first day (1994 ran a day into 1995 in Kiritimati)
    assert lib("yearly", name, instant) == oracle("yearly", name, instant)
    assert lib("yearly", name, instant)[1] == end
    assert lib("yearly", name, end)[0] == end


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(HARD_ZONES), _anywhere, st.sampled_from(PERIODS))
def test_windows_anywhere_match_the_oracle(name: str, instant: datetime, period: str) -> None:
    assert lib(period, name, instant) == oracle(period, name, instant)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(
        sorted(zoneinfo.available_timezones() - {"localtime", "posixrules", "Factory"})
    ),
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
    st.sampled_from(["hourly", "daily"]),
)
def test_windows_of_every_zone_match_the_oracle(name: str, instant: datetime, period: str) -> None:
    assert lib(period, name, instant) == oracle(period, name, instant)


# -- the engine, driven across clock changes ----------------------------------------------


def _limits(**units: int) -> dict[str, Any]:
    return {k: {"value": str(v * U), "decimals": 6, "symbol": "USDT"} for k, v in units.items()}


def _engine(
    zone: str, start: datetime, storage: Any = None, **policy: Any
) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock(start)
    engine = PolicyEngine(storage=storage, clock=clock)
    engine.set_policy("x", {"timeRules": {"timezone": zone, **policy.pop("time", {})}, **policy})
    return engine, clock


def _pay(engine: PolicyEngine, units: int) -> str:
    decision = engine.authorize(payment(units * U, agent_id="x"))
    if decision.code.value == "ALLOWED":
        assert decision.reservation_id is not None
        engine.confirm(decision.reservation_id)
    return str(decision.code.value)


SCHEDULE_STARTS = [
    ("America/New_York", datetime(2026, 10, 29, tzinfo=UTC)),
    ("America/New_York", datetime(2026, 3, 5, tzinfo=UTC)),
    ("Europe/London", datetime(2026, 3, 26, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2026, 4, 2, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2026, 10, 1, tzinfo=UTC)),
    ("Pacific/Apia", datetime(2011, 12, 26, tzinfo=UTC)),
    ("Asia/Kathmandu", datetime(2027, 12, 29, tzinfo=UTC)),
    ("Pacific/Chatham", datetime(2026, 9, 24, tzinfo=UTC)),
    ("Pacific/Kiritimati", datetime(1994, 12, 28, tzinfo=UTC)),
    ("America/Sao_Paulo", datetime(2018, 11, 1, tzinfo=UTC)),
    ("UTC", datetime(2028, 2, 26, tzinfo=UTC)),
]


@pytest.mark.parametrize(("zone", "start"), SCHEDULE_STARTS)
def test_every_decision_across_clock_changes_matches_the_oracle_totals(
    zone: str, start: datetime
) -> None:
    limits = {"hourly": 5, "daily": 12, "weekly": 30, "monthly": 60, "yearly": 150}
    engine, clock = _engine(zone, start, limits=_limits(**limits))
    rnd = random.Random(f"{zone}{start}")
    used: dict[str, int] = {}
    allowed = denied = 0
    now = start
    for _ in range(140):
        now += timedelta(minutes=rnd.choice([1, 14, 29, 30, 31, 45, 59, 60, 61, 180, 600, 1440]))
        clock.set(now)
        units = rnd.randint(1, 4)
        keys = [oracle(period, zone, now)[2] for period in limits]
        fits = all(used.get(k, 0) + units <= limits[p] for p, k in zip(limits, keys, strict=False))
        code = _pay(engine, units)
        assert (code == "ALLOWED") == fits, (now, units, code, {k: used.get(k) for k in keys})
        if fits:
            allowed += 1
            for k in keys:
                used[k] = used.get(k, 0) + units
        else:
            denied += 1
    assert allowed > 10
    assert denied > 10
    # no window ever held more than its limit
    for key, total in used.items():
        assert total <= limits[key.partition(":")[0]]


def _fill(engine: PolicyEngine, clock: ManualClock, instants: list[datetime]) -> int:
    """Pay 1 at each instant while allowed; the total allowed."""
    total = 0
    for instant in instants:
        clock.set(instant)
        total += _pay(engine, 1) == "ALLOWED"
    return total


def _every(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    out = []
    while start < end:
        out.append(start)
        start += step
    return out


def test_new_york_fall_back_day_allows_its_daily_limit_once_and_two_repeated_hours_each_theirs() -> (
    None
):
    day_start, day_end = datetime(2026, 11, 1, 4, tzinfo=UTC), datetime(2026, 11, 2, 5, tzinfo=UTC)
    engine, clock = _engine("America/New_York", day_start, limits=_limits(daily=40))
    assert _fill(engine, clock, _every(day_start, day_end, timedelta(minutes=30))) == 40  # 50 tries
    assert _fill(engine, clock, [day_end - TICK]) == 0
    assert _fill(engine, clock, [day_end]) == 1  # local midnight of 2 November (EST)
    # hourly: local 01:00-02:00 happens twice (05:00-06:00 EDT and 06:00-07:00 EST UTC)
    engine, clock = _engine("America/New_York", day_start, limits=_limits(hourly=3))
    tries = _every(
        datetime(2026, 11, 1, 5, tzinfo=UTC),
        datetime(2026, 11, 1, 7, tzinfo=UTC),
        timedelta(minutes=5),
    )
    assert _fill(engine, clock, tries) == 6


def test_lord_howe_half_hour_pieces_get_the_full_hourly_limit() -> None:
    # 5 April 2026: 02:00 +11:00 becomes 01:30 +10:30 (15:00 UTC)
    start = datetime(2026, 4, 4, 14, tzinfo=UTC)  # 01:00 +11:00
    engine, clock = _engine("Australia/Lord_Howe", start, limits=_limits(hourly=2))
    tries = _every(start, datetime(2026, 4, 4, 16, 30, tzinfo=UTC), timedelta(minutes=5))
    # windows: 14:00-15:00 (01:00+11), 15:00-15:30 (01:30+10:30), 15:30-16:30 (02:00+10:30)
    assert _fill(engine, clock, tries) == 6


def test_apia_skipped_friday_leaves_thursday_saturday_and_a_six_day_week() -> None:
    thursday = datetime(2011, 12, 29, 10, tzinfo=UTC)  # 00:00 -10:00
    saturday = datetime(2011, 12, 30, 10, tzinfo=UTC)  # 00:00 +14:00 on the 31st
    assert lib("daily", "Pacific/Apia", saturday - TICK)[1] == saturday
    assert lib("daily", "Pacific/Apia", saturday)[2] == "daily:2011-12-31T00:00:00+14:00"
    week = lib("weekly", "Pacific/Apia", saturday)
    assert week[1] - week[0] == timedelta(days=6)
    engine, clock = _engine("Pacific/Apia", thursday, limits=_limits(daily=3, weekly=100))
    assert (
        _fill(engine, clock, _every(thursday, saturday + timedelta(days=1), timedelta(hours=2)))
        == 6
    )


def test_kathmandu_day_starts_at_a_quarter_past_six_utc() -> None:
    start = datetime(2026, 5, 4, 18, 14, tzinfo=UTC)
    engine, clock = _engine("Asia/Kathmandu", start, limits=_limits(daily=1))
    assert _fill(engine, clock, [start, start + timedelta(seconds=59, microseconds=999999)]) == 1
    assert _fill(engine, clock, [start + timedelta(minutes=1), start + timedelta(minutes=2)]) == 1


def test_leap_day_month_and_year_lengths() -> None:
    leap = datetime(2028, 2, 29, 12, tzinfo=UTC)
    for zone in ("UTC", "America/New_York", "Asia/Kathmandu"):
        day, month, year = (lib(p, zone, leap) for p in ("daily", "monthly", "yearly"))
        assert day[2].startswith("daily:2028-02-29T00:00:00")
        assert month[1] - month[0] == timedelta(days=29)
        assert year[1] - year[0] == timedelta(days=366)
    assert lib("yearly", "UTC", datetime(2027, 6, 1, tzinfo=UTC))[1] - lib(
        "yearly", "UTC", datetime(2027, 6, 1, tzinfo=UTC)
    )[0] == timedelta(days=365)
    engine, clock = _engine("UTC", datetime(2028, 2, 28, 22, tzinfo=UTC), limits=_limits(daily=2))
    tries = _every(
        datetime(2028, 2, 28, 22, tzinfo=UTC),
        datetime(2028, 3, 1, 2, tzinfo=UTC),
        timedelta(hours=1),
    )
    assert _fill(engine, clock, tries) == 6  # 28th, 29th, 1 March


def test_london_week_starts_monday_local_midnight_which_is_sunday_utc_in_summer() -> None:
    monday = datetime(2026, 7, 19, 23, tzinfo=UTC)  # Monday 20 July 00:00 BST
    assert lib("weekly", "Europe/London", monday)[:2] == (monday, monday + timedelta(days=7))
    engine, clock = _engine("Europe/London", monday - timedelta(hours=1), limits=_limits(weekly=1))
    assert (
        _fill(engine, clock, [monday - timedelta(hours=1), monday - TICK, monday, monday + TICK])
        == 2
    )


def test_allowed_hours_follow_the_local_wall_clock_across_midnight_and_dst() -> None:
    # Mondays to Fridays 9-17, and Saturday 22-24 with Sunday 0-2 (a window across midnight)
    windows = [
        {"days": [1, 2, 3, 4, 5], "startHour": 9, "endHour": 17},
        {"days": [6], "startHour": 22, "endHour": 24},
        {"days": [0], "startHour": 0, "endHour": 2},
    ]
    engine, clock = _engine(
        "America/New_York", datetime(2026, 3, 6, tzinfo=UTC), time={"allowedWindows": windows}
    )
    cases = {
        datetime(2026, 3, 6, 13, 59, tzinfo=UTC): "OUTSIDE_ALLOWED_WINDOW",  # Fri 08:59 EST
        datetime(2026, 3, 6, 14, tzinfo=UTC): "ALLOWED",  # Fri 09:00 EST
        datetime(2026, 3, 8, 3, tzinfo=UTC): "ALLOWED",  # Sat 22:00 EST
        datetime(2026, 3, 8, 5, 0, tzinfo=UTC): "ALLOWED",  # Sun 00:00 EST
        datetime(2026, 3, 8, 7, 0, tzinfo=UTC) - TICK: "ALLOWED",  # Sun 01:59:59.999999 EST
        datetime(2026, 3, 8, 6, 59, tzinfo=UTC): "ALLOWED",  # Sun 01:59 EST
        datetime(2026, 3, 8, 7, tzinfo=UTC): "OUTSIDE_ALLOWED_WINDOW",  # Sun 03:00 EDT
        datetime(2026, 3, 9, 12, 59, tzinfo=UTC): "OUTSIDE_ALLOWED_WINDOW",  # Mon 08:59 EDT
        datetime(2026, 3, 9, 13, tzinfo=UTC): "ALLOWED",  # Mon 09:00 EDT
        datetime(2026, 3, 9, 21, tzinfo=UTC): "OUTSIDE_ALLOWED_WINDOW",  # Mon 17:00 EDT
    }
    for instant, expected in cases.items():
        clock.set(instant)
        local = instant.astimezone(NY)
        inside = any(
            local.isoweekday() % 7 in w["days"] and w["startHour"] <= local.hour < w["endHour"]  # type: ignore[operator]
            for w in windows
        )
        assert (expected == "ALLOWED") == inside, instant
        assert engine.authorize(payment(U, agent_id="x"), dry_run=True).code.value == expected, (
            instant
        )


def test_a_year_window_contains_its_instant_when_a_fall_back_crosses_new_year() -> None:
    # Phoenix, 1 January 1944: 00:01 -06:00 became 31 December 23:01 -07:00, so local time
    # read 1944 for one minute (06:00-06:01 UTC), then 1943 again until 07:00 UTC. The
    # year window of an instant in that minute began at 07:00 UTC, after the instant, and
    # 1943's window overlapped it: years did not tile time as every other period does.
    zone = ZoneInfo("America/Phoenix")
    instants = [datetime(1944, 1, 1, 6, 0, 30, tzinfo=UTC), datetime(1944, 1, 1, 6, 30, tzinfo=UTC)]
    for instant in [
        *instants,
        datetime(1943, 12, 31, 18, tzinfo=UTC),
        datetime(1944, 1, 1, 7, tzinfo=UTC),
    ]:
        window = window_at(Period.YEARLY, instant, zone)
        assert window.contains(instant)
        assert (window.start, window.end, window.key) == oracle(
            "yearly", "America/Phoenix", instant
        )
        # tiling: the window before ends where this one starts
        assert window_at(Period.YEARLY, window.start - TICK, zone).end == window.start
        assert window_at(Period.YEARLY, window.end, zone).start == window.end
    assert window_at(Period.YEARLY, instants[0], zone).key == "yearly:1944-01-01T00:00:00-06:00"
    assert window_at(Period.YEARLY, instants[1], zone).key == "yearly:1943-12-31T23:01:00-07:00"


def _two(
    policy: dict[str, Any], at: datetime
) -> tuple[PolicyEngine, ManualClock, PolicyEngine, ManualClock]:
    """Two engines (two processes) on one store, each with its own clock."""

    store = MemoryStorage()
    clock_a, clock_b = ManualClock(at), ManualClock(at)
    a, b = PolicyEngine(storage=store, clock=clock_a), PolicyEngine(storage=store, clock=clock_b)
    a.set_policy("x", policy)
    return a, clock_a, b, clock_b


def test_a_request_stamped_before_midnight_by_a_slower_process_counts_in_its_own_day() -> None:
    midnight = datetime(2026, 11, 2, 5, tzinfo=UTC)  # New York, 2 November 00:00 EST
    policy = {"timeRules": {"timezone": "America/New_York"}, "limits": _limits(daily=10)}
    a, clock_a, b, clock_b = _two(policy, midnight - timedelta(hours=1))
    assert _pay(a, 7) == "ALLOWED"
    clock_a.set(midnight + timedelta(seconds=5))
    assert _pay(a, 10) == "ALLOWED"  # the new day opened
    clock_b.set(midnight - timedelta(seconds=5))  # B is ten seconds behind
    assert _pay(b, 4) == "DAILY_LIMIT"  # 7 + 4 > 10 in 1 November
    assert _pay(b, 3) == "ALLOWED"  # exactly 10 in 1 November
    assert _pay(b, 1) == "DAILY_LIMIT"
    clock_a.set(midnight + timedelta(seconds=6))
    assert _pay(a, 1) == "DAILY_LIMIT"  # 2 November stays at its 10
    # a clock behind by more than the counter grace, once the day's counter is gone
    clock_a.set(midnight + timedelta(hours=3))
    assert _pay(a, 1) == "DAILY_LIMIT"
    clock_b.set(midnight - timedelta(minutes=1))
    with pytest.raises(Exception) as err:  # noqa: PT011 - the code is checked below
        b.authorize(payment(U, agent_id="x"))
    assert getattr(err.value, "code", None) == "STORAGE_UNAVAILABLE"


def test_a_slower_process_never_sees_less_of_a_rolling_window() -> None:
    policy = {"limits": {"rolling": [{"window": "1h", "amount": _limits(x=10)["x"]}]}}
    at = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)  # across New York's spring-forward: irrelevant
    a, clock_a, b, clock_b = _two(policy, at)
    assert _pay(a, 6) == "ALLOWED"
    clock_b.set(at - timedelta(seconds=30))
    assert _pay(b, 5) == "ROLLING_LIMIT"  # a later payment still counts for an earlier stamp
    assert _pay(b, 4) == "ALLOWED"
    # each payment leaves exactly one hour after it was authorized, not a microsecond sooner
    clock_a.set(at + timedelta(minutes=59, seconds=30) - TICK)
    assert _pay(a, 1) == "ROLLING_LIMIT"  # B's 4 (stamped 30 s early) still counts
    clock_a.set(at + timedelta(minutes=59, seconds=30))
    assert _pay(a, 4) == "ALLOWED"  # B's 4 left
    clock_a.set(at + timedelta(hours=1) - TICK)
    assert _pay(a, 1) == "ROLLING_LIMIT"
    clock_a.set(at + timedelta(hours=1))
    assert _pay(a, 6) == "ALLOWED"  # the first 6 left
    clock_b.set(at + timedelta(hours=1) - timedelta(seconds=10))
    assert _pay(b, 1) == "ROLLING_LIMIT"  # B's instant still sees the first 6, plus what came since


def test_a_timezone_moved_away_and_back_within_a_day_keeps_counting_that_day() -> None:
    at = datetime(2026, 7, 20, 15, tzinfo=UTC)  # 11:00 in New York, 16:00 in London
    engine, clock = _engine("America/New_York", at, limits=_limits(daily=10))
    assert _pay(engine, 10) == "ALLOWED"
    engine.set_policy(
        "x", {"timeRules": {"timezone": "Europe/London"}, "limits": _limits(daily=10)}
    )
    assert _pay(engine, 3) == "ALLOWED"  # documented: London's day (+01:00) starts afresh
    engine.set_policy(
        "x", {"timeRules": {"timezone": "America/New_York"}, "limits": _limits(daily=10)}
    )
    assert _pay(engine, 1) == "DAILY_LIMIT"  # New York's day has 13 in it
    clock.set(datetime(2026, 7, 21, 3, 59, tzinfo=UTC))  # London's day ended; New York's has not
    assert _pay(engine, 1) == "DAILY_LIMIT"
    clock.set(datetime(2026, 7, 21, 4, tzinfo=UTC))
    assert _pay(engine, 10) == "ALLOWED"


def test_a_blocked_period_across_the_repeated_hour_is_inclusive_at_both_ends() -> None:
    period = {"start": "2026-11-01T01:30:00-04:00", "end": "2026-11-01T01:30:00-05:00"}
    engine, clock = _engine(
        "America/New_York", datetime(2026, 11, 1, 4, tzinfo=UTC), time={"blockedPeriods": [period]}
    )
    expected = {
        datetime(2026, 11, 1, 5, 29, 59, 999999, tzinfo=UTC): "ALLOWED",
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC): "BLOCKED_PERIOD",
        datetime(2026, 11, 1, 6, 0, tzinfo=UTC): "BLOCKED_PERIOD",
        datetime(2026, 11, 1, 6, 30, tzinfo=UTC): "BLOCKED_PERIOD",
        datetime(2026, 11, 1, 6, 30, 0, 1, tzinfo=UTC): "ALLOWED",
    }
    for instant, code in expected.items():
        clock.set(instant)
        assert engine.authorize(payment(U, agent_id="x"), dry_run=True).code.value == code, instant


def test_a_clock_given_in_local_time_with_fold_picks_the_right_repeated_hour() -> None:
    clock = ManualClock(datetime(2026, 11, 1, 1, 30, tzinfo=NY))  # the first 01:30 (EDT)
    engine = PolicyEngine(clock=clock)
    engine.set_policy(
        "x", {"timeRules": {"timezone": "America/New_York"}, "limits": _limits(hourly=5)}
    )
    assert [_pay(engine, 5), _pay(engine, 1)] == ["ALLOWED", "HOURLY_LIMIT"]
    clock.set(datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NY))  # the second 01:30 (EST)
    assert [_pay(engine, 5), _pay(engine, 1)] == ["ALLOWED", "HOURLY_LIMIT"]
    clock.set(
        datetime(2026, 11, 1, 2, 30, tzinfo=NY) - timedelta(hours=1)
    )  # wall arithmetic: 01:30 EDT
    assert _pay(engine, 1) == "HOURLY_LIMIT"


_ALLOWED = st.lists(
    st.tuples(
        st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True).map(sorted),
        st.integers(0, 23),
        st.integers(1, 24),
    ).filter(lambda w: w[1] < w[2]),
    min_size=1,
    max_size=3,
)


@settings(max_examples=80, deadline=None)
@given(near_a_change(since=1970), _ALLOWED)
def test_allowed_windows_read_the_local_weekday_and_hour_as_the_oracle_does(
    zone_and_instant: tuple[str, datetime], allowed: list[tuple[list[int], int, int]]
) -> None:
    name, instant = zone_and_instant
    windows = [{"days": d, "startHour": s, "endHour": e} for d, s, e in allowed]
    engine, _ = _engine(name, instant, time={"allowedWindows": windows})
    wall = (instant + timedelta(seconds=_offset(name, instant))).replace(tzinfo=None)
    weekday = (wall.weekday() + 1) % 7  # 0 = Sunday
    inside = any(weekday in d and s <= wall.hour < e for d, s, e in allowed)
    code = engine.authorize(payment(U, agent_id="x"), dry_run=True).code.value
    assert code == ("ALLOWED" if inside else "OUTSIDE_ALLOWED_WINDOW")


@pytest.mark.parametrize(
    ("zone", "start"),
    [
        ("America/New_York", datetime(2026, 11, 1, 3, tzinfo=UTC)),
        ("Australia/Lord_Howe", datetime(2026, 4, 4, 12, tzinfo=UTC)),
        ("Asia/Kathmandu", datetime(2026, 12, 31, 16, tzinfo=UTC)),
    ],
)
def test_two_processes_with_skewed_clocks_never_overfill_a_window(
    zone: str, start: datetime
) -> None:
    limits = {"hourly": 6, "daily": 20, "weekly": 45, "monthly": 70, "yearly": 90}
    policy = {"timeRules": {"timezone": zone}, "limits": _limits(**limits)}
    a, clock_a, b, clock_b = _two(policy, start)
    rnd = random.Random(zone)
    totals: dict[str, int] = {}
    now = start
    allowed = denied = 0
    for _ in range(160):
        now += timedelta(minutes=rnd.choice([0, 3, 17, 30, 45, 59]))
        clock_a.set(now)
        behind = now - timedelta(minutes=rnd.choice([0, 1, 15, 45, 59]))
        clock_b.set(max(behind, start))
        engine, clock = (a, clock_a) if rnd.random() < 0.5 else (b, clock_b)
        units = rnd.randint(1, 3)
        code = _pay(engine, units)
        denied += code != "ALLOWED"
        if code == "ALLOWED":
            allowed += 1
            for period in limits:
                key = oracle(period, zone, clock())[2]
                totals[key] = totals.get(key, 0) + units
    assert allowed > 20
    assert denied > 20
    for key, total in totals.items():
        assert total <= limits[key.partition(":")[0]], key


def test_counter_grace_is_exact_to_the_microsecond() -> None:

    end = datetime(2026, 3, 29, 1, tzinfo=UTC)  # London's spring-forward: the hour 01:00 GMT ends
    store = MemoryStorage()
    clock_a, clock_b = ManualClock(end - timedelta(minutes=30)), ManualClock(end - TICK)
    grace = timedelta(minutes=1)
    a = PolicyEngine(storage=store, clock=clock_a, counter_grace=grace)
    b = PolicyEngine(storage=store, clock=clock_b, counter_grace=grace)
    a.set_policy("x", {"timeRules": {"timezone": "Europe/London"}, "limits": _limits(hourly=5)})
    assert _pay(a, 4) == "ALLOWED"
    clock_a.set(end + grace - TICK)
    assert _pay(a, 5) == "ALLOWED"  # the next hour (02:00 BST)
    assert _pay(b, 2) == "HOURLY_LIMIT"  # B, one grace behind: still checked against 4
    assert _pay(b, 1) == "ALLOWED"
    clock_a.set(end + grace)
    assert _pay(a, 1) == "HOURLY_LIMIT"  # a step at end + grace drops the old hour
    with pytest.raises(Exception) as err:  # noqa: PT011 - the code is checked below
        b.authorize(payment(U, agent_id="x"))
    assert getattr(err.value, "code", None) == "STORAGE_UNAVAILABLE"
