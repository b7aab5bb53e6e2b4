"""Progressive billing: overage invoiced mid-period at a threshold; no credit billed
twice or never."""

from decimal import Decimal

import pytest

from billing.models import BillingPeriod, Invoice
from billing.services.invoicing import bill_progressively, bill_progressively_due, close_period
from billing.services.metering import EventInput, record_event
from plans.pricing import price_overage
from tests.factories import FeatureFactory, make_customer, pro_plan, set_tiers, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY = utc(2026, 5, 1)


def use(customer, credits, day, event_id):
    at = utc(2026, 5, day)
    record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api",
                                  quantity=Decimal(credits), timestamp=at), now=at)
    return at


@pytest.fixture
def customer():
    FeatureFactory(code="api")
    plan = set_tiers(pro_plan(progressive_billing_threshold=Decimal("5.00")), ("3000", "0.002"), (None, "0.001"))
    return make_customer(plan, started_at=MAY)


def test_overage_is_invoiced_at_the_threshold_and_the_close_bills_only_the_rest(customer):
    period = BillingPeriod.objects.get(customer=customer)
    at = use(customer, "12000", 5, "e1")  # 2 000 overage = $4.00: below the $5 threshold
    assert bill_progressively(period_id=period.pk, now=at) is None

    at = use(customer, "1500", 8, "e2")  # 3 500 overage: 3 000 × .002 + 500 × .001 = $6.50
    first = bill_progressively(period_id=period.pk, now=at)
    assert bill_progressively(period_id=period.pk, now=at) is None  # nothing new since

    use(customer, "2000", 20, "e3")  # 5 500 overage in all
    close = close_period(period_id=period.pk, now=utc(2026, 6, 1, 2))

    assert (first.kind, first.total) == ("progressive", Decimal("6.50"))
    band = first.lines.get()
    assert (band.overage_from, band.overage_to) == (Decimal("0"), Decimal("3500"))
    close_overage = close.lines.get(kind="overage")
    assert (close_overage.overage_from, close_overage.overage_to, close_overage.amount) == (
        Decimal("3500"), Decimal("5500"), Decimal("2.00"))
    whole = price_overage(close.period.plan, Decimal("5500")).amount
    assert first.total + close_overage.amount == whole == Decimal("8.50")
    assert_ledger_consistent()


def test_the_sweep_finds_periods_over_their_threshold(customer):
    at = use(customer, "14000", 5, "e1")  # $7.00 of overage

    invoices = bill_progressively_due(now=at)

    assert [(i.kind, i.total) for i in invoices] == [("progressive", Decimal("7.00"))]
    assert bill_progressively_due(now=at) == []
    assert Invoice.objects.filter(kind="progressive").count() == 1
