"""The admin flags an invoice whose Stripe total is not ours."""

from decimal import Decimal

import pytest

from billing.models import BillingPeriod, Invoice
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db


def test_the_invoice_list_flags_a_stripe_total_that_differs_from_ours(admin_client):
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    record_event(event=EventInput(event_id="e", customer="acme", feature="api", quantity=Decimal("11000"),
                                  timestamp=utc(2026, 5, 3)), now=utc(2026, 5, 3))
    june = close_period(period_id=BillingPeriod.objects.get(customer=customer).pk, now=utc(2026, 6, 2))  # $51.00
    Invoice.objects.filter(pk=june.pk).update(stripe_invoice_id="in_1", stripe_status="open",
                                              stripe_total=Decimal("50.99"))
    Invoice.objects.filter(kind="subscription_start").update(stripe_invoice_id="in_0", stripe_status="paid",
                                                             stripe_total=Decimal("49.00"))

    page = admin_client.get("/admin/billing/invoice/").content.decode()
    flagged = admin_client.get("/admin/billing/invoice/?stripe=disagrees").content.decode()

    assert "⚠ Stripe USD 50.99 ≠ ours USD 51.00</strong> (open)" in page and "paid ✓" in page
    assert june.number in flagged and Invoice.objects.get(kind="subscription_start").number not in flagged


def test_the_portal_shows_a_failed_or_past_due_card_payment(client, django_user_model):
    from billing.models import CustomerMember

    FeatureFactory(code="api")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    invoice = Invoice.objects.get(kind="subscription_start")
    user = django_user_model.objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)

    Invoice.objects.filter(pk=invoice.pk).update(stripe_invoice_id="in_1", stripe_status="payment_failed")
    failed = client.get(f"/portal/invoices/{invoice.number}/").content.decode()
    Invoice.objects.filter(pk=invoice.pk).update(stripe_status="past_due")
    past_due = client.get(f"/portal/invoices/{invoice.number}/").content.decode()

    assert '<span class="status status-void" id="invoice-payment">Card payment failed</span>' in failed
    assert '<span class="status status-void" id="invoice-payment">Past due</span>' in past_due
