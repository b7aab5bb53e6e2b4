"""Reconciliation: balances shown, unbilled usage, invoices and the revenue journal agree
with the ledger; every disagreement is named and fails the command."""

from decimal import Decimal
from io import StringIO

import pytest
import time_machine
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.models import BillingPeriod, CreditGrant, Invoice, InvoiceLine, RevenueEntry
from billing.reconciliation import disagreements
from billing.services.invoicing import close_period, invoice_void
from billing.services.metering import EventInput, record_event
from billing.services.purchases import purchase_pack
from billing.services.revenue import recognise_revenue
from plans.models import CreditPack, Plan
from tests.factories import FeatureFactory, PlanFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
MAY, JUNE = utc(2026, 5, 1), utc(2026, 6, 1)
NOW = utc(2026, 6, 15)  # mid-June: May closed, June open
D = Decimal


def use(customer, credits, at, event_id):
    record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api",
                                  quantity=D(credits), timestamp=at), now=at)


@pytest.fixture
def customer():
    """May closed (a pack and overage for acme; a capped rollover for quiet), June under way."""
    FeatureFactory(code="api")
    CreditPack.objects.create(code="credits-5k", name="5 000 credits", credits=D("5000"), price=D("10"))
    customer = make_customer(pro_plan(), started_at=MAY, external_id="acme")
    quiet = make_customer(PlanFactory(code="saver", base_price=D("20"), included_credits=D("10000"),
                                      overage_enabled=True, overage_unit_price=D("0.002"),
                                      rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=D("2000")),
                          started_at=MAY, external_id="quiet")
    use(quiet, "3000", utc(2026, 5, 3), "q1")  # 2 000 of the 7 000 left roll over into June
    use(customer, "9000", utc(2026, 5, 10), "e1")
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 12))
    use(customer, "7500", utc(2026, 5, 20), "e2")  # 1 000 included + 5 000 pack + 1 500 overage
    for period in BillingPeriod.objects.filter(start=MAY):
        close_period(period_id=period.pk, now=utc(2026, 6, 1, 2))
    use(customer, "12500", utc(2026, 6, 10), "e3")  # June: 2 500 overage so far, unbilled
    return customer


def checks(found):
    return sorted({(d.customer, d.check) for d in found})


def reconcile(*args):
    out = StringIO()
    with time_machine.travel(NOW, tick=False):
        call_command("reconcile", *args, stdout=out)
    return out.getvalue()


def test_a_healthy_month_reconciles(customer):
    recognise_revenue(now=NOW)

    assert disagreements(now=NOW) == []
    assert "reconciliation passed for 2 customer(s)" in reconcile()
    assert "reconciliation passed for customer acme" in reconcile("--customer", "acme")


def test_a_voided_invoice_still_reconciles_its_overage_is_waived_not_rebilled(customer):
    # A plan without a base fee: its close invoice bills overage only, which may be voided.
    lean = make_customer(PlanFactory(code="lean", included_credits=D("1000"), overage_enabled=True,
                                     overage_unit_price=D("0.002")), started_at=MAY, external_id="lean")
    use(lean, "4000", utc(2026, 5, 6), "l1")
    may_close = close_period(period_id=BillingPeriod.objects.get(customer=lean, start=MAY).pk,
                             now=utc(2026, 6, 1, 2))
    recognise_revenue(now=NOW)
    invoice_void(invoice=may_close, now=utc(2026, 6, 5))
    recognise_revenue(now=NOW)

    assert disagreements(now=NOW) == []


def test_a_tampered_period_overage_cache_is_named_and_fails_the_command(customer):
    BillingPeriod.objects.filter(customer=customer, start=MAY).update(overage_credits=D("1000"))

    found = disagreements(now=NOW)

    # The invoice is checked against the ledger, which is right; the cache is what is wrong.
    assert checks(found) == [("acme", "ledger"), ("acme", "period_overage_cache")]
    cache = next(d for d in found if d.check == "period_overage_cache")
    assert (cache.expected, cache.found) == (D("1500"), D("1000"))
    with pytest.raises(CommandError, match="disagreement"):
        reconcile()
    with pytest.raises(CommandError):
        reconcile("--customer", "acme")
    assert "reconciliation passed" in reconcile("--customer", "quiet")


def test_a_tampered_open_period_shows_in_the_balance_and_the_upcoming_invoice(customer):
    BillingPeriod.objects.filter(customer=customer, start=JUNE).update(overage_credits=D("0"))

    found = checks(disagreements(now=NOW))

    assert ("acme", "balance") in found  # the usage API's overage and estimate
    assert ("acme", "upcoming_invoice") in found
    assert ("acme", "period_overage_cache") in found


def test_a_deleted_overage_line_is_named(customer):
    InvoiceLine.objects.filter(invoice__customer=customer, kind="overage").delete()

    found = disagreements(now=NOW)

    invoiced = next(d for d in found if d.check == "invoiced_overage_credits")
    assert (invoiced.customer, invoiced.expected, invoiced.found) == ("acme", D("1500"), D("0"))
    money = next(d for d in found if d.check == "invoiced_overage_money")
    assert (money.expected, money.found) == (D("3.00"), D("0"))
    with pytest.raises(CommandError):
        reconcile()


def test_a_changed_line_amount_and_a_missing_close_invoice_are_named(customer):
    InvoiceLine.objects.filter(invoice__customer=customer, kind="overage").update(amount=D("2.50"))
    Invoice.objects.filter(customer__external_id="quiet", kind="period_close").delete()

    found = disagreements(now=NOW)

    money = next(d for d in found if d.check == "invoiced_overage_money")
    assert (money.customer, money.expected, money.found) == ("acme", D("3.00"), D("2.50"))
    close = next(d for d in found if d.check == "close_invoice")
    assert (close.customer, close.expected, close.found) == ("quiet", 1, 0)


def test_a_tampered_balance_is_named(customer):
    rolled = CreditGrant.objects.get(customer__external_id="quiet", source="rollover")
    CreditGrant.objects.filter(pk=rolled.pk).update(remaining=rolled.remaining - 100)

    found = disagreements(now=NOW)

    balance = next(d for d in found if d.check == "balance")
    assert "promotional credits remaining" in balance.subject  # rolled-over credits are shown with these
    assert (balance.customer, balance.expected, balance.found) == ("quiet", D("2000"), D("1900"))
    assert checks(found) == [("quiet", "balance"), ("quiet", "ledger")]


def test_a_tampered_revenue_row_is_named(customer):
    recognise_revenue(now=NOW)
    row = RevenueEntry.objects.filter(customer=customer, kind="recognised").first()
    RevenueEntry.objects.filter(pk=row.pk).update(amount=row.amount + D("0.01"))

    found = disagreements(now=NOW)

    assert checks(found) == [("acme", "revenue_journal")]
    assert "amount" in found[0].subject


def test_an_open_period_billed_progressively_reconciles_with_its_upcoming_invoice(customer):
    from billing.services.invoicing import bill_progressively

    Plan.objects.filter(code="pro").update(progressive_billing_threshold=D("1"))
    june = BillingPeriod.objects.get(customer=customer, start=JUNE)
    progressive = bill_progressively(period_id=june.pk, now=utc(2026, 6, 10, 1))  # 2 500 overage: $5.00
    use(customer, "1000", utc(2026, 6, 12), "e4")  # 1 000 more, unbilled: $2.00 upcoming
    recognise_revenue(now=NOW)

    assert progressive.total == D("5.00")
    assert disagreements(now=NOW) == []
    invoice_void(invoice=progressive, now=utc(2026, 6, 13))  # waived, not billed again
    assert disagreements(now=NOW) == []
