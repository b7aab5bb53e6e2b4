"""Plans, features, customers, plan changes and grants through the API."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import BillingPeriod, CreditGrant, LedgerEntry
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)

SCALE = {
    "code": "scale", "name": "Scale", "currency": "usd", "interval": "month", "base_price": "199",
    "included_credits": "100000", "overage_enabled": True, "overage_unit_price": "0.0015",
    "overage_tiers": [{"up_to": "100000", "unit_price": "0.0015"}, {"up_to": None, "unit_price": "0.001"}],
    "overage_cap": "500", "rollover": {"policy": "capped", "max_credits": "20000"},
    "feature_costs": [{"feature": "gpt-4o", "credits_per_unit": "8"}],
}


@time_machine.travel(NOW, tick=False)
def test_create_feature_and_plan_then_read_them_back(api):
    assert api.post("/api/v1/features", {"code": "gpt-4o", "name": "GPT-4o", "unit": "call"},
                    format="json").status_code == 201

    created = api.post("/api/v1/plans", {**SCALE, "currency": "USD"}, format="json")

    assert created.status_code == 201, created.content
    expected = {
        "code": "scale", "name": "Scale", "currency": "USD", "interval": "month", "base_price": "199.00",
        "included_credits": "100000", "overage_enabled": True, "overage_unit_price": "0.0015",
        "overage_tiers": [{"up_to": "100000", "unit_price": "0.0015"}, {"up_to": None, "unit_price": "0.001"}],
        "overage_cap": "500.00", "cap_behaviour": "pause", "hard_limit_behaviour": "block",
        "rollover": {"policy": "capped", "max_credits": "20000"},
        "feature_costs": [{"feature": "gpt-4o", "credits_per_unit": "8"}],
    }
    assert created.json() == expected
    assert api.get("/api/v1/plans/scale").json() == expected
    assert [p["code"] for p in api.get("/api/v1/plans").json()] == ["scale"]
    assert api.get("/api/v1/features").json() == [
        {"code": "gpt-4o", "name": "GPT-4o", "unit": "call", "default_credits_per_unit": "1"}
    ]


@time_machine.travel(NOW, tick=False)
def test_customer_created_in_the_past_has_every_period_opened_with_its_included_credits(api):
    pro_plan()

    response = api.post("/api/v1/customers", {"external_id": "acme", "name": "Acme", "email": "a@acme.test",
                                              "plan": "pro", "started_at": "2026-03-20T00:00:00Z"}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["subscription"]["plan"] == "pro"
    assert body["current_period"] == {"start": "2026-04-20T00:00:00Z", "end": "2026-05-20T00:00:00Z",
                                      "status": "open"}
    periods = BillingPeriod.objects.filter(customer__external_id="acme").order_by("start")
    assert [(p.start.date().isoformat(), p.end.date().isoformat()) for p in periods] == [
        ("2026-03-20", "2026-04-20"), ("2026-04-20", "2026-05-20")]
    assert list(CreditGrant.objects.order_by("effective_at").values_list("credits", "expires_at")) == [
        (Decimal("10000"), utc(2026, 4, 20)), (Decimal("10000"), utc(2026, 5, 20))]
    assert api.get("/api/v1/customers/acme").json() == body
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_a_downgrade_through_the_api_takes_effect_at_the_next_period(api):
    pro = pro_plan()
    from tests.factories import PlanFactory

    PlanFactory(code="small", name="Small", included_credits=Decimal("2000"), base_price=Decimal("9"),
                overage_enabled=True, overage_unit_price=Decimal("0.003"))
    make_customer(pro, started_at=utc(2026, 5, 1), external_id="acme")

    changed = api.post("/api/v1/customers/acme/subscription", {"plan": "small"}, format="json")

    assert changed.status_code == 200
    assert (changed.json()["subscription"]["plan"], changed.json()["subscription"]["pending_plan"]) == ("pro",
                                                                                                       "small")
    assert api.get("/api/v1/customers/acme/usage").json()["included_credits"] == "10000"
    with time_machine.travel(utc(2026, 6, 2), tick=False):
        june = api.get("/api/v1/customers/acme/usage").json()
        assert (june["plan"], june["included_credits"], june["included_remaining"]) == ("small", "2000", "2000")
        assert api.get("/api/v1/customers/acme").json()["subscription"]["pending_plan"] is None


@time_machine.travel(NOW, tick=False)
def test_promotional_grant_is_idempotent_by_key_and_scoped_to_features(api):
    FeatureFactory(code="embedding")
    FeatureFactory(code="gpt-4o")
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    body = {"credits": "1000", "source": "promotional", "features": ["embedding"], "idempotency_key": "welcome",
            "expires_at": "2026-06-30T00:00:00Z", "reason": "Welcome offer"}

    first = api.post("/api/v1/customers/acme/grants", body, format="json")
    again = api.post("/api/v1/customers/acme/grants", body, format="json")
    conflict = api.post("/api/v1/customers/acme/grants", {**body, "credits": "2000"}, format="json")

    assert (first.status_code, again.status_code, conflict.status_code) == (201, 200, 409)
    assert first.json()["features"] == ["embedding"]
    assert again.json() == first.json()
    assert CreditGrant.objects.filter(source="promotional").count() == 1
    assert LedgerEntry.objects.filter(kind="grant", grant__source="promotional").count() == 1
    # The included credits expire on 2026-06-01, sooner than the promo's 2026-06-30: they go first.
    api.post("/api/v1/events", {"id": "e1", "customer": "acme", "feature": "embedding", "quantity": 10},
             format="json")
    promo = CreditGrant.objects.get(source="promotional")
    assert promo.remaining == Decimal("1000")
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_feature_scoped_grant_serves_only_its_features(api):
    FeatureFactory(code="embedding")
    FeatureFactory(code="gpt-4o")
    make_customer(pro_plan(included_credits=Decimal("0")), started_at=utc(2026, 5, 1), external_id="acme")
    api.post("/api/v1/customers/acme/grants", {"credits": "100", "features": ["embedding"],
                                               "idempotency_key": "promo", "reason": "Promotion"}, format="json")

    gpt = api.post("/api/v1/events", {"id": "e1", "customer": "acme", "feature": "gpt-4o", "quantity": 10},
                   format="json").json()
    emb = api.post("/api/v1/events", {"id": "e2", "customer": "acme", "feature": "embedding", "quantity": 10},
                   format="json").json()

    assert (gpt["credits"], gpt["overage_credits"]) == ("10", "10")
    assert (emb["credits"], emb["overage_credits"]) == ("10", "0")
    assert CreditGrant.objects.get(source="promotional").remaining == Decimal("90")
    usage = api.get("/api/v1/customers/acme/usage").json()
    assert (usage["overage_credits"], usage["estimated_overage_amount"]) == ("10", "0.02")
    assert_ledger_consistent()


def test_openapi_schema_describes_the_contract(api):
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    schema = response.json()
    for path in ["/api/v1/events", "/api/v1/events/batch", "/api/v1/entitlements/check", "/api/v1/plans",
                 "/api/v1/customers/{external_id}/usage", "/api/v1/customers/{external_id}/grants",
                 "/api/v1/reservations/{reservation_id}/release"]:
        assert path in schema["paths"], path
    result = schema["components"]["schemas"]["EntitlementResult"]["properties"]
    assert {"allowed", "reason", "credits_required", "credits_remaining", "overage_credits",
            "estimated_overage_amount", "reservation_id", "reservation_expires_at"} <= set(result)
    usage = schema["components"]["schemas"]["Usage"]["properties"]
    assert {"period_start", "period_end", "included_credits", "credits_used", "credits_remaining",
            "purchased_remaining", "overage_credits", "estimated_overage_amount", "estimated_total", "currency",
            "spend_cap", "by_feature"} <= set(usage)
    assert api.get("/api/docs/").status_code == 200


def test_customer_detail_shows_the_period_containing_now_even_after_a_quiet_spell(api):
    make_customer(pro_plan(), started_at=utc(2026, 1, 1), external_id="acme")

    with time_machine.travel(utc(2026, 4, 15), tick=False):
        body = api.get("/api/v1/customers/acme").json()

    assert body["current_period"] == {"start": "2026-04-01T00:00:00Z", "end": "2026-05-01T00:00:00Z",
                                      "status": "open"}


def test_retrying_a_grant_after_its_expiry_passed_is_still_a_repeat(api):
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    body = {"credits": "100", "expires_at": "2026-05-10T10:00:00Z", "idempotency_key": "k1", "reason": "Goodwill"}

    with time_machine.travel(utc(2026, 5, 10, 9), tick=False):
        first = api.post("/api/v1/customers/acme/grants", body, format="json")
    with time_machine.travel(utc(2026, 5, 10, 11), tick=False):
        retry = api.post("/api/v1/customers/acme/grants", body, format="json")

    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json() == first.json()
