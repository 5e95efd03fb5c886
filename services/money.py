"""Money: integer minor units with an ISO 4217 currency. Never a float.

The API takes amounts the way Stripe, Adyen and Razorpay do: an integer count of the
currency's minor unit (`{"amount_minor": 12345, "currency": "INR"}` is ₹123.45), so a
client can never send more precision than the currency has and no decimal parsing sits on
the money path. `parse_decimal_amount` exists for humans (CLI, admin tools, display) and
rejects over-precision instead of rounding.

Exponents come from ISO 4217 (the number of minor-unit digits). The same table is seeded
into `payments.currencies` by the migration; a test checks the two agree.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

# ISO 4217 code -> minor-unit exponent. Only currencies we can settle are listed; BTC and
# other non-ISO codes are deliberately absent.
CURRENCY_EXPONENTS: Final[dict[str, int]] = {
    "AED": 2, "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CLP": 0, "CNY": 2,
    "CZK": 2, "DKK": 2, "EUR": 2, "GBP": 2, "HKD": 2, "IDR": 2, "ILS": 2, "INR": 2,
    "ISK": 0, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3, "LKR": 2, "MXN": 2, "MYR": 2,
    "NOK": 2, "NZD": 2, "OMR": 3, "PHP": 2, "PKR": 2, "PLN": 2, "SAR": 2, "SEK": 2,
    "SGD": 2, "THB": 2, "TND": 3, "TRY": 2, "UGX": 0, "USD": 2, "VND": 0, "ZAR": 2,
}
# One bound for every single amount: 10^15 minor units (10 trillion in a 2-digit currency)
# is far above any real payment yet leaves sums of many amounts far inside int64.
MAX_AMOUNT_MINOR: Final[int] = 10**15
_INT64_MAX: Final[int] = 2**63 - 1
_DECIMAL_AMOUNT = re.compile(r"^(0|[1-9][0-9]*)(?:\.([0-9]+))?$")
_MAX_DECIMAL_CHARS: Final[int] = 40

assert MAX_AMOUNT_MINOR * 1000 < _INT64_MAX, "a thousand maximal amounts must fit in a bigint"
assert all(len(code) == 3 and code.isupper() for code in CURRENCY_EXPONENTS)


class MoneyError(ValueError):
    """An amount or currency a client sent that we refuse; `field` names the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Money(msgspec.Struct, frozen=True):
    """A positive amount in minor units of one currency (what every money-moving call takes)."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        check_currency(self.currency)
        check_amount_minor(self.amount_minor)

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENTS[self.currency]

    def to_decimal_string(self) -> str:
        return format_minor(self.amount_minor, self.currency)


def check_currency(currency: Any, field: str = "currency") -> str:
    """The currency code if it is a supported ISO 4217 code (upper case), else MoneyError."""
    if not isinstance(currency, str):
        raise MoneyError(field, "must be an ISO 4217 code such as \"INR\"")
    if currency not in CURRENCY_EXPONENTS:
        raise MoneyError(field, f"unsupported currency {currency[:8]!r}; use an upper-case ISO 4217 code")
    return currency


def check_amount_minor(amount_minor: Any, field: str = "amount_minor") -> int:
    """The amount if it is an integer in 1..MAX_AMOUNT_MINOR, else MoneyError.

    bool is an int subclass in Python and floats like 100.0 are integral: both are refused,
    because a client that sends them has the wrong idea of the format.
    """
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise MoneyError(field, "must be an integer number of minor units (e.g. 12345 for 123.45 INR)")
    if amount_minor <= 0:
        raise MoneyError(field, "must be positive")
    if amount_minor > MAX_AMOUNT_MINOR:
        raise MoneyError(field, f"must be at most {MAX_AMOUNT_MINOR}")
    return amount_minor


def parse_money(amount_minor: Any, currency: Any) -> Money:
    """Validate raw API values (already JSON-decoded) into Money; MoneyError names the field."""
    return Money(check_amount_minor(amount_minor), check_currency(currency))


def parse_decimal_amount(text: str, currency: str) -> int:
    """A decimal string in major units ("123.45") to minor units, refusing over-precision.

    "1.005" INR is an error, never 100 or 101 paise: rounding money silently is a bug.
    """
    check_currency(currency)
    if not isinstance(text, str) or len(text) > _MAX_DECIMAL_CHARS:
        raise MoneyError("amount", "must be a decimal string such as \"123.45\"")
    match = _DECIMAL_AMOUNT.match(text)
    if match is None:
        raise MoneyError("amount", "must be a plain decimal such as \"123.45\" (no sign, exponent or spaces)")
    whole, fraction = match.group(1), match.group(2) or ""
    exponent = CURRENCY_EXPONENTS[currency]
    if len(fraction) > exponent:
        raise MoneyError("amount", f"{currency} has {exponent} decimal places; got {len(fraction)}")
    amount_minor = int(whole) * 10**exponent + int(fraction.ljust(exponent, "0") or "0")
    return check_amount_minor(amount_minor, "amount")


def format_minor(amount_minor: int, currency: str) -> str:
    """Minor units as a decimal string in major units: (-12345, "INR") -> "-123.45"."""
    assert isinstance(amount_minor, int) and not isinstance(amount_minor, bool)
    exponent = CURRENCY_EXPONENTS[check_currency(currency)]
    sign = "-" if amount_minor < 0 else ""
    digits = str(abs(amount_minor)).rjust(exponent + 1, "0")
    if exponent == 0:
        return sign + digits
    return f"{sign}{digits[:-exponent]}.{digits[-exponent:]}"
