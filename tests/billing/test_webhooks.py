"""Outgoing webhooks: signed alert deliveries to a receiver on 127.0.0.1, retries with
backoff, giving up, disabled endpoints."""

import json
import socket
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from billing.models import Alert, WebhookDelivery, WebhookEndpoint
from billing.services.metering import EventInput, record_event
from billing.services.webhooks import deliver_webhook
from billing.tasks import retry_due_webhooks_task
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.webhook_receiver import WebhookReceiver, verify_signature

pytestmark = pytest.mark.django_db
START = utc(2026, 3, 1)
NOW = utc(2026, 3, 15, 12)
SECRET = "whsec_test-secret"


@pytest.fixture
def receiver():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def customer():
    FeatureFactory(code="api-call")
    return make_customer(pro_plan(), started_at=START, external_id="acme")


@pytest.fixture
def fire_50_percent(customer, django_capture_on_commit_callbacks):
    """Usage to 50 % of the included credits: one alert, whose first delivery attempts
    run on commit (in-process, as in the embedded mode)."""
    def fire():
        with django_capture_on_commit_callbacks(execute=True):
            record_event(event=EventInput(event_id="e1", customer="acme", feature="api-call",
                                          quantity=Decimal("5000"), timestamp=NOW), now=NOW)
        return Alert.objects.get(threshold=50)
    return fire


def sweep_at(moment):
    with time_machine.travel(moment, tick=False):
        return retry_due_webhooks_task.delay().get()


@time_machine.travel(NOW, tick=False)
def test_an_alert_is_delivered_signed_and_the_receiver_verifies_it(receiver, fire_50_percent):
    endpoint = WebhookEndpoint.objects.create(url=f"{receiver.url}/hooks/overage", secret=SECRET)

    alert = fire_50_percent()

    [request] = receiver.requests
    delivery = WebhookDelivery.objects.get()
    assert request.path == "/hooks/overage"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Overage-Event"] == "usage_threshold"
    assert request.headers["Overage-Delivery"] == str(delivery.pk)
    timestamp = verify_signature(secret=SECRET, header=request.headers["Overage-Signature"], body=request.body)
    assert timestamp == int(NOW.timestamp())
    with pytest.raises(ValueError):
        verify_signature(secret="whsec_someone-else", header=request.headers["Overage-Signature"], body=request.body)
    with pytest.raises(ValueError):
        verify_signature(secret=SECRET, header=request.headers["Overage-Signature"],
                         body=request.body.replace(b"5000", b"50"))

    assert json.loads(request.body) == {
        "type": "usage_threshold",
        "alert": {"id": alert.pk, "kind": "usage_threshold", "threshold": 50, "fired_at": "2026-03-15T12:00:00+00:00"},
        "customer": {"external_id": "acme", "name": "Acme Inc."},
        "period": {"id": alert.period_id, "start": "2026-03-01T00:00:00+00:00", "end": "2026-04-01T00:00:00+00:00"},
        "details": {
            "included_credits": "10000", "included_credits_used": "5000", "percent_used": "50",
            "credits_used": "5000", "overage_credits": "0", "estimated_overage_amount": "0.00", "currency": "USD",
            "spend_cap": None, "plan": "pro", "threshold": 50,
        },
    }
    assert (delivery.endpoint, delivery.alert, delivery.event_type) == (endpoint, alert, "usage_threshold")
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
    assert (delivery.delivered_at, delivery.next_attempt_at, delivery.last_error) == (NOW, None, "")


@time_machine.travel(NOW, tick=False)
def test_a_500_is_retried_after_1_then_5_minutes_until_delivered(receiver, fire_50_percent):
    WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET)
    receiver.statuses = [500, 503]

    fire_50_percent()

    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, 500)
    assert delivery.last_error == "HTTP 500: receiver says no"
    assert delivery.next_attempt_at == NOW + timedelta(minutes=1)

    assert sweep_at(NOW + timedelta(seconds=59)) == 0  # not due yet
    assert len(receiver.requests) == 1

    assert sweep_at(NOW + timedelta(minutes=1)) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 2, 503)
    assert delivery.next_attempt_at == NOW + timedelta(minutes=1 + 5)

    assert sweep_at(NOW + timedelta(minutes=6)) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 3, 200)
    assert delivery.delivered_at == NOW + timedelta(minutes=6)
    assert delivery.last_error == ""

    # The same delivery id each time, each attempt signed afresh over the same body.
    assert {r.headers["Overage-Delivery"] for r in receiver.requests} == {str(delivery.pk)}
    assert [verify_signature(secret=SECRET, header=r.headers["Overage-Signature"], body=r.body)
            for r in receiver.requests] == [int((NOW + timedelta(minutes=m)).timestamp()) for m in (0, 1, 6)]
    assert len({r.body for r in receiver.requests}) == 1
    assert sweep_at(NOW + timedelta(days=1)) == 0


@time_machine.travel(NOW, tick=False)
def test_gives_up_after_six_failed_attempts(receiver, fire_50_percent):
    WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET)
    receiver.default_status = 500

    fire_50_percent()
    moment = NOW
    for wait in (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2),
                 timedelta(hours=12)):
        delivery = WebhookDelivery.objects.get()
        assert delivery.status == "pending"
        assert delivery.next_attempt_at == moment + wait
        moment += wait
        assert sweep_at(moment) == 1

    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("failed", 6, 500)
    assert delivery.next_attempt_at is None
    assert len(receiver.requests) == 6
    assert sweep_at(moment + timedelta(days=7)) == 0
    assert len(receiver.requests) == 6


@time_machine.travel(NOW, tick=False)
def test_an_unreachable_endpoint_records_the_error_and_is_retried(fire_50_percent):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    WebhookEndpoint.objects.create(url=f"http://127.0.0.1:{port}/", secret=SECRET)

    fire_50_percent()

    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, None)
    assert delivery.last_error.startswith("ConnectionError:")
    assert delivery.next_attempt_at == NOW + timedelta(minutes=1)


@time_machine.travel(NOW, tick=False)
def test_a_disabled_endpoint_gets_nothing(receiver, fire_50_percent):
    WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET, is_active=False)

    fire_50_percent()

    assert WebhookDelivery.objects.count() == 0
    assert receiver.requests == []


@time_machine.travel(NOW, tick=False)
def test_an_endpoint_disabled_while_a_retry_is_pending_gets_nothing_more(receiver, fire_50_percent):
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET)
    receiver.statuses = [500]
    fire_50_percent()
    endpoint.is_active = False
    endpoint.save()

    assert sweep_at(NOW + timedelta(minutes=1)) == 1

    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("failed", 1, "Endpoint disabled; not sent.")
    assert len(receiver.requests) == 1


@time_machine.travel(NOW, tick=False)
def test_an_endpoint_gets_only_the_kinds_it_asked_for(receiver, customer, django_capture_on_commit_callbacks):
    WebhookEndpoint.objects.create(url=f"{receiver.url}/overage-only", secret=SECRET, event_types=["overage_started"])
    WebhookEndpoint.objects.create(url=f"{receiver.url}/all", secret=SECRET, event_types=[])

    with django_capture_on_commit_callbacks(execute=True):
        record_event(event=EventInput(event_id="e1", customer="acme", feature="api-call", quantity=Decimal("10001"),
                                      timestamp=NOW), now=NOW)

    by_path = sorted((r.path, r.headers["Overage-Event"]) for r in receiver.requests)
    assert by_path == [("/all", "overage_started"), ("/all", "usage_threshold"), ("/all", "usage_threshold"),
                       ("/all", "usage_threshold"), ("/overage-only", "overage_started")]


@time_machine.travel(NOW, tick=False)
def test_a_delivered_webhook_is_not_sent_again(receiver, fire_50_percent):
    WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET)
    fire_50_percent()
    delivery = WebhookDelivery.objects.get()

    again = deliver_webhook(delivery_id=delivery.pk, now=NOW + timedelta(hours=1))

    assert (again.status, again.attempts) == ("delivered", 1)
    assert len(receiver.requests) == 1
