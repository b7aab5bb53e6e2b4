"""Alerts fire once under concurrent events, on real PostgreSQL row locks."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import Alert, AlertPreference, Notification, WebhookDelivery, WebhookEndpoint
from billing.services.metering import EventInput, record_event
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
NOW = utc(2026, 5, 10, 9)


@pytest.fixture
def receiver():
    with WebhookReceiver() as receiver:
        yield receiver


def send(customer_id, event_id, quantity):
    return record_event(event=EventInput(event_id=event_id, customer=customer_id, feature="gpt-4o",
                                         quantity=Decimal(quantity), timestamp=NOW), now=NOW)


@time_machine.travel(NOW, tick=False)
def test_16_threads_crossing_80_percent_at_once_fire_one_alert_one_notification_one_email_one_webhook(
        mailoutbox, receiver):
    FeatureFactory(code="gpt-4o")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1))
    AlertPreference.objects.create(customer=customer, thresholds=[80])
    WebhookEndpoint.objects.create(url=receiver.url, secret="whsec_test")
    send(customer.external_id, "warm-up", "7990")  # 79.9 %: nothing yet
    assert Alert.objects.count() == 0

    # Every thread's event takes usage past 80 % (the first by itself), and each thread
    # runs the alert check right after its own commit (tasks run in-process).
    outcomes = run_concurrently(send, [(customer.external_id, f"e{n}", "10") for n in range(16)])

    assert not [o for o in outcomes if isinstance(o, Exception)]
    alert = Alert.objects.get()
    assert (alert.kind, alert.threshold) == ("usage_threshold", 80)
    assert Notification.objects.get().alert == alert
    # One email, one delivery: the side effects of the one alert that was inserted.
    assert [m.subject for m in mailoutbox] == ["You have used 80% of your included credits"]
    assert WebhookDelivery.objects.get().status == "delivered"
    assert [r.headers["Overage-Event"] for r in receiver.requests] == ["usage_threshold"]
