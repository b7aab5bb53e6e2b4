"""Spend caps: business cap (plan or per-customer override), the customer's lower cap,
pause versus approval."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import UsageEvent
from plans.models import Plan
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10)


@pytest.fixture(autouse=True)
def frozen():
    FeatureFactory(code="api")
    with time_machine.travel(NOW, tick=False):
        yield


def send(api, event_id, quantity):
    return api.post("/api/v1/events", {"id": event_id, "customer": "acme", "feature": "api", "quantity": quantity},
                    format="json").json()


def check(api, quantity):
    return api.post("/api/v1/entitlements/check", {"customer": "acme", "feature": "api", "quantity": quantity},
                    format="json").json()


def test_the_customers_own_cap_lowers_the_business_cap_and_cannot_exceed_it(api):
    make_customer(pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("20")), started_at=utc(2026, 5, 1),
                  external_id="acme")

    above = api.put("/api/v1/customers/acme/spend-cap", {"spend_cap": "25.00"}, format="json")
    lowered = api.put("/api/v1/customers/acme/spend-cap", {"spend_cap": "2.00"}, format="json")
    ok = send(api, "e1", 1000)  # $2.00: exactly at the cap
    refused = send(api, "e2", 1)

    assert (above.status_code, above.json()["error"]["code"]) == (422, "spend_cap_above_business_cap")
    assert lowered.json() == {"currency": "USD", "business_cap": "20.00", "spend_cap": "2.00",
                              "effective_cap": "2.00", "cap_behaviour": "pause"}
    assert ok["status"] == "accepted"
    assert (refused["status"], refused["reason"]) == ("rejected", "spend_cap_reached")
    assert api.get("/api/v1/customers/acme/usage").json()["estimated_overage_amount"] == "2.00"


def test_a_per_customer_override_replaces_the_plans_cap(api):
    customer = make_customer(pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("1")),
                             started_at=utc(2026, 5, 1), external_id="acme")
    customer.overage_cap_override = Decimal("10")
    customer.save()

    assert check(api, 2500)["allowed"] is True  # $5: over the plan's $1, under the override


def test_pause_plans_take_no_approvals(api):
    make_customer(pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("1")), started_at=utc(2026, 5, 1),
                  external_id="acme")

    response = api.post("/api/v1/customers/acme/spend-cap/approvals", {"cap": "5.00"}, format="json")

    assert (response.status_code, response.json()["error"]["code"]) == (422, "approval_not_allowed")


def test_approval_plans_stay_denied_until_a_higher_cap_is_approved_for_the_period(api):
    plan = pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("1"),
                    cap_behaviour=Plan.CapBehaviour.APPROVAL)
    make_customer(plan, started_at=utc(2026, 5, 1), external_id="acme")
    send(api, "e1", 500)  # $1.00: at the cap

    denied = check(api, 1)
    not_higher = api.post("/api/v1/customers/acme/spend-cap/approvals", {"cap": "1.00"}, format="json")
    approved = api.post("/api/v1/customers/acme/spend-cap/approvals", {"cap": "3.00"}, format="json")
    after = send(api, "e2", 1000)  # $3.00 in all

    assert (denied["allowed"], denied["reason"]) == (False, "spend_cap_reached")
    assert not_higher.json()["error"]["code"] == "cap_not_higher"
    assert approved.status_code == 201 and approved.json()["effective_cap"] == "3.00"
    assert after["status"] == "accepted"
    assert check(api, 1)["reason"] == "spend_cap_reached"
    # The approval is for this period only.
    with time_machine.travel(utc(2026, 6, 2), tick=False):
        assert api.get("/api/v1/customers/acme/spend-cap").json()["effective_cap"] == "1.00"
    assert UsageEvent.objects.filter(status="rejected").count() == 0
