"""Invoices over the API: list, detail, upcoming (same code as the close), drill-down."""


import pytest
import time_machine

from billing.services.invoicing import close_due_periods
from tests.factories import FeatureFactory, make_customer, pro_plan, set_tiers, utc

pytestmark = pytest.mark.django_db
MAY = utc(2026, 5, 1)


@pytest.fixture
def acme(api):
    FeatureFactory(code="gpt-4o")
    FeatureFactory(code="embedding")
    customer = make_customer(set_tiers(pro_plan(), ("2000", "0.002"), (None, "0.001")), started_at=MAY,
                             external_id="acme")
    with time_machine.travel(utc(2026, 5, 20), tick=False):
        api.post("/api/v1/events/batch", {"events": [
            {"id": "a", "customer": "acme", "feature": "gpt-4o", "quantity": 9000, "timestamp": "2026-05-03T10:00:00Z"},
            {"id": "b", "customer": "acme", "feature": "embedding", "quantity": 2000,
             "timestamp": "2026-05-04T10:00:00Z"},
            {"id": "c", "customer": "acme", "feature": "gpt-4o", "quantity": 3000, "timestamp": "2026-05-05T10:00:00Z"},
        ]}, format="json")
    return customer


def test_upcoming_invoice_then_the_same_invoice_after_the_close(api, acme):
    with time_machine.travel(utc(2026, 5, 31, 12), tick=False):
        upcoming = api.get("/api/v1/customers/acme/invoices/upcoming").json()
    close_due_periods(now=utc(2026, 6, 1, 2))
    invoices = api.get("/api/v1/customers/acme/invoices").json()

    assert [(i["kind"], i["total"]) for i in invoices] == [("period_close", "55.00"), ("subscription_start", "49.00")]
    closed = api.get(f"/api/v1/invoices/{invoices[0]['id']}").json()
    assert closed["id"] == "OVG-000002"
    assert (upcoming["status"], closed["status"]) == ("upcoming", "issued")
    strip = lambda invoice: [{k: v for k, v in line.items() if k != "id"} for line in invoice["lines"]]  # noqa: E731
    assert strip(upcoming) == strip(closed)
    overage = closed["lines"][0]
    assert (overage["kind"], overage["credits"], overage["amount"], overage["unit_price"]) == (
        "overage", "4000", "6.00", None)
    assert [(t["credits"], t["amount"]) for t in overage["tiers"]] == [
        ("2000.000000", "4.00000000000000"), ("2000.000000", "2.00000000000000")]
    assert overage["usage"] == {"period_start": "2026-05-01T00:00:00Z", "period_end": "2026-06-01T00:00:00Z",
                                "overage_from": "0", "overage_to": "4000"}
    assert closed["lines"][1] == {
        "id": closed["lines"][1]["id"], "kind": "base_fee", "description": "Pro base fee", "credits": None,
        "unit_price": None, "amount": "49.00", "service_start": "2026-06-01T00:00:00Z",
        "service_end": "2026-07-01T00:00:00Z", "tiers": [], "usage": None}


def test_an_overage_line_drills_down_to_the_features_days_and_events_behind_it(api, acme):
    close_due_periods(now=utc(2026, 6, 1, 2))
    invoice = api.get("/api/v1/customers/acme/invoices").json()[0]
    line_id = invoice["lines"][0]["id"]

    usage = api.get(f"/api/v1/invoices/{invoice['id']}/lines/{line_id}/usage").json()

    # 10 000 included credits: event a (9 000) and 1 000 of b's 2 000 fit; the rest is overage.
    assert usage["by_feature"] == [{"feature": "embedding", "overage_credits": "1000", "events": 1},
                                   {"feature": "gpt-4o", "overage_credits": "3000", "events": 1}]
    assert usage["by_day"] == [{"day": "2026-05-04", "overage_credits": "1000"},
                               {"day": "2026-05-05", "overage_credits": "3000"}]
    assert [e["id"] for e in usage["events"]] == ["b", "c"]


def test_unknown_invoice_and_line_are_404(api, acme):
    assert api.get("/api/v1/invoices/OVG-999999").json()["error"]["code"] == "invoice_not_found"
    number = api.get("/api/v1/customers/acme/invoices").json()[0]["id"]
    assert api.get(f"/api/v1/invoices/{number}/lines/999/usage").json()["error"]["code"] == "line_not_found"
