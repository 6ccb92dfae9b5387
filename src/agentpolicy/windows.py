"""Calendar spending windows in a policy's timezone.

The hour starts at :00, the day at local midnight, the week on Monday 00:00
(ISO 8601), the month on the 1st at 00:00 and the year on 1 January 00:00,
all in the policy's IANA timezone; the lifetime window never ends. A
daylight-saving change never moves a window off local midnight: a day is 23
or 25 hours long when the clocks change.

Formally, a window is a longest stretch of time over which the local
calendar unit stays the same: the local date and hour *with its UTC offset*
for ``hourly``, the local date for ``daily``, the ISO week for ``weekly``,
the month for ``monthly`` and the year for ``yearly``. So windows tile time (each one starts where
the previous one ended) and every window contains the instant it was
computed for, in every zone, including those whose clocks move by half an
hour (``Australia/Lord_Howe``) or at a quarter to the hour
(``Pacific/Chatham``). An hour cut by a clock change is split at the change:
each piece is its own window, as each of the two repeated hours of a
fall-back night is.

Each window has a stable ``key`` (the period and the local start with its UTC
offset, such as ``"daily:2026-03-08T00:00:00-05:00"``) under which storages
keep usage counters. During the repeated hour of a fall-back change the two
local 01:00 hours have different offsets, hence different keys.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo

import attrs

from agentpolicy.errors import PolicyValidationError

__all__ = ["LIFETIME_WINDOW", "WINDOW_PERIODS", "Period", "Window", "window_at"]


class Period(enum.StrEnum):
    """A calendar period over which a spending limit applies."""

    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    YEARLY = "yearly"
    LIFETIME = "lifetime"


WINDOW_PERIODS: tuple[Period, ...] = tuple(Period)
"""The window periods in the order the limits are checked."""

_TICK = timedelta(microseconds=1)
# Clock changes are looked for at this step, then pinned down to the microsecond. Two
# changes less than an hour apart that cancel out would be missed; no zone has any.
_STEP = timedelta(hours=1)


@attrs.frozen
class Window:
    """One calendar window: ``start <= instant < end`` (both in UTC), keyed for usage counters."""

    period: Period
    key: str
    start: datetime
    end: datetime

    def contains(self, instant: datetime) -> bool:
        """Whether ``instant`` (an aware datetime) falls inside this window."""
        return self.start <= instant < self.end


LIFETIME_WINDOW = Window(
    Period.LIFETIME,
    "lifetime",
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
)
"""The one window of a lifetime limit: it never ends (in any zone)."""


class _Zone:
    """The arithmetic of one period in one zone, on instants held in UTC."""

    def __init__(self, period: Period, zone: tzinfo) -> None:
        self.period = period
        self.zone = zone
        self.fixed = isinstance(zone, timezone)  # a fixed offset never changes

    def offset(self, instant: datetime) -> timedelta:
        offset = instant.astimezone(self.zone).utcoffset()
        assert offset is not None  # noqa: S101 - an aware zone always has one
        return offset

    def label(self, instant: datetime) -> object:
        """The local calendar unit of ``instant``: equal labels, same window."""
        local = instant.astimezone(self.zone)
        if self.period is Period.HOURLY:
            return local.replace(minute=0, second=0, microsecond=0, tzinfo=None), local.utcoffset()
        day = local.date()
        if self.period is Period.DAILY:
            return day
        if self.period is Period.WEEKLY:
            return day - timedelta(days=day.weekday())
        if self.period is Period.YEARLY:
            return day.year
        return day.year, day.month

    def floor(self, wall: datetime) -> datetime:
        """The start of the unit of a local wall-clock time (naive)."""
        if self.period is Period.HOURLY:
            return wall.replace(minute=0, second=0, microsecond=0)
        day = wall.date()
        if self.period is Period.WEEKLY:
            day -= timedelta(days=day.weekday())
        elif self.period is Period.MONTHLY:
            day = day.replace(day=1)
        elif self.period is Period.YEARLY:
            day = day.replace(month=1, day=1)
        return datetime.combine(day, time(0))

    def after(self, start: datetime) -> datetime:
        """The start of the next unit after the one starting at ``start`` (naive)."""
        if self.period is Period.HOURLY:
            return start + timedelta(hours=1)
        if self.period is Period.DAILY:
            return start + timedelta(days=1)
        if self.period is Period.WEEKLY:
            return start + timedelta(days=7)
        day = start.date()
        if self.period is Period.YEARLY:
            return datetime.combine(date(day.year + 1, 1, 1), time(0))
        return datetime.combine(date(day.year + (day.month == 12), day.month % 12 + 1, 1), time(0))

    def pin(self, before: datetime, after: datetime, new: timedelta) -> datetime:
        """The first instant in ``(before, after]`` whose offset is ``new`` (``after``'s)."""
        while after - before > _TICK:
            middle = before + (after - before) // 2
            if self.offset(middle) == new:
                after = middle
            else:
                before = middle
        return after

    def first_change(self, low: datetime, high: datetime) -> datetime | None:
        """The earliest clock change in ``(low, high]``, if any."""
        if self.fixed:
            return None
        old = self.offset(low)
        probe = low
        while probe < high:
            ahead = min(high, probe + _STEP)
            new = self.offset(ahead)
            if new != old:
                # pin() finds where the offset becomes `new`; with `old` on the left
                # and `new` on the right that is the first change in between.
                return self.pin(probe, ahead, new)
            probe = ahead
        return None

    def last_change(self, low: datetime, high: datetime) -> datetime | None:
        """The latest clock change in ``(low, high]``, if any."""
        if self.fixed:
            return None
        new = self.offset(high)
        probe = high
        while probe > low:
            behind = max(low, probe - _STEP)
            if self.offset(behind) != new:
                return self.pin(behind, probe, new)
            probe = behind
        return None

    def boundary(self, instant: datetime) -> bool:
        """Whether a window starts at ``instant``."""
        return self.label(instant - _TICK) != self.label(instant)

    def start(self, instant: datetime) -> datetime:
        current = instant
        while True:
            offset = self.offset(current)
            wall = self.floor((current + offset).replace(tzinfo=None))
            candidate = (wall - offset).replace(tzinfo=UTC)
            change = self.last_change(candidate, current)
            found = candidate if change is None else change
            if self.boundary(found):
                return found
            current = found - _TICK  # a change that keeps the unit: look further back

    def end(self, instant: datetime) -> datetime:
        current = instant
        while True:
            offset = self.offset(current)
            wall = self.after(self.floor((current + offset).replace(tzinfo=None)))
            candidate = (wall - offset).replace(tzinfo=UTC)
            change = self.first_change(current, candidate)
            found = candidate if change is None else change
            if self.boundary(found):
                return found
            current = found  # a change that keeps the unit: look further ahead


def _year(instant: datetime, zone: tzinfo) -> Window:
    """The year: the run of local days of one year that contains ``instant``.

    Built from daily windows (which already handle days that do not start at
    00:00): the year changes only where the local date does. It walks day by
    day from the day of ``instant`` to where the year changes, except that
    from a day between 3 January and 29 December it jumps to the day of 1
    January (walking back) or of 31 December (walking on): no clock has ever
    moved by more than a day, so every day in between is of the same year.
    So a clock change that crosses New Year (Phoenix, 1 January 1944: 00:01
    became 23:01 on 31 December) splits the year as it splits the day, and
    every year window contains its instant; otherwise the year runs from the
    first local day of 1 January to that of the next one.
    """
    try:
        day = window_at(Period.DAILY, instant, zone)
        year = _date_of(day, zone).year
        inside = (date(year, 1, 3), date(year, 12, 29))
        first = day
        while True:  # walk back to the first day of the run
            before = window_at(Period.DAILY, first.start - _TICK, zone)
            on = _date_of(before, zone)
            if on.year != year:
                break
            first = before
            if inside[0] <= on <= inside[1]:
                jump = _day_of(year, 1, (1, 2), zone)
                first = jump if jump is not None and jump.start < before.start else before
        last = day
        while True:  # walk on to the last day of the run
            after = window_at(Period.DAILY, last.end, zone)
            on = _date_of(after, zone)
            if on.year != year:
                break
            last = after
            if inside[0] <= on <= inside[1]:
                jump = _day_of(year, 12, (31, 30), zone)
                last = jump if jump is not None and jump.start > after.start else after
        local_start = first.start.astimezone(zone)
    except (OverflowError, ValueError, PolicyValidationError):
        raise PolicyValidationError.single(
            "$.now",
            f"{instant.isoformat()} is too close to the end of the calendar (years 1 to 9999): "
            f"its yearly window in {zone} cannot be computed",
        ) from None
    return Window(Period.YEARLY, f"yearly:{local_start.isoformat()}", first.start, last.end)


def _date_of(day: Window, zone: tzinfo) -> date:
    """The local date of a daily window (that of its start: it is one date throughout)."""
    return day.start.astimezone(zone).date()


def _noon(year: int, month: int, day: int, zone: tzinfo) -> datetime:
    return datetime(year, month, day, 12, tzinfo=zone).astimezone(UTC)


def _day_of(year: int, month: int, days: tuple[int, ...], zone: tzinfo) -> Window | None:
    """The daily window of the first of ``days`` (of ``month``) that ``year`` has in ``zone``.

    A date a zone skipped has no noon: the noon asked for is read with the
    offset before the change and lands in the next day (Kiritimati went
    from 30 December 1994 to 1 January 1995), which may be of another year.
    """
    for day in days:
        found = window_at(Period.DAILY, _noon(year, month, day, zone), zone)
        if _date_of(found, zone).year == year:
            return found
    return None


def window_at(period: Period, instant: datetime, zone: tzinfo) -> Window:
    """The window of ``period`` that contains ``instant``, in timezone ``zone``.

    Raises :class:`ValueError` if ``instant`` is naive, and
    :class:`~agentpolicy.PolicyValidationError` (``INVALID_INPUT``, path
    ``$.now``) for an instant whose window would begin before year 1 or end
    after year 9999, the range of Python's calendar.
    """
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError("instant must be timezone-aware")
    period = Period(period)
    if period is Period.LIFETIME:
        return LIFETIME_WINDOW
    if period is Period.YEARLY:
        return _year(instant, zone)
    arithmetic = _Zone(period, zone)
    try:
        at = instant.astimezone(UTC)
        start, end = arithmetic.start(at), arithmetic.end(at)
        local_start = start.astimezone(zone)
    except (OverflowError, ValueError):
        raise PolicyValidationError.single(
            "$.now",
            f"{instant.isoformat()} is too close to the end of the calendar (years 1 to 9999): "
            f"its {period} window in {zone} cannot be computed",
        ) from None
    # start and end are kept in UTC: Python compares and subtracts two datetimes
    # that share a tzinfo by wall-clock time, which is wrong across a DST change.
    return Window(period, f"{period}:{local_start.isoformat()}", start, end)
