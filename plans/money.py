"""Money and credit precision, in one place.

Every money and credit column uses these, so a per-credit rate such as $0.0015 is exact
and no arithmetic ever passes through float. Rounding to the currency's minor unit
happens only in ``round_money``, once, at the line (invoice line or estimate).
"""

from decimal import ROUND_HALF_UP, Decimal

from django.db import models

# Credits may be fractional (1 credit per 1 000 tokens ⇒ 0.001 credit for one token).
CREDIT_PLACES = 6
CREDIT_STEP = Decimal(1).scaleb(-CREDIT_PLACES)  # a millionth of a credit
CREDIT_DIGITS = 24
# Unit prices can be sub-cent (0.002 per credit); stored exactly.
RATE_PLACES = 8
RATE_DIGITS = 20
# Money amounts (base price, caps, line totals).
MONEY_PLACES = 4
MONEY_DIGITS = 20

ZERO = Decimal("0")

# ISO 4217 exponent for currencies whose minor unit is not 1/100.
_MINOR_UNIT_EXPONENT = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "JOD": 3, "OMR": 3, "TND": 3}

CURRENCY_CHOICES = [
    ("USD", "US dollar"),
    ("EUR", "Euro"),
    ("GBP", "Pound sterling"),
    ("CAD", "Canadian dollar"),
    ("AUD", "Australian dollar"),
    ("CHF", "Swiss franc"),
    ("JPY", "Japanese yen"),
    ("SEK", "Swedish krona"),
    ("INR", "Indian rupee"),
    ("BRL", "Brazilian real"),
]


def minor_unit_exponent(currency: str) -> int:
    return _MINOR_UNIT_EXPONENT.get(currency.upper(), 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Half-up to the currency's minor unit. The only rounding of money in Overage."""
    quantum = Decimal(1).scaleb(-minor_unit_exponent(currency))
    return amount.quantize(quantum, rounding=ROUND_HALF_UP)


def CreditField(**kwargs) -> models.DecimalField:  # noqa: N802 - reads like a field class
    return models.DecimalField(max_digits=CREDIT_DIGITS, decimal_places=CREDIT_PLACES, **kwargs)


def RateField(**kwargs) -> models.DecimalField:  # noqa: N802
    return models.DecimalField(max_digits=RATE_DIGITS, decimal_places=RATE_PLACES, **kwargs)


def MoneyField(**kwargs) -> models.DecimalField:  # noqa: N802
    return models.DecimalField(max_digits=MONEY_DIGITS, decimal_places=MONEY_PLACES, **kwargs)


def quantize_credits(value: Decimal) -> Decimal:
    """An event's credits (quantity × credits per unit) are kept to CREDIT_PLACES
    (a millionth of a credit), half-up. This happens once per event; every sum of
    credits after that is exact."""
    return value.quantize(CREDIT_STEP, rounding=ROUND_HALF_UP)


def credits_total(value) -> Decimal:
    """An aggregated sum of credits as read from the database, at credit precision.
    (On SQLite, SUM over decimals runs in floating point and Django does not quantize
    aggregates; on PostgreSQL this changes nothing.)"""
    return quantize_credits(Decimal(value)) if value is not None else ZERO


def format_money(amount: Decimal, currency: str) -> str:
    """`USD 1,234.57`: currency code, thousands separators, the currency's minor units.
    Display only; the amount is rounded by `round_money`, the one rounding helper."""
    places = minor_unit_exponent(currency)
    return f"{currency} {round_money(amount, currency):,.{places}f}"


def format_credits(credits: Decimal) -> str:
    """`15,000` or `0.5`: credits without trailing zeros."""
    return f"{credits.normalize():,f}"
