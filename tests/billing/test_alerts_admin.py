"""Admin for alerts, notifications, webhook endpoints and the delivery log."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.urls import reverse

from billing.models import Alert, Notification, WebhookDelivery, WebhookEndpoint
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.webhook_receiver import WebhookReceiver, verify_signature

pytestmark = pytest.mark.django_db
NOW = utc(2026, 3, 15, 12)


@pytest.fixture
def receiver():
    with WebhookReceiver() as receiver:
        yield receiver


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def fire_alert(django_capture_on_commit_callbacks):
    FeatureFactory(code="api-call")
    customer = make_customer(pro_plan(), started_at=utc(2026, 3, 1), now=NOW, external_id="acme")
    with django_capture_on_commit_callbacks(execute=True):
        record_event(event=EventInput(event_id="e1", customer="acme", feature="api-call", quantity=Decimal("5000"),
                                      timestamp=NOW), now=NOW)
    return customer


@time_machine.travel(NOW, tick=False)
def test_every_alert_admin_page_loads(admin_client, receiver, django_capture_on_commit_callbacks):
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret="whsec_abcdefghijklmnop")
    fire_alert(django_capture_on_commit_callbacks)
    pages = {"alert": Alert.objects.get().pk, "notification": Notification.objects.get().pk,
             "webhookendpoint": endpoint.pk, "webhookdelivery": WebhookDelivery.objects.get().pk}
    for model, pk in pages.items():
        assert admin_client.get(reverse(f"admin:billing_{model}_changelist")).status_code == 200, model
        assert admin_client.get(reverse(f"admin:billing_{model}_change", args=[pk])).status_code == 200, model
    by_kind = admin_client.get(reverse("admin:billing_alert_changelist"), {"kind__exact": "usage_threshold"})
    assert by_kind.status_code == 200

    page = admin_client.get(reverse("admin:billing_webhookendpoint_change", args=[endpoint.pk])).content.decode()
    assert "whsec_abcd…" in page
    assert "whsec_abcdefghijklmnop" not in page


@time_machine.travel(NOW, tick=False)
def test_a_new_endpoint_gets_a_generated_secret_shown_once(admin_client):
    response = admin_client.post(reverse("admin:billing_webhookendpoint_add"), {
        "url": "https://hooks.example.test/overage", "description": "Ops", "event_types": ["runaway_usage"],
        "is_active": "on",
    }, follow=True)

    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.secret.startswith("whsec_") and len(endpoint.secret) > 40
    assert endpoint.event_types == ["runaway_usage"]
    assert any(endpoint.secret in message for message in messages_of(response))
    later = admin_client.get(reverse("admin:billing_webhookendpoint_change", args=[endpoint.pk]))
    assert endpoint.secret not in later.content.decode()


@time_machine.travel(NOW, tick=False)
def test_endpoints_must_use_https_except_localhost_in_debug(admin_client, settings):
    url = reverse("admin:billing_webhookendpoint_add")
    local = {"url": "http://127.0.0.1:8080/hook", "description": "", "is_active": "on"}

    settings.DEBUG = False
    refused = admin_client.post(url, local)
    assert refused.status_code == 200  # the form again, with the error
    assert "Use an https:// URL" in refused.content.decode()
    assert admin_client.post(url, {**local, "url": "http://hooks.example.test/"}).status_code == 200
    assert WebhookEndpoint.objects.count() == 0

    settings.DEBUG = True
    assert admin_client.post(url, local).status_code == 302
    assert WebhookEndpoint.objects.get().url == "http://127.0.0.1:8080/hook"


@time_machine.travel(NOW, tick=False)
def test_retry_now_gives_a_failed_delivery_one_more_attempt(admin_client, receiver,
                                                            django_capture_on_commit_callbacks):
    WebhookEndpoint.objects.create(url=receiver.url, secret="whsec_test")
    receiver.statuses = [500]
    fire_alert(django_capture_on_commit_callbacks)
    WebhookDelivery.objects.update(status="failed", attempts=6, next_attempt_at=None)
    delivery = WebhookDelivery.objects.get()

    later = NOW + timedelta(days=1)
    with time_machine.travel(later, tick=False), django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:billing_webhookdelivery_changelist"),
                                     {"action": "retry_now", "_selected_action": [delivery.pk]}, follow=True)

    assert "Queued 1 delivery attempt(s)." in messages_of(response)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.delivered_at) == ("delivered", 7, later)
    assert len(receiver.requests) == 2
    verify_signature(secret="whsec_test", header=receiver.requests[1].headers["Overage-Signature"],
                     body=receiver.requests[1].body)


@time_machine.travel(NOW, tick=False)
def test_rotating_the_secret_signs_later_deliveries_with_the_new_one(admin_client, receiver,
                                                                      django_capture_on_commit_callbacks):
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret="whsec_old")

    response = admin_client.post(reverse("admin:billing_webhookendpoint_changelist"),
                                 {"action": "rotate_secret", "_selected_action": [endpoint.pk]}, follow=True)

    endpoint.refresh_from_db()
    assert endpoint.secret != "whsec_old"
    assert any(endpoint.secret in message for message in messages_of(response))
    fire_alert(django_capture_on_commit_callbacks)
    [request] = receiver.requests
    verify_signature(secret=endpoint.secret, header=request.headers["Overage-Signature"], body=request.body)
