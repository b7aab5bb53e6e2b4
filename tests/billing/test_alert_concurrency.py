"""Alerts fire once under concurrent events, on real PostgreSQL row locks."""

import time
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


def test_saving_thresholds_waits_for_a_batch_in_flight(mailoutbox):
    """Ingestion reads a customer's thresholds under the customer's lock; saving them
    takes the same lock. A batch in flight (here: a transaction holding the lock) either
    sees the new thresholds or commits before the save's own check runs, so a threshold
    saved beside a batch cannot be missed."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    from billing.services.preferences import alert_preferences_set

    FeatureFactory(code="gpt-4o")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1))
    # Changed, not created: a new row's foreign key would wait for the lock anyway.
    AlertPreference.objects.create(customer=customer, thresholds=[50])
    batch = connections.create_connection("default")
    batch.set_autocommit(False)
    with batch.cursor() as cursor:
        cursor.execute("SELECT id FROM billing_customer WHERE id = %s FOR UPDATE", [customer.pk])
    pool = ThreadPoolExecutor(max_workers=1)

    def save():
        try:
            return alert_preferences_set(customer=customer, thresholds=[25], email_enabled={})
        finally:
            connections.close_all()

    try:
        saving = pool.submit(save)
        with connections.create_connection("default").cursor() as watcher:
            for _ in range(200):  # until the save's backend waits on the customer's row lock
                watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND wait_event_type = 'Lock'")
                if watcher.fetchone()[0]:
                    break
                assert not saving.done(), "the save did not wait for the customer's lock"
                time.sleep(0.05)
            else:
                pytest.fail("the save never waited for the customer's lock")
        assert not saving.done()
    finally:
        batch.rollback()
        batch.close()
    assert saving.result(timeout=30).thresholds == [25]
    pool.shutdown()
