"""Decimal fields for the API: exact decimals in, decimal strings out (never floats)."""

from decimal import Decimal

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
