"""Whole months as an integrator and a business live them: plans and customers through
the API, a month of events through the API, `manage.py close_periods`, then the
invoice read back through the API — exact to the cent."""

from decimal import Decimal

import pytest
import time_machine
from django.core.management import call_command

from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db

FEATURES = [{"code": "gpt-4o", "name": "GPT-4o", "unit": "call", "default_credits_per_unit": "10"},
            {"code": "embedding", "name": "Embeddings", "unit": "token", "default_credits_per_unit": "0.001"}]


def setup(api, plan: dict, customer="acme"):
    with time_machine.travel("2026-05-01T00:00:00Z", tick=False):
        for feature in FEATURES:
            api.post("/api/v1/features", feature, format="json")
        assert api.post("/api/v1/plans", plan, format="json").status_code == 201
        assert api.post("/api/v1/customers", {"external_id": customer, "name": "Acme", "plan": plan["code"],
                                              "started_at": "2026-05-01T00:00:00Z"}, format="json").status_code == 201


def month_of_usage(api, daily: list[tuple[str, str]], customer="acme"):
    """Send each day's events (feature, quantity) on May 1…, at noon, in batches."""
    for day, (feature, quantity) in enumerate(daily, start=1):
        stamp = f"2026-05-{day:02d}T12:00:00Z"
        with time_machine.travel(stamp, tick=False):
            body = {"events": [{"id": f"{customer}-{day}-{n}", "customer": customer, "feature": feature,
                                "quantity": quantity} for n in range(3)]}
            results = api.post("/api/v1/events/batch", body, format="json").json()["results"]
            yield from results


def close_may(api, customer="acme"):
    call_command("close_periods", "--as-of", "2026-06-01T01:00:00Z")
    call_command("close_periods", "--as-of", "2026-06-01T03:00:00Z")  # running it again changes nothing
    invoices = api.get(f"/api/v1/customers/{customer}/invoices").json()
    return [i for i in invoices if i["kind"] == "period_close"]


def test_hybrid_plan_with_tiered_overage(api):
    setup(api, {"code": "pro", "name": "Pro", "base_price": "49", "included_credits": "10000",
                "overage_enabled": True, "overage_tiers": [{"up_to": "5000", "unit_price": "0.002"},
                                                           {"up_to": None, "unit_price": "0.0015"}]})
    # 30 days × 3 calls × 50 gpt-4o calls × 10 credits = 45 000 credits
    list(month_of_usage(api, [("gpt-4o", "50")] * 30))

    [invoice] = close_may(api)

    # 35 000 overage: 5 000 × 0.002 = 10.00, 30 000 × 0.0015 = 45.00; June's base fee 49.00.
    assert [(l["kind"], l["credits"], l["amount"]) for l in invoice["lines"]] == [
        ("overage", "35000", "55.00"), ("base_fee", None, "49.00")]
    assert invoice["total"] == "104.00"
    assert_ledger_consistent()


def test_pure_usage_based_plan(api):
    setup(api, {"code": "payg", "name": "Pay as you go", "overage_enabled": True, "overage_unit_price": "0.001"})
    # 31 days × 3 × 1 234 tokens × 0.001 credits = 114.762 credits
    list(month_of_usage(api, [("embedding", "1234")] * 31))

    [invoice] = close_may(api)

    assert [(l["kind"], l["credits"], l["amount"]) for l in invoice["lines"]] == [("overage", "114.762", "0.11")]
    assert invoice["total"] == "0.11"


def test_hard_limit_plan_refuses_usage_past_its_credits_and_bills_nothing(api):
    setup(api, {"code": "free", "name": "Free", "included_credits": "1000"})
    results = list(month_of_usage(api, [("gpt-4o", "3")] * 20))  # 30 credits per event, 1 800 asked

    statuses = [r["event"]["status"] for r in results]
    assert statuses.count("accepted") == 33  # 33 × 30 = 990 credits
    assert {r["event"]["reason"] for r in results if r["event"]["status"] == "rejected"} == {"insufficient_credits"}
    [invoice] = close_may(api)
    assert (invoice["total"], invoice["status"], invoice["lines"]) == ("0.00", "paid", [])


def test_capped_rollover_carries_into_june(api):
    setup(api, {"code": "pro", "name": "Pro", "base_price": "49", "included_credits": "10000",
                "overage_enabled": True, "overage_unit_price": "0.002",
                "rollover": {"policy": "capped", "max_credits": "2500"}})
    list(month_of_usage(api, [("gpt-4o", "10")] * 20))  # 6 000 credits: 4 000 unused

    close_may(api)

    with time_machine.travel("2026-06-02T00:00:00Z", tick=False):
        june = api.get("/api/v1/customers/acme/usage").json()
    assert (june["included_remaining"], june["promotional_remaining"], june["credits_remaining"]) == (
        "10000", "2500", "12500")


def test_a_pack_bought_mid_period_is_used_after_the_included_credits_and_billed_on_its_own_receipt(api):
    setup(api, {"code": "pro", "name": "Pro", "base_price": "49", "included_credits": "10000",
                "overage_enabled": True, "overage_unit_price": "0.002"})
    from plans.models import CreditPack

    CreditPack.objects.create(code="5k", name="5 000 credits", credits=Decimal("5000"), price=Decimal("10"))
    usage = month_of_usage(api, [("gpt-4o", "50")] * 10)  # 1 500 credits a day
    for _ in range(9):  # the first 9 days (13 500 credits)
        next(usage), next(usage), next(usage)
    with time_machine.travel("2026-05-09T13:00:00Z", tick=False):
        bought = api.post("/api/v1/customers/acme/packs", {"pack": "5k", "idempotency_key": "may-pack"},
                          format="json").json()
    list(usage)  # day 10: 1 500 more → 15 000 in all

    [invoice] = close_may(api)

    # 3 500 credits were overage before the pack; buying it paid them down (plan default),
    # and the remaining 1 500 came from the pack. Nothing left to bill but June's fee.
    assert bought["status"] == "paid" and bought["price"] == "10.00"
    assert [(l["kind"], l["amount"]) for l in invoice["lines"]] == [("base_fee", "49.00")]
    with time_machine.travel("2026-06-02T00:00:00Z", tick=False):
        assert api.get("/api/v1/customers/acme/usage").json()["purchased_remaining"] == "0"
    assert_ledger_consistent()


def test_cap_reached_is_refused_and_not_billed(api):
    setup(api, {"code": "pro", "name": "Pro", "base_price": "49", "included_credits": "10000",
                "overage_enabled": True, "overage_unit_price": "0.002", "overage_cap": "5.00"})
    results = list(month_of_usage(api, [("gpt-4o", "50")] * 10))  # 15 000 asked: 5 000 overage = $10

    refused = [r for r in results if r["event"]["status"] == "rejected"]
    assert {r["event"]["reason"] for r in refused} == {"spend_cap_reached"}
    [invoice] = close_may(api)
    assert [(l["kind"], l["credits"], l["amount"]) for l in invoice["lines"]] == [
        ("overage", "2500", "5.00"), ("base_fee", None, "49.00")]
