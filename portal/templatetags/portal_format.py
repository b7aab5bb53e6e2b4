"""Formatting at the edge: money and credits as people read them."""

from decimal import Decimal

from django import template

from plans.money import format_credits, format_money

register = template.Library()


@register.filter
def money(amount, currency: str) -> str:
    """`{{ amount|money:currency }}` → `USD 1,234.57`."""
    if amount is None:
        return "—"
    return format_money(Decimal(amount), currency)


@register.filter
def credits(amount) -> str:
    """`{{ amount|credits }}` → `15,000` or `0.5`."""
    if amount is None:
        return "—"
    return format_credits(Decimal(amount))
