"""One duration syntax for every setting: ``500ms``, ``30s``, ``5m``, ``1h``, ``7d``.

A duration is a positive whole number followed by a unit: ``ms``
(milliseconds), ``s`` (seconds), ``m`` (minutes), ``h`` (hours) or ``d``
(days). A bare number keeps the unit its setting has always had: seconds
for ``AGENT_POLICY_RESERVATION_TTL``, milliseconds for a webhook
``timeout`` (as in the t402 agent-policy design).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Literal

from agentpolicy._checks import quoted
from agentpolicy.errors import PolicyValidationError

__all__ = ["MAX_DURATION", "UNITS", "parse_duration", "parse_since"]

MAX_DURATION = timedelta(days=36525)
"""The longest duration any setting or argument takes: a hundred years."""

UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
"""The unit suffixes and what they mean."""

_DURATION = re.compile(r"([0-9]{1,15})(ms|s|m|h|d)?")


def parse_duration(raw: object, path: str, *, bare: Literal["ms", "s"] = "s") -> timedelta:
    """Read a positive duration: a ``timedelta``, a positive ``int`` or a string such as ``5m``.

    An ``int`` or a bare number of digits is in ``bare`` units. Surrounding
    whitespace is ignored. Raises :class:`~agentpolicy.PolicyValidationError`
    at ``path`` for anything else, for zero, and for more than
    :data:`MAX_DURATION`.
    """
    value: timedelta | None = None
    if isinstance(raw, timedelta):
        value = raw
    elif type(raw) is int:
        value = _make(raw, bare, path)
    elif isinstance(raw, str):
        match = _DURATION.fullmatch(raw.strip())
        if match is not None:
            value = _make(int(match.group(1)), match.group(2) or bare, path)
    if value is not None and value > MAX_DURATION:
        raise PolicyValidationError.single(path, f"is too long: {quoted(raw)} (at most 36525d)")
    if value is None or value <= timedelta(0):
        raise PolicyValidationError.single(
            path,
            f"must be a positive duration such as 500ms, 30s, 5m, 1h or 7d "
            f"(a bare number is {UNITS[bare]}), got {quoted(raw)}",
        )
    return value


def _make(number: int, unit: str, path: str) -> timedelta:
    try:
        return timedelta(**{UNITS[unit]: number})
    except OverflowError:
        raise PolicyValidationError.single(path, f"is too long: {number}{unit}") from None


def parse_since(raw: object, path: str) -> datetime | timedelta:
    """Read "since when": a duration back from now (``30d``, ``12h``) or an ISO 8601 instant.

    The instant must carry an offset (``2026-01-01T00:00:00Z``). Raises
    :class:`~agentpolicy.PolicyValidationError` at ``path`` for anything else.
    """
    if isinstance(raw, str) and _DURATION.fullmatch(raw.strip()):
        return parse_duration(raw, path, bare="s")
    from agentpolicy.codec import parse_instant  # noqa: PLC0415 - the codec loads on demand

    try:
        return parse_instant(raw, path)
    except PolicyValidationError:
        raise PolicyValidationError.single(
            path,
            "must be a duration back from now such as 30d or 12h, or an ISO 8601 instant "
            f"with an offset such as 2026-01-01T00:00:00Z, got {quoted(raw)}",
        ) from None
