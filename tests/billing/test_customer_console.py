"""The customer page in the admin: what an operator needs to answer a billing question,
and the actions to act on it."""

from decimal import Decimal

import pytest
import time_machine
from django.urls import reverse

from billing.models import BillingPeriod, Invoice
from billing.services.entitlements import check_entitlement
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 20)


@pytest.fixture
def acme():
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    record_event(event=EventInput(event_id="e1", customer="acme", feature="api", quantity=Decimal("12500")), now=NOW)
    return customer


@time_machine.travel(NOW, tick=False)
def test_the_customer_page_shows_usage_grants_invoices_and_ledger(admin_client, acme):
    page = admin_client.get(reverse("admin:billing_customer_change", args=[acme.pk])).content.decode()

    assert ("2026-05-01 – 2026-06-01 on Pro: 12,500 credits used of 10,000 included; overage 2,500 credits = "
            "USD 5.00; estimated total USD 54.00") in page
    assert "Latest ledger entries" in page and "Invoices" in page and "OVG-000001" in page
    assert "Alerts sent" in page and "In-app notifications" in page
    assert f"?customer={acme.pk}" in page  # grant credits from here


@time_machine.travel(NOW, tick=False)
def test_pause_and_resume_usage(admin_client, acme):
    url = reverse("admin:billing_customer_changelist")

    admin_client.post(url, {"action": "pause_usage", "_selected_action": [acme.pk]})
    paused = check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("1"), now=NOW)
    admin_client.post(url, {"action": "resume_usage", "_selected_action": [acme.pk]})
    resumed = check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("1"), now=NOW)

    assert (paused.allowed, paused.reason) == (False, "paused")
    assert (resumed.allowed, resumed.reason) == (True, "overage")


def test_close_ended_periods_now_from_the_customer_page(admin_client, acme):
    with time_machine.travel(utc(2026, 6, 1, 0, 5), tick=False):
        admin_client.post(reverse("admin:billing_customer_changelist"),
                          {"action": "close_ended_periods_now", "_selected_action": [acme.pk]})

    assert BillingPeriod.objects.get(customer=acme, start=utc(2026, 5, 1)).status == "closed"
    assert Invoice.objects.get(kind="period_close").total == Decimal("54.00")
