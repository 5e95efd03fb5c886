"""Money parsing and formatting: integers in minor units only, strict validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.money import (
    CURRENCY_EXPONENTS,
    MAX_AMOUNT_MINOR,
    Money,
    MoneyError,
    format_minor,
    parse_decimal_amount,
    parse_money,
)


def test_exponents_follow_iso_4217() -> None:
    assert CURRENCY_EXPONENTS["INR"] == 2
    assert CURRENCY_EXPONENTS["USD"] == 2
    assert CURRENCY_EXPONENTS["JPY"] == 0
    assert CURRENCY_EXPONENTS["KWD"] == 3
    assert "BTC" not in CURRENCY_EXPONENTS


def test_parse_money_accepts_positive_integers() -> None:
    money = parse_money(12345, "INR")
    assert money == Money(12345, "INR")
    assert money.to_decimal_string() == "123.45"
    assert parse_money(MAX_AMOUNT_MINOR, "JPY").amount_minor == MAX_AMOUNT_MINOR


@pytest.mark.parametrize("amount", [0, -1, -100, MAX_AMOUNT_MINOR + 1])
def test_parse_money_rejects_out_of_range(amount: int) -> None:
    with pytest.raises(MoneyError) as err:
        parse_money(amount, "INR")
    assert err.value.field == "amount_minor"


@pytest.mark.parametrize("amount", [1.0, 12.5, "100", True, None, [1]])
def test_parse_money_rejects_non_integers(amount: object) -> None:
    with pytest.raises(MoneyError, match="integer number of minor units"):
        parse_money(amount, "INR")


@pytest.mark.parametrize("currency", ["inr", "BTC", "XXX", "", "INRR", 356, None])
def test_parse_money_rejects_unknown_currencies(currency: object) -> None:
    with pytest.raises(MoneyError) as err:
        parse_money(100, currency)
    assert err.value.field == "currency"


def test_money_struct_validates_on_construction() -> None:
    with pytest.raises(MoneyError):
        Money(0, "INR")
    with pytest.raises(MoneyError):
        Money(1, "BTC")


@pytest.mark.parametrize(("text", "currency", "minor"), [
    ("123.45", "INR", 12345), ("123.4", "INR", 12340), ("123", "INR", 12300), ("0.01", "USD", 1),
    ("500", "JPY", 500), ("1.234", "KWD", 1234), ("0.001", "KWD", 1),
])
def test_parse_decimal_amount(text: str, currency: str, minor: int) -> None:
    assert parse_decimal_amount(text, currency) == minor


@pytest.mark.parametrize(("text", "currency"), [
    ("1.005", "INR"), ("1.5", "JPY"), ("0.0001", "KWD"),  # over-precision
    ("-1.00", "INR"), ("+1", "INR"), ("1e3", "INR"), (" 1", "INR"), ("1.", "INR"), (".5", "INR"),
    ("01.00", "INR"), ("1,000", "INR"), ("", "INR"), ("NaN", "INR"), ("0", "INR"), ("0.00", "INR"),
])
def test_parse_decimal_amount_rejects(text: str, currency: str) -> None:
    with pytest.raises(MoneyError):
        parse_decimal_amount(text, currency)


@pytest.mark.parametrize(("minor", "currency", "text"), [
    (12345, "INR", "123.45"), (5, "INR", "0.05"), (-5, "INR", "-0.05"), (0, "USD", "0.00"),
    (500, "JPY", "500"), (1, "KWD", "0.001"), (-1234567, "KWD", "-1234.567"),
])
def test_format_minor(minor: int, currency: str, text: str) -> None:
    assert format_minor(minor, currency) == text


@given(st.sampled_from(sorted(CURRENCY_EXPONENTS)), st.integers(1, MAX_AMOUNT_MINOR))
def test_format_then_parse_round_trips(currency: str, minor: int) -> None:
    assert parse_decimal_amount(format_minor(minor, currency), currency) == minor
