"""Instants as integer microseconds since the epoch, for indexes and scores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(instant: datetime) -> int:
    """Microseconds since 1970-01-01T00:00:00Z."""
    since = instant - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


def instant(value: int | str) -> datetime:
    """The instant ``value`` microseconds after the epoch, in UTC."""
    return _EPOCH + timedelta(0, 0, value if type(value) is int else int(value))
