"""The invoice admin: lines with a drill-down to usage, void, mark paid, close now."""

from decimal import Decimal

import pytest
import time_machine
from django.urls import reverse

from billing.models import BillingPeriod, Invoice
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
MAY = utc(2026, 5, 1)


@pytest.fixture
def closed_may():
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(), started_at=MAY)
    record_event(event=EventInput(event_id="e1", customer=customer.external_id, feature="api",
                                  quantity=Decimal("12000"), timestamp=utc(2026, 5, 9)), now=utc(2026, 5, 9))
    period = BillingPeriod.objects.get(customer=customer, start=MAY)
    return close_period(period_id=period.pk, now=utc(2026, 6, 1, 2))


def test_invoice_page_shows_lines_and_the_drill_down_link_works(admin_client, closed_may):
    page = admin_client.get(reverse("admin:billing_invoice_change", args=[closed_may.pk])).content.decode()
    drill = admin_client.get(reverse("admin:billing_usageevent_changelist"),
                             {"period__id__exact": closed_may.period_id, "overage_credits__gt": 0})

    assert "Overage: 2,000 credits" in page and "Pro base fee" in page
    assert "overage events of the period" in page
    assert drill.status_code == 200
    assert "e1" in drill.content.decode()


def test_void_and_mark_paid_actions(admin_client):
    from billing.services.invoicing import bill_progressively

    FeatureFactory(code="api")
    customer = make_customer(pro_plan(progressive_billing_threshold=Decimal("1")), started_at=MAY)
    record_event(event=EventInput(event_id="e1", customer=customer.external_id, feature="api",
                                  quantity=Decimal("12000"), timestamp=utc(2026, 5, 9)), now=utc(2026, 5, 9))
    progressive = bill_progressively(period_id=BillingPeriod.objects.get(customer=customer).pk, now=utc(2026, 5, 9))
    start = Invoice.objects.get(kind="subscription_start")
    url = reverse("admin:billing_invoice_changelist")

    admin_client.post(url, {"action": "void", "_selected_action": [progressive.pk]})
    admin_client.post(url, {"action": "void", "_selected_action": [start.pk]})  # a base fee: refused
    admin_client.post(url, {"action": "mark_paid", "_selected_action": [start.pk]})

    progressive.refresh_from_db()
    start.refresh_from_db()
    assert (progressive.status, start.status) == ("void", "paid")


def test_close_now_skips_the_grace_window_but_not_the_period_end(admin_client):
    customer = make_customer(pro_plan(), started_at=MAY)
    may = BillingPeriod.objects.get(customer=customer, start=MAY)
    url = reverse("admin:billing_billingperiod_changelist")

    with time_machine.travel(utc(2026, 5, 20), tick=False):
        admin_client.post(url, {"action": "close_now", "_selected_action": [may.pk]})
        assert BillingPeriod.objects.get(pk=may.pk).status == "open"  # not ended yet
    with time_machine.travel(utc(2026, 6, 1, 0, 10), tick=False):  # inside the grace hour
        admin_client.post(url, {"action": "close_now", "_selected_action": [may.pk]})

    assert BillingPeriod.objects.get(pk=may.pk).status == "closed"
    assert Invoice.objects.filter(kind="period_close").count() == 1
