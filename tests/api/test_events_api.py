"""POST /api/v1/events and /events/batch: idempotent metering over HTTP."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import LedgerEntry, UsageEvent
from tests.factories import FeatureFactory, make_customer, pro_plan, set_cost, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


@pytest.fixture
def acme():
    plan = pro_plan()
    set_cost(plan, FeatureFactory(code="gpt-4o"), "10")
    FeatureFactory(code="embedding", unit="token", default_credits_per_unit=Decimal("0.001"))
    return make_customer(plan, started_at=utc(2026, 5, 1), external_id="acme")


def event(**overrides):
    body = {"id": "evt-1", "customer": "acme", "feature": "gpt-4o", "quantity": 3}
    body.update(overrides)
    return body


@time_machine.travel(NOW, tick=False)
def test_first_event_is_created_and_charged_through_the_plans_feature_cost(api, acme):
    response = api.post("/api/v1/events", event(), format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["credits"] == "30"
    assert body["overage_credits"] == "0"
    assert body["status"] == "accepted"
    assert body["reason"] is None
    assert body["timestamp"] == "2026-05-10T09:00:00Z"
    usage = api.get("/api/v1/customers/acme/usage").json()
    assert usage["credits_used"] == "30"
    assert usage["included_remaining"] == "9970"


@time_machine.travel(NOW, tick=False)
def test_fractional_credits_are_exact(api, acme):
    response = api.post("/api/v1/events", event(feature="embedding", quantity="1500"), format="json")

    assert response.json()["credits"] == "1.5"
    assert api.get("/api/v1/customers/acme/usage").json()["credits_used"] == "1.5"


@time_machine.travel(NOW, tick=False)
def test_same_event_sent_five_times_is_counted_once(api, acme):
    responses = [api.post("/api/v1/events", event(), format="json") for _ in range(5)]

    assert [r.status_code for r in responses] == [201, 200, 200, 200, 200]
    assert all(r.json() == responses[0].json() for r in responses)
    assert UsageEvent.objects.count() == 1
    assert LedgerEntry.objects.filter(kind="consume").count() == 1
    assert api.get("/api/v1/customers/acme/usage").json()["credits_used"] == "30"
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_same_id_with_a_different_body_is_a_conflict_and_changes_nothing(api, acme):
    api.post("/api/v1/events", event(), format="json")

    response = api.post("/api/v1/events", event(quantity=4), format="json")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_conflict"
    assert response.json()["error"]["field"] == "id"
    assert UsageEvent.objects.get().quantity == Decimal("3")


@time_machine.travel(NOW, tick=False)
def test_a_retry_after_the_clock_moved_on_is_still_the_same_event(api, acme):
    """A retry without a timestamp arrives later; the body is the same, so it is a repeat."""
    first = api.post("/api/v1/events", event(), format="json")
    with time_machine.travel(utc(2026, 5, 10, 9, 5), tick=False):
        again = api.post("/api/v1/events", event(), format="json")

    assert again.status_code == 200
    assert again.json() == first.json()


@time_machine.travel(NOW, tick=False)
def test_late_event_lands_in_the_period_it_happened_in(api, acme):
    with time_machine.travel(utc(2026, 6, 1, 0, 30), tick=False):
        late = api.post("/api/v1/events", event(id="late", timestamp="2026-05-31T23:59:00Z"), format="json")
        current = api.get("/api/v1/customers/acme/usage").json()
        may = api.get("/api/v1/customers/acme/usage", {"at": "2026-05-31T00:00:00Z"}).json()

    assert late.status_code == 201
    assert (may["period_start"], may["credits_used"]) == ("2026-05-01T00:00:00Z", "30")
    assert (current["period_start"], current["credits_used"]) == ("2026-06-01T00:00:00Z", "0")
    assert current["included_remaining"] == "10000"


@time_machine.travel(NOW, tick=False)
def test_event_after_the_grace_window_of_its_period_is_refused(api, acme):
    with time_machine.travel(utc(2026, 6, 1, 1, 0), tick=False):  # grace is one hour
        response = api.post("/api/v1/events", event(timestamp="2026-05-31T23:59:00Z"), format="json")

    assert response.status_code == 422
    assert response.json()["error"] == {"code": "period_closed", "field": "timestamp",
                                        "message": "The billing period of this event's timestamp is closed."}
    assert UsageEvent.objects.count() == 0


@time_machine.travel(NOW, tick=False)
def test_batch_returns_per_event_results_and_each_event_stands_alone(api, acme):
    api.post("/api/v1/events", event(id="seen-before"), format="json")
    batch = {"events": [
        event(id="b1"),
        event(id="seen-before"),
        event(id="b2", quantity=-1),
        event(id="b3", feature="no-such-feature"),
        event(id="b4", quantity="2"),
    ]}

    response = api.post("/api/v1/events/batch", batch, format="json")

    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["id"], r["outcome"], r["http_status"]) for r in results] == [
        ("b1", "created", 201), ("seen-before", "duplicate", 200), ("b2", "error", 400),
        ("b3", "error", 422), ("b4", "created", 201),
    ]
    assert results[2]["error"]["field"] == "quantity"
    assert results[3]["error"]["code"] == "unknown_feature"
    assert response.json()["counts"] == {"created": 2, "duplicate": 1, "error": 2}
    assert set(UsageEvent.objects.values_list("event_id", flat=True)) == {"seen-before", "b1", "b4"}
    assert api.get("/api/v1/customers/acme/usage").json()["credits_used"] == "80"
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_by_feature_usage_comes_from_rollups(api, acme):
    api.post("/api/v1/events/batch", {"events": [
        event(id="a", quantity=1), event(id="b", quantity=2), event(id="c", feature="embedding", quantity=4000),
    ]}, format="json")

    by_feature = api.get("/api/v1/customers/acme/usage").json()["by_feature"]

    assert by_feature == [
        {"feature": "gpt-4o", "name": "gpt-4o", "unit": "call", "events": 2, "quantity": "3", "credits": "30",
         "overage_credits": "0"},
        {"feature": "embedding", "name": "embedding", "unit": "token", "events": 1, "quantity": "4000",
         "credits": "4", "overage_credits": "0"},
    ]
