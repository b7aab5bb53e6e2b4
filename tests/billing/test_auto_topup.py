"""Automatic top-up: one purchase per crossing of the threshold, within monthly limits."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import AutoTopUp, CreditPurchase
from billing.services.metering import EventInput, record_event
from billing.services.purchases import credits_remaining, run_auto_topup
from plans.models import CreditPack
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, free_plan, make_customer, utc
from tests.ledger import assert_ledger_consistent

MAY = utc(2026, 5, 1)
NOW = utc(2026, 5, 10)


def setup_customer(*, threshold="200", mode="pack", target=None, max_per_month=None, max_amount=None):
    FeatureFactory(code="api")
    pack = CreditPack.objects.create(code="1k", name="1 000 credits", credits=Decimal("1000"), price=Decimal("2"))
    customer = make_customer(free_plan(included_credits=Decimal("1000")), started_at=MAY)
    AutoTopUp.objects.create(customer=customer, enabled=True, mode=mode, pack=pack, threshold=Decimal(threshold),
                             target_balance=None if target is None else Decimal(target),
                             max_per_month=max_per_month, max_amount_per_month=max_amount)
    return customer


def use(customer, credits, event_id):
    record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api",
                                  quantity=Decimal(credits)), now=NOW)
    return run_auto_topup(customer_id=customer.pk, now=NOW)  # what the enqueued check does


@pytest.mark.django_db
def test_falling_below_the_threshold_buys_one_pack_and_staying_above_buys_nothing():
    customer = setup_customer()

    assert use(customer, "700", "e1") is None  # 300 left, above 200
    bought = use(customer, "150", "e2")  # 150 left: top up
    again = use(customer, "10", "e3")  # 1 140 left

    assert (bought.source, bought.status, bought.credits) == ("auto_topup", "paid", Decimal("1000"))
    assert again is None
    assert credits_remaining(customer, NOW) == Decimal("1140")
    assert CreditPurchase.objects.count() == 1


@pytest.mark.django_db
def test_refill_mode_buys_enough_packs_to_reach_the_target():
    customer = setup_customer(threshold="500", mode="refill", target="2500")

    use(customer, "900", "e1")  # 100 left → needs 2 400 → 3 packs

    assert CreditPurchase.objects.count() == 3
    assert credits_remaining(customer, NOW) == Decimal("3100")


@pytest.mark.django_db
def test_monthly_limits_stop_top_ups():
    customer = setup_customer(max_per_month=2)

    use(customer, "900", "e1")
    use(customer, "950", "e2")
    third = use(customer, "1000", "e3")

    assert third is None
    assert CreditPurchase.objects.count() == 2


@pytest.mark.django_db
def test_the_money_limit_stops_top_ups():
    customer = setup_customer(max_amount="3.00")  # room for one $2 pack

    use(customer, "900", "e1")
    use(customer, "950", "e2")

    assert CreditPurchase.objects.count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@time_machine.travel(NOW, tick=False)  # for every thread: the post-commit top-up task reads the clock too
def test_16_concurrent_consumers_crossing_the_threshold_trigger_exactly_one_top_up():
    customer = setup_customer(threshold="500")
    record_event(event=EventInput(event_id="warm", customer=customer.external_id, feature="api",
                                  quantity=Decimal("400")), now=NOW)  # 600 left

    results = run_concurrently(use, [(customer, "10", f"c{i}") for i in range(16)])  # all cross together

    assert not [r for r in results if isinstance(r, Exception)]
    assert CreditPurchase.objects.count() == 1
    assert credits_remaining(customer, NOW) == Decimal("600") - Decimal("160") + Decimal("1000")
    assert_ledger_consistent()


@pytest.mark.django_db
def test_auto_topup_settings_through_the_api(api):
    FeatureFactory(code="api")
    CreditPack.objects.create(code="1k", name="1 000 credits", credits=Decimal("1000"), price=Decimal("2"))
    make_customer(free_plan(), started_at=MAY, external_id="acme")

    missing = api.get("/api/v1/customers/acme/auto-topup")
    bad = api.put("/api/v1/customers/acme/auto-topup", {"enabled": True, "pack": "1k", "threshold": "100",
                                                         "mode": "refill", "target_balance": "50"}, format="json")
    saved = api.put("/api/v1/customers/acme/auto-topup", {"enabled": True, "pack": "1k", "threshold": "100",
                                                           "max_amount_per_month": "20"}, format="json")

    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "auto_topup_not_configured")
    assert (bad.status_code, bad.json()["error"]["field"]) == (400, "target_balance")
    assert saved.json() == {"enabled": True, "mode": "pack", "pack": "1k", "threshold": "100",
                            "target_balance": None, "max_per_month": None, "max_amount_per_month": "20.00",
                            "consecutive_failures": 0, "disabled_reason": ""}
    assert api.get("/api/v1/customers/acme/auto-topup").json() == saved.json()


@pytest.mark.django_db
def test_ingestion_triggers_the_top_up_and_progressive_billing_after_commit(api, django_capture_on_commit_callbacks):
    """Embedded mode runs the queued follow-up tasks in-process right after the commit."""
    from billing.models import Invoice
    from tests.factories import pro_plan

    FeatureFactory(code="api")
    pack = CreditPack.objects.create(code="1k", name="1 000 credits", credits=Decimal("1000"), price=Decimal("2"))
    customer = make_customer(pro_plan(included_credits=Decimal("1000"), progressive_billing_threshold=Decimal("1")),
                             started_at=MAY, external_id="acme")
    AutoTopUp.objects.create(customer=customer, enabled=True, pack=pack, threshold=Decimal("100"))

    with time_machine.travel(NOW, tick=False):
        with django_capture_on_commit_callbacks(execute=True):
            api.post("/api/v1/events", {"id": "e1", "customer": "acme", "feature": "api", "quantity": 950},
                     format="json")  # 50 left: below 100
        topped_up = CreditPurchase.objects.count()
        AutoTopUp.objects.update(enabled=False)
        with django_capture_on_commit_callbacks(execute=True):
            api.post("/api/v1/events", {"id": "e2", "customer": "acme", "feature": "api", "quantity": 1600},
                     format="json")  # 1 050 left → 550 overage = $1.10 ≥ $1 threshold

    assert topped_up == 1
    progressive = Invoice.objects.get(kind="progressive")
    assert progressive.total == Decimal("1.10")
