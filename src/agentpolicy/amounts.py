"""Exact amounts: an integer count of a token's smallest unit, its decimals and symbol.

No float ever touches an amount. Amounts with different ``decimals`` are
compared by scaling both to the larger number of decimals, which multiplies
and never rounds.
"""

from __future__ import annotations

import re
from typing import cast

import attrs

from agentpolicy._checks import (
    MAX_DIGITS,
    check_int,
    checked,
    identifier,
    int_between,
    raise_if,
    type_name,
    units_problems,
    validate,
)
from agentpolicy.errors import PolicyValidationError, Problem

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
    "parse_base_units",
    "parse_units",
    "same_symbol",
    "scale_units",
]

DEFAULT_DECIMALS = 6
"""Decimals of an amount or request that names none (as in the t402 agent-policy design)."""

DEFAULT_SYMBOL = "USDT"
"""Symbol of an amount or request that names none (as in the t402 agent-policy design)."""

MAX_DECIMALS = 255
"""ERC-20 ``decimals`` is a uint8, so no real token has more."""


def parse_base_units(raw: object, path: str = "$") -> int:
    """Parse a non-negative count of base units from an ``int`` or a string of ASCII digits.

    ``parse_base_units("500250000") == 500_250_000``. Raises
    :class:`~agentpolicy.PolicyValidationError` for negatives, floats,
    booleans, ``"1.5"``, ``"1e6"``, ``""``, whitespace, ``"0x10"`` and more than
    :data:`MAX_DIGITS` digits.
    """
    raise_if(units_problems(raw, path))
    return int(cast(int | str, raw))


_HUMAN = re.compile(r"([0-9]+)(?:\.([0-9]+))?")


def parse_units(text: object, decimals: int, path: str = "$") -> int:
    """Parse a human amount such as ``"500.25"`` into base units of a token with ``decimals``.

    ``parse_units("500.25", 6) == 500_250_000``, as viem's and ethers'
    ``parseUnits``. Exact: the digits are shifted, never rounded, and no
    float or Decimal is involved. Raises
    :class:`~agentpolicy.PolicyValidationError` for anything but ASCII digits
    with at most one ``.`` between digits: more fractional digits than
    ``decimals``, negatives, exponents, whitespace, ``".5"``, ``"5."``,
    separators, or a result of more than :data:`MAX_DIGITS` digits.
    """
    raise_if(check_int(decimals, "$.decimals", 0, MAX_DECIMALS))
    if not isinstance(text, str):
        raise PolicyValidationError.single(
            path, f"must be a decimal string such as '500.25', not {type_name(text)}"
        )
    match = _HUMAN.fullmatch(text) if text.isascii() else None
    if match is None:
        raise PolicyValidationError.single(
            path,
            f"must be digits with an optional '.' and fraction, such as '500.25', got {text!r}",
        )
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > decimals:
        raise PolicyValidationError.single(
            path,
            f"has {len(fraction)} digits after the point but the token has {decimals} decimals",
        )
    digits = (whole + fraction.ljust(decimals, "0")).lstrip("0") or "0"
    if len(digits) > MAX_DIGITS:
        raise PolicyValidationError.single(
            path, f"must have at most {MAX_DIGITS} digits in base units"
        )
    return int(digits)


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
    if amount.decimals == limit.decimals and (used_decimals == limit.decimals or not used):
        return used + amount.value > limit.value  # the common case: nothing to scale
    d = max(used_decimals, amount.decimals, limit.decimals)
    return scale_units(used, used_decimals, d) + amount.scaled_to(d) > limit.scaled_to(d)


def same_symbol(a: str, b: str) -> bool:
    """Whether two token symbols name the same asset (compared case-insensitively)."""
    return a.casefold() == b.casefold()


def format_units(value: int, decimals: int) -> str:
    """Render base units as an exact decimal string, as viem's and ethers' ``formatUnits``.

    ``format_units(500_250_000, 6) == "500.25"``; ``format_units(1, 6) ==
    "0.000001"``; trailing zeros are dropped and a negative value keeps its
    sign. :func:`parse_units` reads the result back to ``value``.
    """
    if type(value) is not int or type(decimals) is not int or decimals < 0:
        raise PolicyValidationError.single(
            "$", "format_units needs an integer value and non-negative integer decimals"
        )
    sign, magnitude = ("-", -value) if value < 0 else ("", value)
    if decimals == 0:
        return f"{sign}{magnitude}"
    whole, frac = divmod(magnitude, 10**decimals)
    digits = str(frac).rjust(decimals, "0").rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def _non_negative(value: object, path: str) -> list[Problem]:
    if type(value) is int and value >= 0:
        return []
    return [Problem(path, "must be a non-negative integer")]


@attrs.frozen
class Amount:
    """An exact amount of a token: ``value`` base units with ``decimals`` and ``symbol``.

    ``Amount(100_000000)`` is 100 USDT (6 decimals). ``value`` must be a
    non-negative ``int`` of any size; the JSON form (and :func:`parse_base_units`,
    used on every input) also accepts a string of at most :data:`MAX_DIGITS`
    digits.
    Raises :class:`~agentpolicy.PolicyValidationError` when a field is invalid.
    """

    value: int = checked(
        _non_negative,
        schema={
            "description": "base units: a string of digits (or a JSON integer)",
            "anyOf": [
                {"type": "string", "pattern": f"^[0-9]{{1,{MAX_DIGITS}}}$"},
                {"type": "integer", "minimum": 0},
            ],
        },
    )
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
        if self.decimals == other.decimals:
            a, b = self.value, other.value
            return (a > b) - (a < b)
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
