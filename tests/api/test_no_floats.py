"""Money and credits leave the API as decimal strings, never JSON numbers with a
fraction (a float in a client's hands is a rounding bug waiting)."""

import json

import pytest
import time_machine

from billing.services.invoicing import close_due_periods
from tests.factories import FeatureFactory, make_customer, pro_plan, set_tiers, utc

pytestmark = pytest.mark.django_db


def no_floats(content: bytes):
    def refuse(text):
        raise AssertionError(f"float in API output: {text}")

    return json.loads(content, parse_float=refuse)


def test_every_read_endpoint_answers_without_floats(api):
    FeatureFactory(code="gpt-4o")
    make_customer(set_tiers(pro_plan(), ("2000", "0.002"), (None, "0.001")), started_at=utc(2026, 5, 1),
                  external_id="acme")
    with time_machine.travel(utc(2026, 5, 20), tick=False):
        event = api.post("/api/v1/events", {"id": "e", "customer": "acme", "feature": "gpt-4o",
                                            "quantity": "12345.5"}, format="json")
        check = api.post("/api/v1/entitlements/check", {"customer": "acme", "feature": "gpt-4o", "quantity": 3,
                                                        "reserve": True}, format="json")
        upcoming = api.get("/api/v1/customers/acme/invoices/upcoming")
        usage = api.get("/api/v1/customers/acme/usage")
    close_due_periods(now=utc(2026, 6, 1, 2))
    invoices = api.get("/api/v1/customers/acme/invoices")
    number = no_floats(invoices.content)[0]["id"]
    line_id = no_floats(invoices.content)[0]["lines"][0]["id"]

    for response in (event, check, upcoming, usage, invoices, api.get(f"/api/v1/invoices/{number}"),
                     api.get(f"/api/v1/invoices/{number}/lines/{line_id}/usage"), api.get("/api/v1/plans"),
                     api.get("/api/v1/features"), api.get("/api/v1/customers/acme")):
        assert response.status_code in (200, 201), response.content
        no_floats(response.content)
