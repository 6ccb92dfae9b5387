"""Instants as integer microseconds since the epoch, for indexes and scores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(instant: datetime) -> int:
    """Microseconds since 1970-01-01T00:00:00Z."""
    global _last  # noqa: PLW0603 - one pair, replaced whole: a reader sees an old or a new one
    last = _last
    if last[0] is instant:  # the engine converts each call's instant more than once
        return last[1]
    since = instant - _EPOCH
    value = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
    _last = (instant, value)
    return value


_last: tuple[datetime, int] = (_EPOCH, 0)
"""The last instant converted (kept alive here, so no other instant can have its identity)."""


def instant(value: int | str) -> datetime:
    """The instant ``value`` microseconds after the epoch, in UTC."""
    return _EPOCH + timedelta(0, 0, value if type(value) is int else int(value))
