"""Every reason the entitlement check can give, with the numbers a caller relies on."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import BillingPeriod, Subscription, UsageEvent
from plans.models import Plan
from tests.factories import FeatureFactory, PlanFactory, free_plan, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


def check(api, **body):
    response = api.post("/api/v1/entitlements/check", {"customer": "acme", "feature": "gpt-4o", **body},
                        format="json")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def gpt():
    return FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))


@time_machine.travel(NOW, tick=False)
def test_ok_within_included_credits(api, gpt):
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")

    assert check(api, quantity=3) == {
        "allowed": True, "reason": "ok", "credits_required": "30", "credits_remaining": "10000",
        "overage_credits": "0", "estimated_overage_amount": "0.00", "currency": "USD",
        "reservation_id": None, "reservation_expires_at": None,
    }


@time_machine.travel(NOW, tick=False)
def test_overage_beyond_included_credits_shows_the_estimated_charge(api, gpt):
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    api.post("/api/v1/events", {"id": "e", "customer": "acme", "feature": "gpt-4o", "quantity": 1300},
             format="json")  # 13 000 credits: 3 000 overage, $6.00

    result = check(api, quantity=50)  # 500 more overage credits → $7.00

    assert result == {"allowed": True, "reason": "overage", "credits_required": "500", "credits_remaining": "0",
                      "overage_credits": "500", "estimated_overage_amount": "7.00", "currency": "USD",
                      "reservation_id": None, "reservation_expires_at": None}


@time_machine.travel(NOW, tick=False)
def test_spend_cap_denies_and_an_event_beyond_it_is_recorded_rejected_never_billed(api, gpt):
    make_customer(pro_plan(overage_cap=Decimal("5.00")), started_at=utc(2026, 5, 1), external_id="acme")
    api.post("/api/v1/events", {"id": "e1", "customer": "acme", "feature": "gpt-4o", "quantity": 1240},
             format="json")  # 2 400 overage credits = $4.80

    result = check(api, quantity=20)  # +200 → $5.20 > $5.00
    event = api.post("/api/v1/events", {"id": "e2", "customer": "acme", "feature": "gpt-4o", "quantity": 20},
                     format="json").json()

    assert (result["allowed"], result["reason"], result["estimated_overage_amount"]) == (
        False, "spend_cap_reached", "4.80")
    assert (event["status"], event["reason"]) == ("rejected", "spend_cap_reached")
    usage = api.get("/api/v1/customers/acme/usage").json()
    assert (usage["overage_credits"], usage["estimated_overage_amount"], usage["spend_cap"]) == ("2400", "4.80",
                                                                                                 "5.00")
    assert UsageEvent.objects.filter(status="rejected", reject_reason="spend_cap_reached").count() == 1


@time_machine.travel(NOW, tick=False)
def test_paused_subscription_is_denied(api, gpt):
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    Subscription.objects.filter(customer=customer).update(status=Subscription.Status.PAUSED)

    assert (check(api)["allowed"], check(api)["reason"]) == (False, "paused")
    event = api.post("/api/v1/events", {"id": "e", "customer": "acme", "feature": "gpt-4o", "quantity": 1},
                     format="json").json()
    assert (event["status"], event["reason"]) == ("rejected", "paused")


@time_machine.travel(NOW, tick=False)
def test_unknown_feature_and_no_subscription(api, gpt):
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")

    assert check(api, feature="nope")["reason"] == "unknown_feature"
    subscription = Subscription.objects.get(customer=customer)
    subscription.status = Subscription.Status.CANCELED
    subscription.save()  # as the admin does (a save, not a queryset update: a cached position sees it)
    assert (check(api)["allowed"], check(api)["reason"]) == (False, "no_subscription")


@time_machine.travel(NOW, tick=False)
def test_allow_unbilled_hard_limit_records_usage_but_never_bills_it(api, gpt):
    plan = PlanFactory(code="soft", included_credits=Decimal("100"), overage_enabled=False,
                       overage_unit_price=Decimal("0.01"), hard_limit_behaviour=Plan.HardLimit.ALLOW_UNBILLED)
    make_customer(plan, started_at=utc(2026, 5, 1), external_id="acme")

    event = api.post("/api/v1/events", {"id": "e", "customer": "acme", "feature": "gpt-4o", "quantity": 15},
                     format="json").json()

    assert (event["status"], event["credits"], event["overage_credits"]) == ("accepted", "150", "50")
    usage = api.get("/api/v1/customers/acme/usage").json()
    assert (usage["overage_credits"], usage["estimated_overage_amount"]) == ("50", "0.00")


@time_machine.travel(NOW, tick=False)
def test_event_in_a_closed_period_is_refused(api, gpt):
    customer = make_customer(free_plan(), started_at=utc(2026, 4, 1), external_id="acme")
    BillingPeriod.objects.filter(customer=customer, start=utc(2026, 4, 1)).update(status="closed")

    response = api.post("/api/v1/events", {"id": "e", "customer": "acme", "feature": "gpt-4o", "quantity": 1,
                                           "timestamp": "2026-04-30T12:00:00Z"}, format="json")

    assert (response.status_code, response.json()["error"]["code"]) == (422, "period_closed")
