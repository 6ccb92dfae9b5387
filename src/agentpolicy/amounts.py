"""Exact amounts: an integer count of a token's smallest unit, its decimals and symbol.

No float ever touches an amount. Amounts with different ``decimals`` are
compared by scaling both to the larger number of decimals, which multiplies
and never rounds.
"""

from __future__ import annotations

from typing import cast

import attrs

from agentpolicy._checks import (
    MAX_DIGITS,
    checked,
    identifier,
    int_between,
    raise_if,
    units_problems,
    validate,
)
from agentpolicy.errors import Problem

__all__ = [
    "DEFAULT_DECIMALS",
    "DEFAULT_SYMBOL",
    "MAX_DECIMALS",
    "MAX_DIGITS",
    "Amount",
    "compare_units",
    "format_units",
    "over_limit",
    "over_limit_units",
    "parse_units",
    "same_symbol",
    "scale_units",
]

DEFAULT_DECIMALS = 6
"""Decimals of an amount or request that names none (the seed's default)."""

DEFAULT_SYMBOL = "USDT"
"""Symbol of an amount or request that names none (the seed's default)."""

MAX_DECIMALS = 255
"""ERC-20 ``decimals`` is a uint8, so no real token has more."""


def parse_units(raw: object, path: str = "$") -> int:
    """Parse a non-negative count of base units from an ``int`` or a string of ASCII digits.

    Raises :class:`~agentpolicy.PolicyValidationError` for negatives, floats,
    booleans, ``"1.5"``, ``"1e6"``, ``""``, whitespace, ``"0x10"`` and more than
    :data:`MAX_DIGITS` digits.
    """
    raise_if(units_problems(raw, path))
    return int(cast(int | str, raw))


def scale_units(value: int, from_decimals: int, to_decimals: int) -> int:
    """Express ``value`` (in ``from_decimals``) in ``to_decimals``; only ever scales up.

    Raises :class:`ValueError` when ``to_decimals < from_decimals``, since that
    would have to round.
    """
    if to_decimals < from_decimals:
        raise ValueError("scaling to fewer decimals would round")
    factor: int = 10 ** (to_decimals - from_decimals)
    return value * factor


def compare_units(a: int, a_decimals: int, b: int, b_decimals: int) -> int:
    """Compare two amounts exactly: negative if ``a < b``, zero if equal, positive if more."""
    d = max(a_decimals, b_decimals)
    x = scale_units(a, a_decimals, d)
    y = scale_units(b, b_decimals, d)
    return (x > y) - (x < y)


def over_limit(used: Amount | None, amount: Amount, limit: Amount) -> bool:
    """Whether ``used + amount > limit``, exactly: the rule of every window limit.

    ``used`` is ``None`` when nothing was used. Symbols are not compared.
    """
    if used is None:
        return over_limit_units(0, 0, amount, limit)
    return over_limit_units(used.value, used.decimals, amount, limit)


def over_limit_units(used: int, used_decimals: int, amount: Amount, limit: Amount) -> bool:
    """:func:`over_limit` with the used amount as base units and decimals."""
    d = max(used_decimals, amount.decimals, limit.decimals)
    return scale_units(used, used_decimals, d) + amount.scaled_to(d) > limit.scaled_to(d)


def same_symbol(a: str, b: str) -> bool:
    """Whether two token symbols name the same asset (compared case-insensitively)."""
    return a.casefold() == b.casefold()


def format_units(value: int, decimals: int) -> str:
    """Render base units as an exact decimal string: ``1500000, 6 -> "1.5"``."""
    if decimals == 0:
        return str(value)
    whole, frac = divmod(value, 10**decimals)
    digits = str(frac).rjust(decimals, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def _non_negative(value: object, path: str) -> list[Problem]:
    if type(value) is int and value >= 0:
        return []
    return [Problem(path, "must be a non-negative integer")]


@attrs.frozen
class Amount:
    """An exact amount of a token: ``value`` base units with ``decimals`` and ``symbol``.

    ``Amount(100_000000)`` is 100 USDT (6 decimals). ``value`` must be a
    non-negative ``int`` of any size; the JSON form (and :func:`parse_units`,
    used on every input) also accepts a string of at most :data:`MAX_DIGITS`
    digits.
    Raises :class:`~agentpolicy.PolicyValidationError` when a field is invalid.
    """

    value: int = checked(_non_negative)
    decimals: int = checked(int_between(0, MAX_DECIMALS), default=DEFAULT_DECIMALS)
    symbol: str = checked(identifier(32), default=DEFAULT_SYMBOL)

    def __attrs_post_init__(self) -> None:
        # The common case, checked without building problem lists: amounts are made
        # on every decision. Anything unusual takes the full check with its messages.
        symbol = self.symbol
        if not (
            type(self.value) is int
            and self.value >= 0
            and type(self.decimals) is int
            and 0 <= self.decimals <= MAX_DECIMALS
            and type(symbol) is str
            and 0 < len(symbol) <= 32
            and symbol.isprintable()
            and symbol == symbol.strip()
        ):
            validate(self)

    def scaled_to(self, decimals: int) -> int:
        """Return the value in ``decimals`` (which must be at least ``self.decimals``)."""
        return scale_units(self.value, self.decimals, decimals)

    def compare(self, other: Amount) -> int:
        """Compare exactly with ``other``, ignoring symbols: -1, 0 or 1."""
        return compare_units(self.value, self.decimals, other.value, other.decimals)

    def plus(self, other: Amount) -> Amount:
        """The exact sum, in the finer of the two decimals and this amount's symbol."""
        d = max(self.decimals, other.decimals)
        return Amount(self.scaled_to(d) + other.scaled_to(d), d, self.symbol)

    def minus_floor_zero(self, other: Amount) -> Amount:
        """The exact difference, never below zero, in the finer of the two decimals."""
        d = max(self.decimals, other.decimals)
        return Amount(max(0, self.scaled_to(d) - other.scaled_to(d)), d, self.symbol)

    def human(self) -> str:
        """Human form with the symbol, exact: ``"500 USDT"``, ``"0.000001 USDT"``."""
        return f"{format_units(self.value, self.decimals)} {self.symbol}"

    def __str__(self) -> str:
        return self.human()
