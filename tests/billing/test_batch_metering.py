"""A batch is decided event by event, in order, as if sent one at a time."""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import UsageEvent
from billing.services.entitlements import check_entitlement
from billing.services.metering import EventInput, record_event, record_events
from tests.factories import FeatureFactory, free_plan, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


def ev(event_id, quantity, customer="acme", **extra):
    return EventInput(event_id=event_id, customer=customer, feature="gpt-4o", quantity=Decimal(quantity), **extra)


@pytest.fixture(autouse=True)
def gpt():
    return FeatureFactory(code="gpt-4o")


def test_events_in_a_batch_see_the_ones_before_them():
    make_customer(free_plan(included_credits=Decimal("10")), started_at=utc(2026, 5, 1), external_id="acme")

    results = record_events(events=[ev("a", "6"), ev("b", "5"), ev("c", "4")], now=NOW)

    assert [(r.event.status, r.event.reject_reason) for r in results] == [
        ("accepted", ""), ("rejected", "insufficient_credits"), ("accepted", "")]
    assert_ledger_consistent()


def test_a_repeat_inside_one_batch_is_a_duplicate_and_a_changed_body_a_conflict():
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")

    results = record_events(events=[ev("a", "6"), ev("a", "6"), ev("a", "7")], now=NOW)

    assert (results[0].created, results[1].created) == (True, False)
    assert results[1].event is results[0].event
    assert results[2].error.code == "idempotency_conflict"
    assert UsageEvent.objects.count() == 1
    assert UsageEvent.objects.get().credits == Decimal("6")


def test_a_batch_for_several_customers_records_each_and_names_the_unknown_one():
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")

    results = record_events(events=[ev("a", "1"), ev("a", "2", customer="globex"), ev("x", "1", customer="nobody"),
                                    ev("b", "3")], now=NOW)

    assert [r.event.customer.external_id if r.event else r.error.code for r in results] == [
        "acme", "globex", "customer_not_found", "acme"]
    assert dict(UsageEvent.objects.values_list("customer__external_id", "credits").order_by("credits")) == {
        "globex": Decimal("2"), "acme": Decimal("3")}  # acme's last event (3) wins the dict; both are stored
    assert UsageEvent.objects.filter(customer__external_id="acme").count() == 2
    assert_ledger_consistent()


def test_a_reservation_is_settled_once_and_a_second_event_carrying_it_is_refused():
    make_customer(free_plan(included_credits=Decimal("10")), started_at=utc(2026, 5, 1), external_id="acme")
    held = check_entitlement(customer_external_id="acme", feature_code="gpt-4o", quantity=Decimal("8"),
                             reserve=True, now=NOW)
    reservation_id = str(held.reservation.pk)

    results = record_events(events=[ev("a", "8", reservation_id=reservation_id),
                                    ev("b", "8", reservation_id=reservation_id)], now=NOW)

    assert results[0].event.status == "accepted"
    assert (results[1].error.status, results[1].error.code) == (409, "reservation_settled")
    assert UsageEvent.objects.count() == 1
    assert_ledger_consistent()


def test_a_full_batch_for_one_customer_costs_a_bounded_number_of_statements():
    make_customer(pro_plan(included_credits=Decimal("500")), started_at=utc(2026, 5, 1), external_id="acme")
    record_event(event=ev("warm", "1"), now=NOW)  # periods open, rollup exists

    with CaptureQueriesContext(connection) as queries:
        results = record_events(events=[ev(f"e{i}", "1") for i in range(1000)], now=NOW)

    assert all(r.created for r in results)
    # Not one statement per event: a few dozen in all (SQLite splits bulk inserts into
    # chunks by its variable limit; PostgreSQL needs about 20).
    assert len(queries) < 100, [q["sql"][:80] for q in queries]
    assert_ledger_consistent()


def test_a_batch_that_opens_the_next_period_pays_from_its_included_credits():
    """The period an event falls in may be opened by the batch itself (no close ran yet):
    its included credits are granted then and must pay, not overage."""
    plan = pro_plan()
    make_customer(plan, started_at=utc(2026, 5, 1), external_id="acme")
    june = utc(2026, 6, 1, 0, 30)  # May's late events are still taken (grace)
    # May's allowance is all used: what follows is overage in May.
    results = record_events(events=[ev("may", str(plan.included_credits), timestamp=utc(2026, 5, 20)),
                                    ev("may-over", "3", timestamp=utc(2026, 5, 21)),
                                    ev("june", "7", timestamp=utc(2026, 6, 1, 0, 10))], now=june)

    may_over, in_june = results[1].event, results[2].event
    assert (may_over.overage_credits, may_over.period.start) == (Decimal("3.000000"), utc(2026, 5, 1))
    assert (in_june.status, in_june.overage_credits, in_june.period.start) == ("accepted", Decimal("0"),
                                                                               utc(2026, 6, 1))
    assert in_june.period.credits_used == Decimal("7.000000")
    assert_ledger_consistent()
