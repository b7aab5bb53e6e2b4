"""The single pricing function: credits → money through graduated tiers, rounded once."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plans.money import round_money
from plans.pricing import price_credits_used, price_overage
from tests.factories import payg_plan, pro_plan, set_tiers

pytestmark = pytest.mark.django_db


def test_flat_overage_rate():
    assert price_overage(pro_plan(), Decimal("3500")).amount == Decimal("7.00")


def test_graduated_tiers_charge_each_band_at_its_own_price():
    plan = set_tiers(pro_plan(), ("10000", "0.002"), ("50000", "0.0015"), (None, "0.001"))

    quote = price_overage(plan, Decimal("60000"))

    assert [(t.credits, t.unit_price, t.amount) for t in quote.tiers] == [
        (Decimal("10000"), Decimal("0.002"), Decimal("20.000")),
        (Decimal("40000"), Decimal("0.0015"), Decimal("60.0000")),
        (Decimal("10000"), Decimal("0.001"), Decimal("10.000")),
    ]
    assert quote.amount == Decimal("90.00")


def test_rounding_happens_once_on_the_total_not_per_tier():
    # 3 × 0.0015 = 0.0045 and 3 × 0.0015 = 0.0045: per-tier rounding would give 0.00 + 0.00;
    # the exact total 0.009 rounds to 0.01.
    plan = set_tiers(pro_plan(), ("3", "0.0015"), (None, "0.0015"))

    assert price_overage(plan, Decimal("6")).amount == Decimal("0.01")


def test_half_up_rounding_to_the_currency_minor_unit():
    assert price_overage(payg_plan(), Decimal("1234567")).amount == Decimal("1234.57")
    assert price_overage(payg_plan(), Decimal("5")).amount == Decimal("0.01")  # 0.005 → 0.01
    assert price_overage(payg_plan(), Decimal("4")).amount == Decimal("0.00")
    assert round_money(Decimal("1234.5"), "JPY") == Decimal("1235")
    assert round_money(Decimal("1.2345"), "KWD") == Decimal("1.235")


def test_overage_off_bills_nothing():
    assert price_overage(pro_plan(overage_enabled=False), Decimal("5000")).amount == Decimal("0.00")


def test_preview_bills_base_plus_overage_beyond_included():
    quote = price_credits_used(pro_plan(), Decimal("15000"))

    assert (quote.base_amount, quote.overage.amount, quote.total) == (Decimal("49.00"), Decimal("10.00"),
                                                                       Decimal("59.00"))
    assert price_credits_used(pro_plan(), Decimal("8000")).total == Decimal("49.00")


@given(a=st.decimals(min_value=0, max_value=10**7, places=6), b=st.decimals(min_value=0, max_value=10**7, places=6))
def test_price_is_monotonic_and_tiers_add_up(a, b):
    plan = set_tiers(pro_plan(), ("1000", "0.003"), ("5000.5", "0.002"), (None, "0.00125"))
    low, high = sorted((a, b))

    q_low, q_high = price_overage(plan, low), price_overage(plan, high)

    assert q_low.amount <= q_high.amount
    assert sum(t.credits for t in q_high.tiers) == high
    exact = sum(t.amount for t in q_high.tiers)
    assert abs(q_high.amount - exact) <= Decimal("0.005")


def test_a_band_of_overage_is_priced_by_the_tiers_it_falls_in():
    from plans.pricing import price_overage_band

    plan = set_tiers(pro_plan(), ("10000", "0.002"), (None, "0.001"))

    band = price_overage_band(plan, Decimal("8000"), Decimal("12000"))

    assert [(t.lower, t.credits, t.unit_price) for t in band.tiers] == [
        (Decimal("8000"), Decimal("2000"), Decimal("0.002")), (Decimal("10000"), Decimal("2000"), Decimal("0.001"))]
    assert band.amount == Decimal("6.00")


@given(cuts=st.lists(st.decimals(min_value=0, max_value=10**6, places=3), max_size=6))
def test_splitting_a_periods_overage_into_bands_never_changes_the_total(cuts):
    from plans.pricing import price_overage_band

    plan = set_tiers(pro_plan(), ("1000", "0.0033"), (None, "0.0017"))
    points = [Decimal(0), *sorted(cuts)]
    total = points[-1]

    billed = sum(price_overage_band(plan, a, b).amount for a, b in zip(points, points[1:]))

    assert billed == price_overage(plan, total).amount
