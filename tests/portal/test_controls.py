"""Controls (own spend cap, approving a higher cap, alert settings) and notifications."""

from decimal import Decimal

import pytest
import time_machine
from django.test import Client

from billing.models import AlertPreference, CustomerMember, Notification, SpendCapApproval
from billing.services.entitlements import check_entitlement
from billing.services.metering import EventInput, record_event
from plans.models import Plan
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 16)


@pytest.fixture
def acme(client, django_user_model):
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("20"),
                                      cap_behaviour=Plan.CapBehaviour.APPROVAL),
                             started_at=utc(2026, 5, 1), external_id="acme")
    user = django_user_model.objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


@time_machine.travel(NOW, tick=False)
def test_the_customer_lowers_their_cap_and_cannot_raise_it_past_the_plan(client, acme):
    too_high = client.post("/portal/controls/", {"action": "spend_cap", "spend_cap": "25"})
    saved = client.post("/portal/controls/", {"action": "spend_cap", "spend_cap": "3"}, follow=True)

    assert "The spend cap cannot exceed the plan&#x27;s cap of USD 20.00." in too_high.content.decode()
    assert "Your spend cap is saved." in saved.content.decode()
    assert '<strong id="cap-in-force">USD 3.00</strong>' in saved.content.decode()
    acme.refresh_from_db()
    assert acme.spend_cap == Decimal("3")


@time_machine.travel(NOW, tick=False)
def test_at_the_cap_the_customer_approves_a_higher_one_and_usage_resumes(client, acme):
    record_event(event=EventInput(event_id="e1", customer="acme", feature="api", quantity=Decimal("10000")),
                 now=NOW)  # $20 of overage: at the cap
    assert check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("1"),
                             now=NOW).reason == "spend_cap_reached"
    page = client.get("/portal/controls/").content.decode()

    client.post("/portal/controls/", {"action": "approve_cap", "cap": "50"})

    assert "Usage is paused: you have reached your cap." in page
    approval = SpendCapApproval.objects.get()
    assert (approval.cap, approval.approved_by.username) == (Decimal("50"), "ap@acme.test")
    assert check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("1"),
                             now=NOW).allowed


@time_machine.travel(NOW, tick=False)
def test_an_approval_not_above_the_cap_in_force_is_refused_in_money(client, acme):
    response = client.post("/portal/controls/", {"action": "approve_cap", "cap": "15"})

    assert "An approval must raise the cap above the current USD 20.00." in response.content.decode()
    assert not SpendCapApproval.objects.exists()


@time_machine.travel(NOW, tick=False)
def test_alert_settings_are_saved_and_validated_inline(client, acme):
    bad = client.post("/portal/controls/", {"action": "alerts", "thresholds": "50, lots"})
    out_of_range = client.post("/portal/controls/", {"action": "alerts", "thresholds": "50, 150"})
    client.post("/portal/controls/", {"action": "alerts", "thresholds": "25, 90", "email_usage_threshold": "on"})

    assert "Use whole numbers separated by commas." in bad.content.decode()
    assert "Thresholds are whole percents from 1 to 100." in out_of_range.content.decode()
    preference = AlertPreference.objects.get(customer=acme)
    assert preference.thresholds == [25, 90]
    assert preference.email_enabled["usage_threshold"] is True
    assert preference.email_enabled["overage_started"] is False


@time_machine.travel(NOW, tick=False)
def test_notifications_show_unread_count_and_mark_read(client, acme):
    for n in range(3):
        Notification.objects.create(customer=acme, title=f"Alert {n}", created_at=NOW)

    dashboard = client.get("/portal/").content.decode()
    client.post("/portal/notifications/read/")
    page = client.get("/portal/notifications/").content.decode()

    assert '<span class="badge" id="unread-count">3</span>' in dashboard
    assert "Alert 2" in page and 'id="unread-count"' not in page
    assert not Notification.objects.filter(read_at__isnull=True).exists()


def test_forms_refuse_posts_without_a_csrf_token(acme, django_user_model):
    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.get(username="ap@acme.test"))

    response = client.post("/portal/controls/", {"action": "spend_cap", "spend_cap": "3"})

    assert response.status_code == 403


@time_machine.travel(NOW, tick=False)
def test_another_customers_notifications_are_neither_shown_nor_marked(client, acme):
    other = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")
    Notification.objects.create(customer=other, title="Globex secret", created_at=NOW)

    page = client.get("/portal/notifications/").content.decode()
    client.post("/portal/notifications/read/", {"notification": Notification.objects.get(customer=other).pk})

    assert "Globex secret" not in page
    assert Notification.objects.get(customer=other).read_at is None
