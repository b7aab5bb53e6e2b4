"""Races on real PostgreSQL row locks: no lost debit, no negative grant, no double count."""

from decimal import Decimal

import pytest
import time_machine
from django.db.models import Sum

from billing.models import CreditGrant, LedgerEntry, Reservation, UsageEvent
from billing.services.entitlements import check_entitlement
from billing.services.metering import EventInput, record_event
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, free_plan, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
NOW = utc(2026, 5, 10, 9)


def send(customer_id, event_id, quantity, feature="gpt-4o"):
    return record_event(event=EventInput(event_id=event_id, customer=customer_id, feature=feature,
                                         quantity=Decimal(quantity), timestamp=NOW), now=NOW)


@time_machine.travel(NOW, tick=False)
def test_50_concurrent_reservations_on_a_balance_that_fits_10_grant_exactly_10():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))

    decisions = run_concurrently(
        lambda: check_entitlement(customer_external_id=customer.external_id, feature_code="gpt-4o",
                                  quantity=Decimal("1"), reserve=True, now=NOW),
        [()] * 50,
    )

    assert not [d for d in decisions if isinstance(d, Exception)]
    assert sum(d.allowed for d in decisions) == 10
    assert {d.reason for d in decisions if not d.allowed} == {"insufficient_credits"}
    assert Reservation.objects.count() == 10


@time_machine.travel(NOW, tick=False)
def test_the_same_event_sent_concurrently_is_counted_once():
    FeatureFactory(code="gpt-4o")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1))

    outcomes = run_concurrently(send, [(customer.external_id, "same-id", "7")] * 16)

    assert not [o for o in outcomes if isinstance(o, Exception)]
    assert sum(created for _, created in outcomes) == 1
    assert len({event.pk for event, _ in outcomes}) == 1
    assert UsageEvent.objects.count() == 1
    assert LedgerEntry.objects.filter(kind="consume").aggregate(total=Sum("credits"))["total"] == Decimal("-7")


@time_machine.travel(NOW, tick=False)
def test_40_threads_consuming_from_one_customer_lose_no_debit_and_drive_no_grant_negative():
    FeatureFactory(code="gpt-4o")
    customer = make_customer(pro_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))
    from billing.services.ledger import grant_credits_once

    for key, credits, source in (("promo", "300", "promotional"), ("manual", "500", "manual_adjustment")):
        grant_credits_once(customer=customer, idempotency_key=key, credits=Decimal(credits), source=source, now=NOW)
    calls = [(customer.external_id, f"t{thread}-e{n}", str(1 + (thread + n) % 9)) for thread in range(40)
             for n in range(5)]

    outcomes = run_concurrently(lambda *batch: [send(*c) for c in batch],
                                [tuple(calls[i::40]) for i in range(40)])

    assert not [o for o in outcomes if isinstance(o, Exception)]
    total = sum(Decimal(q) for _, _, q in calls)
    assert total == Decimal("990")  # 900 available: the grants run dry mid-race, the rest is overage
    assert UsageEvent.objects.filter(status="accepted").count() == 200
    assert -LedgerEntry.objects.filter(kind__in=["consume", "overage"]).aggregate(t=Sum("credits"))["t"] == total
    assert not CreditGrant.objects.filter(remaining__lt=0).exists()
    assert CreditGrant.objects.aggregate(t=Sum("remaining"))["t"] == Decimal("0")
    period = customer.periods.get()
    assert period.credits_used == total
    assert period.overage_credits == Decimal("90")
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_racing_for_the_last_credits_on_a_hard_limit_accepts_exactly_what_fits():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    customer = make_customer(free_plan(included_credits=Decimal("250")), started_at=utc(2026, 5, 1))

    outcomes = run_concurrently(send, [(customer.external_id, f"e{i}", "1") for i in range(40)])

    events = [event for event, _ in outcomes]
    assert sum(e.status == "accepted" for e in events) == 25
    assert {e.reject_reason for e in events if e.status == "rejected"} == {"insufficient_credits"}
    assert CreditGrant.objects.get().remaining == Decimal("0")
    assert_ledger_consistent()
