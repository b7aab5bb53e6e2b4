"""Decimal fields for the API: exact decimals in, decimal strings out (never floats)."""

from decimal import Decimal

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers

from plans import money


def decimal_string(value: Decimal, min_places: int = 0) -> str:
    """`value` without trailing zeros, but with at least `min_places` decimals."""
    text = format(value.normalize(), "f")
    places = len(text.partition(".")[2])
    if places < min_places:
        text = format(value.quantize(Decimal(1).scaleb(-min_places)), "f")
    return text


class _DecimalString(serializers.DecimalField):
    min_places = 0

    def to_representation(self, value):
        if value is None:
            return None
        return decimal_string(Decimal(value), self.min_places)


def _nonzero_fraction(places: int) -> str:
    """Regex for 1..`places` decimals that are not all zero (0.000001 … 0.999999)."""
    return "|".join("0" * zeros + rf"[1-9]\d{{0,{places - zeros - 1}}}" for zeros in range(places))


def decimal_pattern(field: serializers.DecimalField) -> str:
    """The decimal strings `field` accepts, as exactly as a regex can say it: its
    places, its sign, and the bounds `min_value` 0 or one smallest step (positive) and a
    power-of-ten `max_value`. (No exponents or leading zeros: clients send plain decimals.)"""
    places = field.decimal_places
    low, high = field.min_value, field.max_value
    digits = field.max_digits - places  # integer digits
    at_max = ""
    if high is not None and high == high.to_integral_value() and high > 0 and str(int(high)).strip("0") == "1":
        digits = len(str(int(high))) - 1  # below 10^k: at most k integer digits; 10^k itself apart
        at_max = rf"|{int(high)}(?:\.0{{1,{places}}})?"
    fraction = rf"(?:\.\d{{1,{places}}})?"
    if low is not None and low == Decimal(1).scaleb(-places):
        body = rf"[1-9]\d{{0,{digits - 1}}}{fraction}|0?\.(?:{_nonzero_fraction(places)})"
    else:
        body = rf"(?:0|[1-9]\d{{0,{digits - 1}}}){fraction}"
    sign = "-?" if low is None or low < 0 else ""
    return rf"^{sign}(?:{body}{at_max})$"


class DecimalStringSchema(OpenApiSerializerFieldExtension):
    """OpenAPI for our decimal fields: a string whose pattern carries the field's own
    bounds (drf-spectacular's default pattern also allows "", "-5" for a positive field)."""

    target_class = "billing.api.fields._DecimalString"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "string", "format": "decimal", "pattern": decimal_pattern(self.target)}


class CreditsField(_DecimalString):
    def __init__(self, **kwargs):
        super().__init__(max_digits=money.CREDIT_DIGITS, decimal_places=money.CREDIT_PLACES, **kwargs)


class RateField(_DecimalString):
    min_places = 2

    def __init__(self, **kwargs):
        super().__init__(max_digits=money.RATE_DIGITS, decimal_places=money.RATE_PLACES, **kwargs)


class MoneyField(_DecimalString):
    """Money as a decimal string. Inside a `CurrencyAmounts` serializer it shows the
    currency's minor units ("49.00" USD, "4900" JPY); elsewhere at least 2 places."""

    min_places = 2

    def __init__(self, **kwargs):
        super().__init__(max_digits=money.MONEY_DIGITS, decimal_places=money.MONEY_PLACES, **kwargs)


class CurrencyAmounts:
    """Serializer mixin: money fields get their places from the output's `currency`."""

    def to_representation(self, instance):
        data = super().to_representation(instance)
        currency = data.get("currency")
        if currency:
            places = money.minor_unit_exponent(currency)
            for name, field in self.fields.items():
                if isinstance(field, MoneyField) and data.get(name) is not None:
                    data[name] = decimal_string(Decimal(data[name]), places)
        return data
