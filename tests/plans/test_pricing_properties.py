"""Properties of the one pricing function (plans/pricing.py), over random graduated tiers,
amounts and currencies: monotonic in credits, tiers that add up, rounding within half a
minor unit. Plans are unsaved model instances and tiers plain objects: no database."""

from decimal import Decimal
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from plans.models import Plan
from plans.money import CREDIT_PLACES, MONEY_PLACES, RATE_PLACES, minor_unit_exponent
from plans.pricing import price_overage, price_overage_band, price_period

CURRENCIES = ["USD", "JPY", "KWD"]  # minor units of 1/100, 1 and 1/1000
# Up to a trillion credits a period: beyond any real customer, well inside the columns.
credits = st.decimals(min_value=0, max_value=10**12, places=CREDIT_PLACES)
rates = st.decimals(min_value=0, max_value=10, places=RATE_PLACES)


@st.composite
def plans(draw):
    """A plan with overage on and 0–4 graduated tiers (ascending bounds, an open last
    tier), or none: then the flat overage_unit_price applies."""
    bounds = sorted(set(draw(st.lists(st.decimals(min_value="0.000001", max_value=10**9, places=CREDIT_PLACES),
                                      max_size=3))))
    tiers = [SimpleNamespace(up_to=bound, unit_price=draw(rates)) for bound in bounds]
    if tiers or draw(st.booleans()):
        tiers.append(SimpleNamespace(up_to=None, unit_price=draw(rates)))
    plan = Plan(code="p", name="P", currency=draw(st.sampled_from(CURRENCIES)), overage_enabled=True,
                overage_unit_price=draw(rates), base_price=draw(st.decimals(min_value=0, max_value=10**6,
                                                                             places=MONEY_PLACES)))
    return plan, tiers


def half_minor_unit(currency: str) -> Decimal:
    return Decimal(1).scaleb(-minor_unit_exponent(currency)) / 2


def expected_exact(plan, tiers, amount: Decimal) -> Decimal:
    """Σ over tiers of (credits that fall in the tier) × its unit price, from scratch."""
    if not tiers:
        return amount * plan.overage_unit_price
    total, lower = Decimal(0), Decimal(0)
    for tier in sorted(tiers, key=lambda t: (t.up_to is None, t.up_to or 0)):
        upper = amount if tier.up_to is None else min(tier.up_to, amount)
        total += max(upper - lower, Decimal(0)) * tier.unit_price
        lower = max(lower, upper)
    return total


@given(plans(), credits, credits)
def test_more_credits_never_cost_less(plan_tiers, a, b):
    plan, tiers = plan_tiers
    low, high = sorted((a, b))

    assert price_overage(plan, low, tiers=tiers).amount <= price_overage(plan, high, tiers=tiers).amount
    assert price_overage(plan, low, tiers=tiers).exact_amount <= price_overage(plan, high, tiers=tiers).exact_amount


@given(plans(), credits)
def test_the_price_is_the_sum_over_tiers_of_the_credits_in_each_at_its_price(plan_tiers, amount):
    plan, tiers = plan_tiers

    quote = price_overage(plan, amount, tiers=tiers)

    assert quote.exact_amount == expected_exact(plan, tiers, amount)
    assert sum((t.credits for t in quote.tiers), Decimal(0)) == amount
    for tier in quote.tiers:
        assert tier.amount == tier.credits * tier.unit_price
        assert tier.upper is None or tier.lower + tier.credits <= tier.upper


@given(plans(), credits)
def test_rounding_moves_a_line_by_at_most_half_a_minor_unit(plan_tiers, amount):
    plan, tiers = plan_tiers

    quote = price_overage(plan, amount, tiers=tiers)

    assert abs(quote.amount - quote.exact_amount) <= half_minor_unit(plan.currency)
    assert quote.amount == quote.amount.quantize(Decimal(1).scaleb(-minor_unit_exponent(plan.currency)))


@given(plans(), credits)
def test_a_periods_bill_is_base_fee_plus_overage_each_rounded_within_half_a_unit(plan_tiers, amount):
    plan, tiers = plan_tiers

    quote = price_period(plan, amount, tiers=tiers)

    half = half_minor_unit(plan.currency)
    assert abs(quote.base_amount - plan.base_price) <= half
    assert abs(quote.overage.amount - expected_exact(plan, tiers, amount)) <= half
    assert quote.total == quote.base_amount + quote.overage.amount


@settings(max_examples=200)
@given(plans(), st.lists(credits, min_size=1, max_size=6))
def test_invoice_lines_for_parts_of_a_period_never_drift_more_than_half_a_unit_from_the_exact_total(
        plan_tiers, cuts):
    """A period's overage may be billed in several lines (progressive billing, then the
    close). Each line is price(end) − price(start), so after every line the amount billed
    so far is the rounded price of the usage so far: within half a minor unit of the
    exact amount, never accumulating. (One line alone may then be off by up to one minor
    unit: the error of the line before it is settled in it.)"""
    plan, tiers = plan_tiers
    points = [Decimal(0), *sorted(cuts)]
    half = half_minor_unit(plan.currency)

    billed = Decimal(0)
    for start, end in zip(points, points[1:]):
        line = price_overage_band(plan, start, end, tiers=tiers)
        billed += line.amount
        exact_line = expected_exact(plan, tiers, end) - expected_exact(plan, tiers, start)
        assert abs(billed - expected_exact(plan, tiers, end)) <= half
        assert abs(line.amount - exact_line) <= 2 * half
        assert sum((t.credits for t in line.tiers), Decimal(0)) == end - start
        assert line.amount >= 0


@given(plans(), credits)
def test_overage_off_bills_nothing_whatever_the_tiers(plan_tiers, amount):
    plan, tiers = plan_tiers
    plan.overage_enabled = False

    assert price_overage(plan, amount, tiers=tiers).amount == 0
