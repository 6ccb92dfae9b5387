from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy import Period, PolicyValidationError, load_policy, windows_for
from agentpolicy.windows import window_at
from tests.strategies import ZONES, instants

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_hour_window_starts_on_the_hour_and_ends_exclusive() -> None:
    w = window_at(Period.HOURLY, utc(2026, 1, 19, 10, 59, 59, 999999), UTC)
    assert (w.start, w.end) == (utc(2026, 1, 19, 10), utc(2026, 1, 19, 11))
    assert w.contains(utc(2026, 1, 19, 10))
    assert not w.contains(utc(2026, 1, 19, 11))
    assert window_at(Period.HOURLY, utc(2026, 1, 19, 11), UTC).start == utc(2026, 1, 19, 11)


def test_day_window_is_local_midnight_to_midnight() -> None:
    w = window_at(Period.DAILY, utc(2026, 1, 19, 4, 59), NY)
    assert w.start == datetime(2026, 1, 18, tzinfo=NY)
    assert w.end == datetime(2026, 1, 19, tzinfo=NY)
    assert w.key == "daily:2026-01-18T00:00:00-05:00"
    assert window_at(Period.DAILY, utc(2026, 1, 19, 5), NY).start == datetime(
        2026, 1, 19, tzinfo=NY
    )


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        (NY, datetime(2026, 3, 8), 23),  # spring forward
        (NY, datetime(2026, 11, 1), 25),  # fall back
        (BERLIN, datetime(2026, 3, 29), 23),
        (BERLIN, datetime(2026, 10, 25), 25),
    ],
)
def test_daylight_saving_days_start_and_end_at_local_midnight(
    zone: ZoneInfo, day: datetime, hours: int
) -> None:
    noon = day.replace(hour=12, tzinfo=zone)
    w = window_at(Period.DAILY, noon, zone)
    assert w.start.astimezone(zone).replace(tzinfo=None) == day
    assert w.end.astimezone(zone).replace(tzinfo=None) == day + timedelta(days=1)
    assert (w.end - w.start) == timedelta(hours=hours)
    # the day before and after the change also start at local midnight
    before = window_at(Period.DAILY, noon - timedelta(days=1), zone)
    after = window_at(Period.DAILY, w.end + timedelta(hours=1), zone)
    assert before.end == w.start
    assert after.start == w.end
    assert after.start.astimezone(zone).hour == 0
    assert before.start.astimezone(zone).hour == 0


def test_repeated_fall_back_hour_gives_two_distinct_hourly_windows() -> None:
    first = window_at(Period.HOURLY, utc(2026, 11, 1, 5, 30), NY)  # 01:30 EDT
    second = window_at(Period.HOURLY, utc(2026, 11, 1, 6, 30), NY)  # 01:30 EST
    assert first.key != second.key
    assert first.end == second.start
    assert first.key.endswith("-04:00")
    assert second.key.endswith("-05:00")


def test_hour_after_spring_forward_gap_starts_at_three() -> None:
    w = window_at(Period.HOURLY, utc(2026, 3, 8, 7, 10), NY)  # 03:10 EDT
    assert w.start.astimezone(NY).hour == 3
    assert w.end - w.start == timedelta(hours=1)


def test_month_window_runs_from_the_first_to_the_first() -> None:
    w = window_at(Period.MONTHLY, utc(2026, 1, 31, 23, 59, 59), UTC)
    assert (w.start, w.end) == (utc(2026, 1, 1), utc(2026, 2, 1))
    december = window_at(Period.MONTHLY, utc(2026, 12, 31, 12), UTC)
    assert december.end == utc(2027, 1, 1)
    # in New York, 2026-02-01T03:00Z is still January 31st
    assert window_at(Period.MONTHLY, utc(2026, 2, 1, 3), NY).key.startswith("monthly:2026-01-01")


def test_leap_day_is_its_own_day_in_a_29_day_february() -> None:
    leap = window_at(Period.DAILY, utc(2028, 2, 29, 12), UTC)
    assert (leap.start, leap.end) == (utc(2028, 2, 29), utc(2028, 3, 1))
    feb = window_at(Period.MONTHLY, utc(2028, 2, 29, 12), UTC)
    assert feb.end - feb.start == timedelta(days=29)


def test_iso_week_spanning_new_year_starts_on_monday_in_the_old_year() -> None:
    # 2026-01-01 is a Thursday: its ISO week began on Monday 2025-12-29
    w = window_at(Period.WEEKLY, utc(2026, 1, 1, 12), UTC)
    assert (w.start, w.end) == (utc(2025, 12, 29), utc(2026, 1, 5))
    assert window_at(Period.WEEKLY, utc(2025, 12, 31), UTC) == w
    assert window_at(Period.WEEKLY, utc(2026, 1, 4, 23, 59), UTC) == w
    assert window_at(Period.WEEKLY, utc(2026, 1, 5), UTC).start == utc(2026, 1, 5)


def test_week_starts_at_local_monday_midnight_across_a_dst_change() -> None:
    w = window_at(Period.WEEKLY, utc(2026, 3, 30, 12), BERLIN)  # Monday after the change
    assert w.start == datetime(2026, 3, 30, tzinfo=BERLIN)
    previous = window_at(Period.WEEKLY, utc(2026, 3, 29, 12), BERLIN)
    assert previous.end == w.start
    assert previous.end - previous.start == timedelta(days=7) - timedelta(hours=1)


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        window_at(Period.DAILY, datetime(2026, 1, 1), UTC)
    with pytest.raises(PolicyValidationError):
        windows_for(None, datetime(2026, 1, 1))


def test_windows_for_uses_the_policy_timezone_and_every_period() -> None:
    policy = load_policy({"timeRules": {"timezone": "Europe/Berlin"}})
    windows = windows_for(policy, utc(2026, 1, 18, 23, 30))  # Monday 00:30 in Berlin
    assert [w.period for w in windows] == list(Period)
    assert windows[4].key == "yearly:2026-01-01T00:00:00+01:00"
    assert windows[5].key == "lifetime"
    daily = windows[1]
    assert daily.start == datetime(2026, 1, 19, tzinfo=BERLIN)
    assert windows_for(None, utc(2026, 1, 18, 23, 30))[1].start == utc(2026, 1, 18)


TILING = [p for p in Period if p is not Period.LIFETIME]  # the lifetime window never ends


@given(instants, st.sampled_from(ZONES), st.sampled_from(TILING))
def test_every_instant_lies_in_exactly_its_window(
    instant: datetime, zone_name: str, period: Period
) -> None:
    zone = ZoneInfo(zone_name)
    w = window_at(period, instant, zone)
    assert w.contains(instant)
    assert window_at(period, w.start, zone) == w
    assert window_at(period, w.end, zone).start == w.end
    assert window_at(period, w.end - timedelta(microseconds=1), zone) == w


def test_windows_for_tells_the_two_fall_back_hours_apart() -> None:
    policy = load_policy({"timeRules": {"timezone": "America/New_York"}})
    first = windows_for(policy, utc(2026, 11, 1, 5, 30))[0]  # 01:30 EDT
    second = windows_for(policy, utc(2026, 11, 1, 6, 30))[0]  # 01:30 EST, same wall clock
    assert first.key != second.key
    assert first.contains(utc(2026, 11, 1, 5, 30))
    assert second.contains(utc(2026, 11, 1, 6, 30))


# -- every zone: windows contain their instant and tile time -----------------------------------

ALL_ZONES = sorted(zoneinfo.available_timezones() - {"localtime", "posixrules", "Factory"})
# Zones whose clocks do unusual things: half-hour and quarter-past changes, changes at
# midnight, a skipped day, two-hour summer time, negative summer time, Ramadan breaks.
ODD_ZONES = [
    "Australia/Lord_Howe", "Pacific/Chatham", "America/Sao_Paulo", "America/Santiago",
    "America/Havana", "Asia/Beirut", "Pacific/Apia", "Antarctica/Troll", "Europe/Dublin",
    "Africa/Casablanca", "Asia/Tehran", "America/Caracas", "Asia/Pyongyang",
    "America/New_York", "Europe/Berlin", "Pacific/Norfolk", "America/Adak",
]  # fmt: skip


@functools.cache
def clock_changes(zone_name: str) -> tuple[datetime, ...]:
    """Every change of UTC offset from 2005 to 2030, found independently of agentpolicy."""
    zone = ZoneInfo(zone_name)
    found = []
    probe = utc(2005, 1, 1)
    offset = probe.astimezone(zone).utcoffset()
    while probe < utc(2030, 1, 1):
        ahead = probe + timedelta(hours=3)
        if ahead.astimezone(zone).utcoffset() != offset:
            low, high = probe, ahead
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            found.append(high.replace(microsecond=0))
            offset = ahead.astimezone(zone).utcoffset()
        probe = ahead
    return tuple(found)


@st.composite
def near_a_clock_change(draw: st.DrawFn) -> tuple[datetime, str]:
    zone = draw(st.sampled_from(ODD_ZONES))
    change = draw(st.sampled_from(clock_changes(zone)))
    return change + timedelta(seconds=draw(st.integers(-3 * 3600, 3 * 3600))), zone


anywhere = st.tuples(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1),
                 timezones=st.just(UTC)),
    st.sampled_from(ALL_ZONES),
)  # fmt: skip


def check_windows(instant: datetime, zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    assert window_at(Period.LIFETIME, instant, zone).contains(instant)
    for period in TILING:
        w = window_at(period, instant, zone)
        assert w.contains(instant), (period, w)
        assert w.start < w.end
        assert window_at(period, w.start, zone) == w
        assert window_at(period, w.end - timedelta(microseconds=1), zone) == w
        assert window_at(period, w.end, zone).start == w.end  # the next one starts here
        assert window_at(period, w.start - timedelta(microseconds=1), zone).end == w.start
        assert w.key == f"{period}:{w.start.astimezone(zone).isoformat()}"


@given(near_a_clock_change() | anywhere)
def test_every_window_of_every_zone_contains_its_instant_and_windows_tile(
    case: tuple[datetime, str],
) -> None:
    check_windows(*case)


@pytest.mark.parametrize(
    ("instant", "zone"),
    [
        (utc(2026, 4, 4, 15, 15), "Australia/Lord_Howe"),  # 01:45 +10:30, second time round
        (utc(2026, 4, 4, 14, 45), "Australia/Lord_Howe"),  # 01:45 +11:00, first time round
        (utc(2026, 10, 3, 15, 40), "Australia/Lord_Howe"),  # 02:40 +11:00, after the gap
        (utc(2026, 9, 26, 14, 5), "Pacific/Chatham"),  # 03:50 +13:45, after 02:45 -> 03:45
        (utc(2026, 4, 4, 14, 5), "Pacific/Chatham"),  # 02:50 +12:45, after 03:45 -> 02:45
    ],
)
def test_fractional_clock_changes_split_the_hour_at_the_change(
    instant: datetime, zone: str
) -> None:
    check_windows(instant, zone)
    hour = window_at(Period.HOURLY, instant, ZoneInfo(zone))
    assert hour.end - hour.start <= timedelta(hours=1)


def test_lord_howe_fall_back_gives_three_windows_around_the_change() -> None:
    zone = ZoneInfo("Australia/Lord_Howe")  # 02:00 +11:00 becomes 01:30 +10:30 at 15:00Z
    keys = [window_at(Period.HOURLY, utc(2026, 4, 4, 14, 59), zone).key,
            window_at(Period.HOURLY, utc(2026, 4, 4, 15, 0), zone).key,
            window_at(Period.HOURLY, utc(2026, 4, 4, 15, 30), zone).key]  # fmt: skip
    assert keys == [
        "hourly:2026-04-05T01:00:00+11:00",
        "hourly:2026-04-05T01:30:00+10:30",
        "hourly:2026-04-05T02:00:00+10:30",
    ]


def test_keys_of_whole_hour_zones_are_unchanged() -> None:
    # Stored counters are kept under these keys: they must not move.
    assert window_at(Period.HOURLY, utc(2026, 11, 1, 5, 30), NY).key == (
        "hourly:2026-11-01T01:00:00-04:00"
    )
    assert window_at(Period.DAILY, utc(2026, 3, 8, 12), NY).key == "daily:2026-03-08T00:00:00-05:00"
    assert window_at(Period.MONTHLY, utc(2026, 1, 15), BERLIN).key == (
        "monthly:2026-01-01T00:00:00+01:00"
    )


@pytest.mark.parametrize(
    "instant",
    [datetime.max.replace(tzinfo=UTC), utc(9999, 12, 31, 12), datetime.min.replace(tzinfo=UTC)],
)
def test_the_end_of_the_calendar_is_a_clear_error(instant: datetime) -> None:
    with pytest.raises(PolicyValidationError) as err:
        windows_for(load_policy({"timeRules": {"timezone": "Pacific/Kiritimati"}}), instant)
    assert err.value.code == "INVALID_INPUT"
    assert err.value.problems[0].path == "$.now"
    assert instant.isoformat() in err.value.message
    assert "calendar" in err.value.message


def test_the_engine_refuses_a_clock_at_the_end_of_time_with_invalid_input() -> None:
    from agentpolicy.mcp import AgentPolicyMcpServer
    from agentpolicy.testing import ManualClock

    clock = ManualClock(utc(9999, 12, 31, 23, 59))
    server = AgentPolicyMcpServer(role="admin", storage="memory://", clock=clock)
    server.call("agent_policy_set", {"agentId": "a", "policy": {}})
    result = server.call("agent_policy_authorize", {
        "agentId": "a", "amount": "1", "recipient": "0xv", "network": "eip155:1"})  # fmt: skip
    assert result["success"] is False
    assert result["error"]["code"] == "INVALID_INPUT"
    assert "9999-12-31T23:59:00+00:00" in result["error"]["message"]


def test_a_year_starts_on_the_first_local_day_of_january() -> None:
    w = window_at(Period.YEARLY, utc(2026, 1, 1, 4, 59), NY)  # still 2025 in New York
    assert (w.start, w.end) == (utc(2025, 1, 1, 5), utc(2026, 1, 1, 5))
    assert w.key == "yearly:2025-01-01T00:00:00-05:00"
    nxt = window_at(Period.YEARLY, utc(2026, 1, 1, 5), NY)
    assert nxt.start == w.end
    assert window_at(Period.YEARLY, utc(2026, 7, 1), NY) == nxt  # summer time inside the year


def test_the_lifetime_window_contains_every_instant_and_never_ends() -> None:
    for instant in (utc(1971, 1, 1), utc(2026, 6, 1), utc(2999, 1, 1)):
        w = window_at(Period.LIFETIME, instant, NY)
        assert w.contains(instant)
        assert w.key == "lifetime"
