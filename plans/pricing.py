"""The pricing function: credits → money through a plan's overage tiers.

This is the only place that turns credits into money. The entitlement check, the usage
estimate, the upcoming and closed invoices, the admin preview and upgrade suggestions
all call it, so an estimate and the invoice it becomes cannot disagree.

Tiers are graduated: each band of overage credits is charged at its own unit price
(the first 10 000 overage credits at $0.002, the next at $0.0015, …). Tier amounts are
kept exact; the total is rounded once, half-up, to the currency's minor unit.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from .money import ZERO, round_money


@dataclass(frozen=True)
class TierCharge:
    """Overage credits that fell in one tier, and their exact (unrounded) amount."""

    lower: Decimal  # overage credits already priced below this tier
    upper: Decimal | None  # the tier's `up_to`; None = open-ended
    credits: Decimal
    unit_price: Decimal
    amount: Decimal


@dataclass(frozen=True)
class OverageQuote:
    currency: str
    overage_credits: Decimal
    tiers: tuple[TierCharge, ...]
    amount: Decimal  # rounded once, to the currency's minor unit

    @property
    def exact_amount(self) -> Decimal:
        """The unrounded sum of the tiers (for comparisons against caps)."""
        return sum((tier.amount for tier in self.tiers), ZERO)


@dataclass(frozen=True)
class PeriodQuote:
    """A period's bill: base fee plus its overage."""

    currency: str
    base_amount: Decimal
    overage: OverageQuote

    @property
    def total(self) -> Decimal:
        return self.base_amount + self.overage.amount


def _bands(plan, tiers: Iterable | None) -> list[tuple[Decimal | None, Decimal]]:
    """(up_to, unit_price) bands in ascending order, the last open-ended."""
    if tiers is None:
        tiers = plan.overage_tiers.all()  # uses a prefetch when the caller made one
    bands = sorted(
        ((t.up_to, t.unit_price) for t in tiers),
        key=lambda band: (band[0] is None, band[0] or ZERO),
    )
    if not bands:
        return [(None, plan.overage_unit_price)]
    if bands[-1][0] is not None:
        # Validation requires an open-ended last tier; should one be missing, credits
        # beyond the last bound are charged at the last tier's price, never for free.
        bands.append((None, bands[-1][1]))
    return bands


def price_overage(plan, overage_credits: Decimal, *, tiers: Iterable | None = None) -> OverageQuote:
    """Money for `overage_credits` on `plan`. A plan with overage off bills nothing."""
    if overage_credits < ZERO:
        raise ValueError("overage credits cannot be negative")
    charges: list[TierCharge] = []
    if plan.overage_enabled and overage_credits > ZERO:
        lower = ZERO
        for up_to, unit_price in _bands(plan, tiers):
            if lower >= overage_credits:
                break
            top = overage_credits if up_to is None else min(up_to, overage_credits)
            credits = top - lower
            if credits > ZERO:
                charges.append(TierCharge(lower, up_to, credits, unit_price, credits * unit_price))
            lower = top if up_to is None else max(lower, up_to)
    exact = sum((c.amount for c in charges), ZERO)
    return OverageQuote(
        currency=plan.currency,
        overage_credits=overage_credits,
        tiers=tuple(charges),
        amount=round_money(exact, plan.currency),
    )


def price_period(plan, overage_credits: Decimal, *, tiers: Iterable | None = None,
                 waived: Decimal = ZERO) -> PeriodQuote:
    """The bill of one period of `plan` in which `overage_credits` were not covered by
    any grant (the ledger's figure): base fee plus priced overage, less overage money
    waived (voided) earlier in the period."""
    overage = price_overage(plan, overage_credits, tiers=tiers)
    if waived:
        overage = OverageQuote(currency=overage.currency, overage_credits=overage.overage_credits,
                               tiers=overage.tiers, amount=max(overage.amount - waived, ZERO))
    return PeriodQuote(currency=plan.currency, base_amount=round_money(plan.base_price, plan.currency),
                       overage=overage)


def price_credits_used(plan, credits_used: Decimal, *, tiers: Iterable | None = None) -> PeriodQuote:
    """What `plan` would bill for a period in which `credits_used` credits were used and
    only its included credits were prepaid (admin preview, plan comparison)."""
    return price_period(plan, max(credits_used - plan.included_credits, ZERO), tiers=tiers)


@dataclass(frozen=True)
class BandQuote:
    """The money for the period's overage credits from `start` to `end` (cumulative),
    when `start` of them were already billed: what a later invoice adds."""

    currency: str
    start: Decimal
    end: Decimal
    tiers: tuple[TierCharge, ...]  # only the part of each tier inside the band
    amount: Decimal

    @property
    def credits(self) -> Decimal:
        return self.end - self.start


def price_overage_band(plan, start: Decimal, end: Decimal, *, tiers: Iterable | None = None) -> BandQuote:
    """Price the overage credits between `start` and `end` of a period.

    The amount is price(end) − price(start), each rounded once: however a period's
    overage is split across invoices (progressive billing, then the close), the
    invoices add up to exactly the price of the whole, and no credit is billed twice.
    """
    if end < start:
        raise ValueError("a band cannot end before it starts")
    tiers = list(plan.overage_tiers.all()) if tiers is None else list(tiers)
    whole, before = price_overage(plan, end, tiers=tiers), price_overage(plan, start, tiers=tiers)
    inside = []
    for tier in whole.tiers:
        top = tier.lower + tier.credits
        low = max(tier.lower, start)
        if top > low:
            credits = top - low
            inside.append(TierCharge(low, tier.upper, credits, tier.unit_price, credits * tier.unit_price))
    return BandQuote(currency=plan.currency, start=start, end=end, tiers=tuple(inside),
                     amount=whole.amount - before.amount)
