"""An oversized API body is refused with 413 before anything reads it."""

import json

import pytest

from billing.models import UsageEvent

pytestmark = pytest.mark.django_db


def test_a_50_mb_batch_is_refused_with_413_and_writes_nothing(api):
    event = {"id": "e", "customer": "acme", "feature": "gpt-4o", "quantity": 1, "properties": {"pad": "x" * 1000}}
    body = json.dumps({"events": [event] * 50_000})
    assert len(body) > 50_000_000
    response = api.post("/api/v1/events/batch", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert "limit is 5242880 bytes" in response.json()["error"]["message"]
    assert UsageEvent.objects.count() == 0


def test_the_limit_is_a_setting_and_a_body_under_it_is_read(api, settings):
    settings.OVERAGE_API_MAX_BODY_BYTES = 100
    response = api.post("/api/v1/events", data={"id": "e" * 200}, format="json")
    assert response.status_code == 413
    settings.OVERAGE_API_MAX_BODY_BYTES = 10_000
    response = api.post("/api/v1/events", data={"id": "e" * 200}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_field"


def test_an_unreadable_content_length_is_a_400(api):
    response = api.generic("POST", "/api/v1/events", data=b"{}", content_type="application/json",
                           CONTENT_LENGTH="lots")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_content_length"
