from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agentpolicy
from agentpolicy import Amount, PolicyValidationError, parse_base_units, parse_units
from agentpolicy.amounts import (
    MAX_DIGITS,
    compare_units,
    format_units,
    same_symbol,
    scale_units,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(0, 0), (1, 1), ("0", 0), ("100000000", 100_000_000), ("007", 7), (10**40, 10**40)],
)
def test_parse_base_units_accepts_integers_and_digit_strings(raw: object, expected: int) -> None:
    assert parse_base_units(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [-1, "-1", 1.5, 1.0, "1.5", "1e6", "", " 1", "1 ", "0x10", True, False, None, [], "١٢", "+1"],
)
def test_parse_base_units_refuses_everything_else(raw: object) -> None:
    with pytest.raises(PolicyValidationError) as err:
        parse_base_units(raw, "$.amount")
    assert err.value.code == "INVALID_INPUT"
    assert err.value.problems[0].path == "$.amount"


def test_parse_base_units_refuses_more_digits_than_the_cap() -> None:
    assert parse_base_units("9" * MAX_DIGITS) == 10**MAX_DIGITS - 1
    for raw in ("1" + "0" * MAX_DIGITS, 10**MAX_DIGITS):
        with pytest.raises(PolicyValidationError, match="at most"):
            parse_base_units(raw)


@pytest.mark.parametrize(
    ("text", "decimals", "units"),
    [
        ("500.25", 6, 500_250_000),
        ("500", 6, 500_000_000),
        ("0.000001", 6, 1),
        ("1.5", 18, 1_500_000_000_000_000_000),
        ("007.10", 2, 710),
        ("42", 0, 42),
        ("0", 6, 0),
        ("123456789012345678901234567890.123456789012345678", 18,
         123456789012345678901234567890_123456789012345678),
    ],
)  # fmt: skip
def test_parse_units_reads_human_amounts_exactly(text: str, decimals: int, units: int) -> None:
    assert parse_units(text, decimals) == units
    assert agentpolicy.parse_units is parse_units


@pytest.mark.parametrize(
    ("text", "decimals"),
    [
        ("1.0000001", 6), ("0.1", 0), ("-1", 6), ("-0.5", 6), ("1e6", 6), ("1E-6", 6),
        (" 1", 6), ("1 ", 6), ("1\n", 6), ("", 6), (".5", 6), ("5.", 6), ("1.2.3", 6),
        ("1,5", 6), ("1_000", 6), ("+1", 6), ("0x10", 6), ("١٢", 6), ("nan", 6), ("inf", 6),
        (1, 6), (1.5, 6), (None, 6), ("9" * 97, 0),
    ],
)  # fmt: skip
def test_parse_units_refuses_what_is_not_an_exact_decimal(text: object, decimals: int) -> None:
    with pytest.raises(PolicyValidationError) as err:
        parse_units(text, decimals, "$.amount")
    assert err.value.code == "INVALID_INPUT"
    assert err.value.problems[0].path == "$.amount"


@pytest.mark.parametrize("decimals", [-1, 256, True, "6"])
def test_parse_units_refuses_bad_decimals(decimals: object) -> None:
    with pytest.raises(PolicyValidationError) as err:
        parse_units("1", decimals)  # type: ignore[arg-type]
    assert err.value.problems[0].path == "$.decimals"


@given(st.integers(-(10**40), 10**40), st.integers(0, 40))
def test_format_then_parse_units_round_trips(value: int, decimals: int) -> None:
    text = format_units(value, decimals)
    assert "e" not in text
    if value >= 0:
        assert parse_units(text, decimals) == value
    else:
        assert text.startswith("-")
        assert parse_units(text[1:], decimals) == -value


def test_format_units_matches_viem_and_ethers() -> None:
    assert agentpolicy.format_units(500_250_000, 6) == "500.25"
    assert format_units(-1_500_000, 6) == "-1.5"
    assert format_units(10**18, 18) == "1"
    with pytest.raises(PolicyValidationError):
        format_units(1, -1)
    with pytest.raises(PolicyValidationError):
        format_units(1.5, 6)  # type: ignore[arg-type]


def test_forty_digit_amounts_compare_exactly() -> None:
    big = 10**39 + 1
    assert Amount(big).compare(Amount(big - 1)) == 1
    assert Amount(big).compare(Amount(big)) == 0
    assert Amount(big - 1).compare(Amount(big)) == -1
    # a float would see these two as equal
    assert float(big) == float(big - 1)


@given(st.integers(0, 10**40), st.integers(0, 10**40))
def test_compare_matches_integer_order_at_forty_digits(a: int, b: int) -> None:
    assert Amount(a).compare(Amount(b)) == (a > b) - (a < b)


@given(st.integers(0, 10**40), st.integers(0, 60), st.integers(0, 60))
def test_scaling_between_decimals_never_rounds(value: int, d1: int, extra: int) -> None:
    scaled = scale_units(value, d1, d1 + extra)
    assert scaled == value * 10**extra
    assert scaled // 10**extra == value
    assert scaled % 10**extra == 0
    assert compare_units(value, d1, scaled, d1 + extra) == 0


def test_scaling_down_is_refused_since_it_would_round() -> None:
    with pytest.raises(ValueError, match="round"):
        scale_units(1, 6, 2)


def test_amounts_with_different_decimals_compare_by_scaling_up() -> None:
    one_usdt_6 = Amount(1_000_000, 6)
    one_usdt_18 = Amount(10**18, 18)
    assert one_usdt_6.compare(one_usdt_18) == 0
    assert Amount(10**18 + 1, 18).compare(one_usdt_6) == 1
    assert one_usdt_6.plus(Amount(1, 18)) == Amount(10**18 + 1, 18)


def test_minus_floor_zero_never_goes_below_zero() -> None:
    assert Amount(5).minus_floor_zero(Amount(7)) == Amount(0)
    assert Amount(7).minus_floor_zero(Amount(5)) == Amount(2)


@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [(1_500_000, 6, "1.5"), (1, 6, "0.000001"), (500_000_000, 6, "500"), (42, 0, "42")],
)
def test_format_units_is_exact(value: int, decimals: int, text: str) -> None:
    assert format_units(value, decimals) == text


def test_human_form_names_the_symbol() -> None:
    assert Amount(500_000_000).human() == "500 USDT"
    assert str(Amount(1, 18, "DAI")) == "0.000000000000000001 DAI"


def test_symbols_compare_ignoring_case() -> None:
    assert same_symbol("USDT", "usdt")
    assert not same_symbol("USDT", "USDC")


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"value": -1}, "$.value"),
        ({"value": "5"}, "$.value"),
        ({"value": True}, "$.value"),
        ({"value": 1, "decimals": 256}, "$.decimals"),
        ({"value": 1, "decimals": True}, "$.decimals"),
        ({"value": 1, "symbol": ""}, "$.symbol"),
        ({"value": 1, "symbol": " USDT"}, "$.symbol"),
    ],
)
def test_amount_validates_on_construction(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        Amount(**kwargs)  # type: ignore[arg-type]
    assert [p.path for p in err.value.problems] == [path]


def test_amount_defaults_are_6_decimals_of_usdt() -> None:
    assert Amount(1) == Amount(1, 6, "USDT")


@given(
    st.none() | st.tuples(st.integers(0, 10**40), st.integers(0, 30)),
    st.tuples(st.integers(0, 10**40), st.integers(0, 30)),
    st.tuples(st.integers(0, 10**40), st.integers(0, 30)),
)
def test_over_limit_is_exact_against_fractions(
    used: tuple[int, int] | None, amount: tuple[int, int], limit: tuple[int, int]
) -> None:
    from fractions import Fraction

    from agentpolicy.amounts import over_limit

    def value(x: tuple[int, int] | None) -> Fraction:
        return Fraction(0) if x is None else Fraction(x[0], 10 ** x[1])

    expected = value(used) + value(amount) > value(limit)
    as_amount = None if used is None else Amount(*used)
    assert over_limit(as_amount, Amount(*amount), Amount(*limit)) is expected
