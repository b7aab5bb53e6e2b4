"""The Stripe webhook endpoint accepts only what Stripe signed with the endpoint's
secret: a good signature is acted on, a bad, stale or missing one gets 400 and is kept
(dj-stripe's WebhookEventTrigger) for the admin, and nothing is done."""

import json
import time

import pytest
from django.test import Client
from djstripe.models import WebhookEventTrigger

from billing.models import StripeEventReceipt
from billing.services.stripe_sync import webhook_endpoint_ensure
from tests.stripe.conftest import WEBHOOK_SECRET, signed_headers

pytestmark = pytest.mark.django_db
EVENT = {"id": "evt_test_1", "object": "event", "type": "customer.created", "livemode": False,
         "api_version": "2020-08-27", "created": 1780000000, "data": {"object": {"id": "cus_1", "object": "customer"}}}


@pytest.fixture
def endpoint(settings):
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = ""  # no localstripe to register with: the endpoint row only
    return webhook_endpoint_ensure(base_url="http://testserver")


def post(endpoint, payload: bytes, headers: dict, path: str | None = None):
    return Client().post(path or endpoint.url.removeprefix("http://testserver"), payload,
                         content_type="application/json", headers=headers)


def test_a_well_signed_event_is_acted_on_once(endpoint):
    payload = json.dumps(EVENT).encode()

    first = post(endpoint, payload, signed_headers(payload))
    again = post(endpoint, payload, signed_headers(payload))

    assert (first.status_code, first.content) == (200, b"ignored")
    assert (again.status_code, again.content) == (200, b"duplicate")
    assert StripeEventReceipt.objects.get().event_id == "evt_test_1"
    assert list(WebhookEventTrigger.objects.values_list("valid", "processed")) == [(True, True), (True, True)]


@pytest.mark.parametrize("headers", [
    {"Stripe-Signature": "t=1,v1=deadbeef"},
    "wrong secret",
    "stale",
    "tampered",
], ids=["garbage", "wrong-secret", "stale", "tampered-body"])
def test_a_badly_signed_event_is_refused_and_logged(endpoint, headers, caplog):
    payload = json.dumps(EVENT).encode()
    if headers == "wrong secret":
        headers = signed_headers(payload, secret="whsec_someone_else")
    elif headers == "stale":
        headers = signed_headers(payload, timestamp=int(time.time()) - 3600)  # outside the 5 min tolerance
    elif headers == "tampered":
        headers = signed_headers(payload)
        payload = payload.replace(b"cus_1", b"cus_2")

    response = post(endpoint, payload, headers)

    assert response.status_code == 400
    assert not StripeEventReceipt.objects.exists()
    trigger = WebhookEventTrigger.objects.get()
    assert (trigger.valid, trigger.processed, trigger.exception) == (False, False, "bad signature")
    assert "stripe webhook refused: bad signature" in caplog.text


def test_a_missing_signature_is_refused(endpoint, caplog):
    response = post(endpoint, json.dumps(EVENT).encode(), {})

    assert response.status_code == 400
    assert not StripeEventReceipt.objects.exists()
    assert "missing Stripe-Signature header" in caplog.text


def test_an_unknown_endpoint_or_a_body_that_is_not_an_event_is_refused(endpoint):
    payload = json.dumps(EVENT).encode()
    unknown = post(endpoint, payload, signed_headers(payload),
                   path="/stripe/webhook/00000000-0000-0000-0000-000000000000/")
    not_event = json.dumps({"hello": "world"}).encode()
    malformed = post(endpoint, not_event, signed_headers(not_event))

    assert (unknown.status_code, malformed.status_code) == (400, 400)
    assert not StripeEventReceipt.objects.exists()
