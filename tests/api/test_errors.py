"""Bad input gets the right 4xx, a machine-readable code, and writes nothing."""

import pytest
import time_machine

from billing.models import CreditGrant, Customer, LedgerEntry, Reservation, UsageEvent
from plans.models import Feature, Plan
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


@pytest.fixture
def acme():
    FeatureFactory(code="gpt-4o")
    return make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")


def snapshot():
    return tuple(m.objects.count() for m in (UsageEvent, LedgerEntry, CreditGrant, Reservation, Customer, Plan,
                                               Feature))


def good_event(**overrides):
    body = {"id": "evt-1", "customer": "acme", "feature": "gpt-4o", "quantity": 1}
    body.update(overrides)
    return body


@pytest.mark.parametrize("body, status, code, field", [
    (good_event(customer="nobody"), 404, "customer_not_found", "customer"),
    (good_event(feature="nope"), 422, "unknown_feature", "feature"),
    (good_event(quantity=-5), 400, "invalid", "quantity"),
    (good_event(quantity=0), 400, "invalid", "quantity"),
    (good_event(quantity="ten"), 400, "invalid", "quantity"),
    (good_event(quantity="1e400"), 400, "invalid", "quantity"),
    (good_event(quantity="NaN"), 400, "invalid", "quantity"),
    (good_event(quantity="Infinity"), 400, "invalid", "quantity"),
    (good_event(quantity="10000000001"), 400, "invalid", "quantity"),
    (good_event(quantity="0.0000001"), 400, "invalid", "quantity"),
    (good_event(id="x" * 256), 400, "invalid", "id"),
    (good_event(id=""), 400, "missing_field", "id"),
    ({"customer": "acme", "feature": "gpt-4o", "quantity": 1}, 400, "missing_field", "id"),
    (good_event(timestamp="yesterday"), 400, "invalid", "timestamp"),
    (good_event(timestamp="2026-05-10T10:00:00Z"), 422, "timestamp_in_future", "timestamp"),
    (good_event(timestamp="2026-04-30T23:00:00Z"), 422, "no_subscription", "timestamp"),
    (good_event(properties=[1, 2]), 400, "invalid", "properties"),
    (good_event(properties={"p": "a\u0000b"}), 400, "invalid", "properties"),
    (good_event(properties={"deep": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}}), 400, "invalid", "properties"),
    (good_event(properties={"big": "x" * 17000}), 400, "invalid", "properties"),
    (good_event(reservation_id="not-a-uuid"), 400, "invalid", "reservation_id"),
    (good_event(reservation_id="3f2b8a4e-0000-4000-8000-000000000000"), 422, "reservation_not_found",
     "reservation_id"),
])
@time_machine.travel(NOW, tick=False)
def test_bad_event_is_refused_with_a_clear_error_and_nothing_written(api, acme, body, status, code, field):
    before = snapshot()

    response = api.post("/api/v1/events", body, format="json")

    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    assert snapshot() == before


@time_machine.travel(NOW, tick=False)
def test_malformed_json_is_a_400(api, acme):
    before = snapshot()
    response = api.post("/api/v1/events", data='{"id": "e1", "quantity": ', content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
    assert snapshot() == before


@time_machine.travel(NOW, tick=False)
def test_json_nan_literal_is_refused(api, acme):
    body = '{"id": "e1", "customer": "acme", "feature": "gpt-4o", "quantity": NaN}'
    response = api.post("/api/v1/events", data=body, content_type="application/json")

    assert response.status_code == 400
    assert UsageEvent.objects.count() == 0


@time_machine.travel(NOW, tick=False)
def test_non_json_body_is_a_415(api, acme):
    response = api.post("/api/v1/events", data="id=e1", content_type="application/x-www-form-urlencoded")

    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


@time_machine.travel(NOW, tick=False)
def test_oversized_batch_is_refused_whole(api, acme):
    before = snapshot()
    events = [good_event(id=f"e{i}") for i in range(1001)]

    response = api.post("/api/v1/events/batch", {"events": events}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "events"
    assert snapshot() == before


@time_machine.travel(NOW, tick=False)
def test_empty_batch_is_refused(api, acme):
    response = api.post("/api/v1/events/batch", {"events": []}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "events"


@pytest.mark.parametrize("path, body, status, code, field", [
    ("/api/v1/plans", {"code": "x", "name": "X", "overage_tiers": [{"up_to": "100", "unit_price": "0.1"},
                                                                    {"up_to": "50", "unit_price": "0.1"},
                                                                    {"up_to": None, "unit_price": "0.1"}]},
     400, "invalid", "overage_tiers"),
    ("/api/v1/plans", {"code": "x", "name": "X", "overage_tiers": [{"up_to": "100", "unit_price": "0.1"}]},
     400, "invalid", "overage_tiers"),
    ("/api/v1/plans", {"code": "x", "name": "X", "base_price": "-1"}, 400, "invalid", "base_price"),
    ("/api/v1/plans", {"code": "x", "name": "X", "currency": "XYZ"}, 400, "invalid", "currency"),
    ("/api/v1/plans", {"code": "x", "name": "X", "feature_costs": [{"feature": "ghost", "credits_per_unit": "1"}]},
     422, "unknown_feature", "feature_costs"),
    ("/api/v1/plans", {"code": "x", "name": "X", "rollover": {"policy": "capped"}}, 400, "invalid",
     "rollover_max_credits"),
    ("/api/v1/plans", {"code": "pro", "name": "Duplicate"}, 409, "plan_exists", "code"),
    ("/api/v1/plans", {"code": "has space", "name": "X"}, 400, "invalid", "code"),
    ("/api/v1/features", {"code": "gpt-4o", "name": "again"}, 409, "feature_exists", "code"),
    ("/api/v1/features", {"name": "no code"}, 400, "missing_field", "code"),
    ("/api/v1/features", {"code": "big", "name": "Big", "default_credits_per_unit": "1000000000000"}, 400, "invalid",
     "default_credits_per_unit"),
    ("/api/v1/plans", {"code": "x", "name": "X", "feature_costs": [{"feature": "gpt-4o",
                                                                    "credits_per_unit": "1000001"}]},
     400, "invalid", "feature_costs[0].credits_per_unit"),
    ("/api/v1/customers", {"external_id": "org/42", "name": "A", "plan": "pro"}, 400, "invalid", "external_id"),
    ("/api/v1/customers", {"external_id": "acme ", "name": "A", "plan": "pro"}, 400, "invalid", "external_id"),
    ("/api/v1/customers", {"external_id": "old", "name": "A", "plan": "pro", "started_at": "2020-01-01T00:00:00Z"},
     400, "invalid", "started_at"),
    ("/api/v1/customers", {"external_id": "acme", "name": "A", "plan": "pro"}, 409, "customer_exists",
     "external_id"),
    ("/api/v1/customers", {"external_id": "new", "name": "A", "plan": "nope"}, 422, "plan_not_found", "plan"),
    ("/api/v1/customers", {"external_id": "new", "name": "A", "plan": "pro", "email": "not-an-email"}, 400,
     "invalid", "email"),
    ("/api/v1/customers", {"external_id": "new", "name": "A", "plan": "pro", "started_at": "2027-01-01T00:00:00Z"},
     400, "invalid", "started_at"),
    ("/api/v1/customers/nobody/subscription", {"plan": "pro"}, 404, "customer_not_found", None),
    ("/api/v1/customers/acme/subscription", {"plan": "nope"}, 422, "plan_not_found", "plan"),
    ("/api/v1/customers/acme/grants", {"credits": "10", "idempotency_key": "k", "source": "purchase"}, 400,
     "invalid", "source"),
    ("/api/v1/customers/acme/grants", {"credits": "0", "idempotency_key": "k"}, 400, "invalid", "credits"),
    ("/api/v1/customers/acme/grants", {"credits": "10"}, 400, "missing_field", "idempotency_key"),
    ("/api/v1/customers/acme/grants", {"credits": "10", "idempotency_key": "k", "features": ["ghost"]}, 422,
     "unknown_feature", "features"),
    ("/api/v1/customers/acme/grants", {"credits": "10", "idempotency_key": "k",
                                       "expires_at": "2026-05-01T00:00:00Z"}, 400, "invalid", "expires_at"),
    ("/api/v1/entitlements/check", {"customer": "nobody", "feature": "gpt-4o"}, 404, "customer_not_found",
     "customer"),
    ("/api/v1/entitlements/check", {"customer": "acme", "feature": "gpt-4o", "quantity": -1}, 400, "invalid",
     "quantity"),
    ("/api/v1/entitlements/check", {"customer": "acme", "feature": "gpt-4o", "reserve": True,
                                    "reservation_ttl_seconds": 0}, 400, "invalid", "reservation_ttl_seconds"),
    ("/api/v1/reservations/3f2b8a4e-0000-4000-8000-000000000000/release", {}, 404, "reservation_not_found", None),
])
@time_machine.travel(NOW, tick=False)
def test_bad_request_on_other_endpoints_writes_nothing(api, acme, path, body, status, code, field):
    before = snapshot()

    response = api.post(path, body, format="json")

    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert snapshot() == before


@time_machine.travel(NOW, tick=False)
def test_unknown_customer_and_plan_reads_are_404(api, acme):
    assert api.get("/api/v1/customers/nobody").json()["error"]["code"] == "customer_not_found"
    assert api.get("/api/v1/customers/nobody/usage").status_code == 404
    assert api.get("/api/v1/plans/nope").json()["error"]["code"] == "plan_not_found"
    response = api.get("/api/v1/customers/acme/usage", {"at": "soon"})
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid")


@time_machine.travel(NOW, tick=False)
def test_an_infinite_number_in_properties_is_refused(api, acme):
    body = '{"id": "e1", "customer": "acme", "feature": "gpt-4o", "quantity": 1, "properties": {"v": 1e400}}'
    response = api.post("/api/v1/events", data=body, content_type="application/json")

    assert (response.status_code, response.json()["error"]["field"]) == (400, "properties")
    assert UsageEvent.objects.count() == 0


@time_machine.travel(NOW, tick=False)
def test_one_bad_event_in_a_batch_does_not_fail_the_others(api, acme):
    good = good_event(id="ok-1")
    bad = good_event(id="bad-1", properties={"p": "a\u0000b"})

    response = api.post("/api/v1/events/batch", {"events": [good, bad]}, format="json")

    assert response.status_code == 200
    assert [r["outcome"] for r in response.json()["results"]] == ["created", "error"]


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/reservations/not-a-uuid/release",
                                  "/api/v1/customers/acme/usage/extra"])
def test_unknown_api_urls_answer_in_the_error_shape(api, path):
    response = api.post(path, {}, format="json")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
