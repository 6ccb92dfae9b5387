"""Calendar spending windows in a policy's timezone.

The hour starts at :00, the day at local midnight, the week on Monday 00:00
(ISO 8601) and the month on the 1st at 00:00, all in the policy's IANA
timezone. A daylight-saving change never moves a window off local midnight:
a day is 23 or 25 hours long when the clocks change.

Each window has a stable ``key`` (the period and the local start with its UTC
offset, such as ``"daily:2026-03-08T00:00:00-05:00"``) under which storages
keep usage counters. During the repeated hour of a fall-back change the two
local 01:00 hours have different offsets, hence different keys.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime, time, timedelta, tzinfo

import attrs

__all__ = ["WINDOW_PERIODS", "Period", "Window", "window_at"]


class Period(enum.StrEnum):
    """A calendar period over which a spending limit applies."""

    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


WINDOW_PERIODS: tuple[Period, ...] = tuple(Period)
"""The window periods in the order the limits are checked."""


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


def _day_start(day: date, zone: tzinfo) -> datetime:
    # fold=0 is the first of two repeated midnights, and inside a gap it
    # resolves to the instant the clocks jump, which is the day's first instant.
    return datetime.combine(day, time(0), tzinfo=zone)


def _next_month(day: date) -> date:
    return date(day.year + (day.month == 12), day.month % 12 + 1, 1)


def window_at(period: Period, instant: datetime, zone: tzinfo) -> Window:
    """The window of ``period`` that contains ``instant``, in timezone ``zone``.

    Raises :class:`ValueError` if ``instant`` is naive.
    """
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError("instant must be timezone-aware")
    local = instant.astimezone(zone)
    if period is Period.HOURLY:
        start = local.replace(minute=0, second=0, microsecond=0)
        end = (start.astimezone(UTC) + timedelta(hours=1)).astimezone(zone)
    else:
        day = local.date()
        if period is Period.DAILY:
            first, after = day, day + timedelta(days=1)
        elif period is Period.WEEKLY:
            first = day - timedelta(days=day.weekday())
            after = first + timedelta(days=7)
        else:
            first = day.replace(day=1)
            after = _next_month(first)
        start, end = _day_start(first, zone), _day_start(after, zone)
    # start and end are kept in UTC: Python compares and subtracts two datetimes
    # that share a tzinfo by wall-clock time, which is wrong across a DST change.
    return Window(
        period, f"{period}:{start.isoformat()}", start.astimezone(UTC), end.astimezone(UTC)
    )
