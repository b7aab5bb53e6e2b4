"""The metering hot path reads rows by hand-written SQL (billing.services.rows). What it
builds must be what the ORM builds, value for value, on SQLite (decimals come back as
floats, datetimes as text, UUIDs as hex) as on PostgreSQL; and the one lookup that runs
against the whole event table must probe its index, not scan it."""

from datetime import datetime
from decimal import Decimal

import pytest
import time_machine
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from billing.models import (
    AlertPreference, BillingPeriod, CreditGrant, Customer, LedgerEntry, Reservation, ReservationHold, Subscription,
    UsageEvent, UsageRollup,
)
from billing.services import rows
from billing.services.entitlements import check_entitlement
from billing.services.ledger import CustomerLedger, draw_keys
from billing.services.metering import (EventInput, _periods_by_customer, _stored_events, _stored_events_query,
                                       record_events)
from plans.models import Feature, FeatureCost, OverageTier, Plan
from tests.factories import FeatureFactory, make_customer, pro_plan, set_cost, set_tiers, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


def _values(obj) -> dict:
    return {name: value for name, value in obj.__dict__.items() if not name.startswith("_")}


@pytest.fixture
def customer():
    feature = FeatureFactory(code="api", default_credits_per_unit=Decimal("1.5"))
    plan = set_tiers(pro_plan(overage_cap=Decimal("12.34")), ("1000", "0.002"), (None, "0.0015"))
    set_cost(plan, feature, "1.25")
    with time_machine.travel(NOW, tick=False):
        customer = make_customer(plan, started_at=utc(2026, 5, 1), external_id="acme")
        settled = check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("2"),
                                    now=NOW, reserve=True)
        record_events(events=[EventInput(event_id="e-settles", customer="acme", feature="api",
                                         quantity=Decimal("2"), properties={"model": "x", "n": 1.5},
                                         reservation_id=str(settled.reservation.pk))], now=NOW)
        check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("3.25"), now=NOW,
                          reserve=True)
        AlertPreference.objects.create(customer=customer, thresholds=[25, 75])
    return customer


@pytest.mark.parametrize("model", [Customer, Subscription, BillingPeriod, CreditGrant, Reservation, ReservationHold,
                                   Plan, OverageTier, Feature, FeatureCost, UsageEvent, UsageRollup, LedgerEntry])
def test_fetch_builds_what_the_orm_builds(customer, model):
    by_orm = sorted(model.objects.all(), key=lambda obj: str(obj.pk))
    by_hand = sorted(rows.fetch(model, "1 = 1", []), key=lambda obj: str(obj.pk))

    assert by_orm, "nothing to compare"
    assert [_values(obj) for obj in by_hand] == [_values(obj) for obj in by_orm]
    assert all(type(value) is type(_values(orm)[name])
               for hand, orm in zip(by_hand, by_orm) for name, value in _values(hand).items())
    assert all(not obj._state.adding and obj._state.db == "default" for obj in by_hand)


def test_fetch_values_converts_sums_and_json_as_the_orm_does(customer):
    total, thresholds = rows.fetch_values(
        "SELECT SUM(g.remaining), p.thresholds FROM billing_creditgrant g JOIN billing_alertpreference p "
        "ON p.customer_id = g.customer_id WHERE g.customer_id = %s GROUP BY p.thresholds",
        [customer.pk], [CreditGrant._meta.get_field("remaining"), AlertPreference._meta.get_field("thresholds")])[0]

    assert total == Decimal("9997.5") and type(total) is Decimal  # 10 000 less the settled event's 2 × 1.25
    assert thresholds == [25, 75]


@time_machine.travel(NOW, tick=False)
def test_periods_come_with_their_plans_tiers_read_from_memory(customer):
    periods = _periods_by_customer([customer.pk], NOW)[customer.pk]

    with CaptureQueriesContext(connection) as queries:
        tiers = [(t.up_to, t.unit_price) for t in periods[0].plan.overage_tiers.all()]
    assert tiers == [(Decimal("1000"), Decimal("0.002")), (None, Decimal("0.0015"))]
    assert len(queries) == 0


@time_machine.travel(NOW, tick=False)
def test_a_ledger_loaded_by_hand_holds_what_the_reservation_holds(customer):
    reservation = Reservation.objects.get(status=Reservation.Status.ACTIVE)
    with transaction.atomic():
        ledger = CustomerLedger.load_many({customer.pk: customer}, {}, now=NOW, since=NOW)[customer.pk]

    assert list(ledger._holds) == [reservation.pk]  # not the reservation the event settled
    grants, overage, period_id, expires_at = ledger._holds[reservation.pk]
    assert grants == {CreditGrant.objects.get().pk: Decimal("4.0625")} and overage == Decimal("0")  # 3.25 × 1.25
    assert (period_id, expires_at) == (reservation.period_id, reservation.expires_at)


@pytest.mark.postgres
def test_keys_for_several_tables_ascend_per_table():
    with transaction.atomic():
        events, entries = draw_keys([(UsageEvent, 5), (LedgerEntry, 3)])
        none, more = draw_keys([(UsageEvent, 0), (UsageEvent, 2)])

    assert len(events) == 5 and events == sorted(events) and len(set(events)) == 5
    assert len(entries) == 3 and entries == sorted(entries)
    assert none == [] and more[0] > events[-1]


@time_machine.travel(NOW, tick=False)
def test_flushes_add_to_the_same_rollup_exactly(customer):
    """Two transactions landing on one (period, feature, day): the second adds to the
    first's totals (PostgreSQL: the upsert's conflict path, summed in numeric)."""
    for index, quantity in enumerate(["0.000001", "2.999999"]):
        record_events(events=[EventInput(event_id=f"r{index}", customer="acme", feature="api",
                                         quantity=Decimal(quantity))], now=NOW)

    rollup = UsageRollup.objects.get()
    assert (rollup.events, rollup.quantity, rollup.credits) == (3, Decimal("5.000000"), Decimal("6.250000"))
    # 2 (settled event) + 0.000001 + 2.999999 units; × 1.25 credits: 2.5 + 0.00000125 → 0.000001, 3.74999875 → 3.749999
    assert rollup.credits == sum(UsageEvent.objects.values_list("credits", flat=True))


@pytest.mark.postgres
@time_machine.travel(NOW, tick=False)
def test_looking_up_stored_event_ids_probes_the_index_whatever_the_table_size(customer):
    """A plain join of the keys to the event table made PostgreSQL hash the whole table
    (22 ms at 44 000 events, growing with every event ingested)."""
    record_events(events=[EventInput(event_id=f"e{i}", customer="acme", feature="api", quantity=Decimal("1"))
                          for i in range(1000)], now=NOW)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE billing_usageevent")
    keys = [(customer.pk, f"new-{i}") for i in range(1000)] + [(customer.pk, "e7")]

    with CaptureQueriesContext(connection) as queries:
        found = _stored_events([pk for pk, in rows.fetch_values(*_stored_events_query(keys), [None])])
    assert [event_id for _, event_id in found] == ["e7"]

    lookup = next(q["sql"] for q in queries if "jsonb_array_elements" in q["sql"])
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + lookup)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Seq Scan on billing_usageevent" not in plan and "unique_event_id_per_customer" in plan


ODD_ID = 'q"u\\o\'te,{ü}\t☃ 1'  # the characters that JSON, arrays and SQL literals escape


@time_machine.travel(NOW, tick=False)
def test_stored_events_are_found_by_customer_and_id_on_every_database(customer):
    """The same event id under another customer is another event."""
    other = make_customer(Plan.objects.get(), started_at=utc(2026, 5, 1), external_id="other")
    record_events(events=[EventInput(event_id=f"e{i}", customer="acme", feature="api", quantity=Decimal("1"))
                          for i in range(3)] + [EventInput(event_id="x", customer="other", feature="api",
                                                           quantity=Decimal("1")),
                                                EventInput(event_id=ODD_ID, customer="other", feature="api",
                                                           quantity=Decimal("1"))], now=NOW)
    keys = [(customer.pk, "e1"), (customer.pk, "x"), (other.pk, "x"), (other.pk, "e1"), (customer.pk, "nope"),
            (other.pk, ODD_ID), (customer.pk, ODD_ID), (other.pk, ODD_ID[:-1])]

    found = _stored_events([pk for pk, in rows.fetch_values(*_stored_events_query(keys), [None])])

    assert sorted(found) == sorted([(customer.pk, "e1"), (other.pk, "x"), (other.pk, ODD_ID)])
    assert found[(other.pk, "x")].customer == other



def test_reads_sent_together_answer_as_each_alone(customer):
    """`rows.Together` (PostgreSQL: one round trip in pipeline mode) gives every read what
    it gives run alone, models and converted values, and calls `then` once all are in."""
    reads = rows.Together()
    grants = reads.fetch(CreditGrant, "customer_id = %s", [customer.pk], order_by="id")
    sums = reads.values("SELECT SUM(remaining) FROM billing_creditgrant WHERE customer_id = %s", [customer.pk],
                        [CreditGrant._meta.get_field("remaining")])
    seen = []
    events = reads.fetch(UsageEvent, "customer_id = %s", [customer.pk],
                         then=lambda found: seen.append((len(grants), len(sums), len(found))))
    assert (grants, sums, events, seen) == ([], [], [], [])

    reads.run()

    assert [_values(g) for g in grants] == [_values(g) for g in rows.fetch(CreditGrant, "customer_id = %s",
                                                                           [customer.pk], order_by="id")]
    assert sums == [(Decimal("9997.5"),)] and type(sums[0][0]) is Decimal
    assert [e.event_id for e in events] == ["e-settles"]
    assert seen == [(1, 1, 1)]


@pytest.mark.postgres
def test_a_failing_read_among_reads_sent_together_fails_the_transaction_cleanly(customer):
    """An error in any read of a pipeline surfaces as Django's database error, inside the
    caller's transaction, which rolls back; the connection serves the next request."""
    from django.db import DatabaseError

    with pytest.raises(DatabaseError):
        with transaction.atomic():
            reads = rows.Together()
            locked = reads.fetch(Customer, "id = %s", [customer.pk], for_update=True)
            reads.values("SELECT 1 / 0", [], [None])
            reads.run()
    assert locked == []
    assert connection.is_usable()
    assert [c.external_id for c in rows.fetch(Customer, "id = %s", [customer.pk])] == ["acme"]


@pytest.mark.postgres
@time_machine.travel(NOW, tick=False)
def test_a_batch_uses_the_keys_drawn_before_its_transaction_and_draws_what_it_lacks(customer):
    """Keys are drawn with the customer lookup, before the locks: one per event and one
    entry each. An event that draws from two grants needs one more, drawn under the
    lock after the others, so each table's keys still ascend in the batch's order."""
    # 9 997.5 credits left, 4.0625 of them held by the open reservation: 7 994.75 units at 1.25.
    results = record_events(events=[EventInput(event_id=f"k{i}", customer="acme", feature="api", quantity=quantity)
                                    for i, quantity in enumerate([Decimal("7000"), Decimal("1000"), Decimal("1")])],
                            now=NOW)

    events = [r.event for r in results]
    entries = list(LedgerEntry.objects.filter(event__in=events).order_by("id"))
    assert [e.pk for e in events] == sorted(e.pk for e in events)
    # The second event crosses into overage: a consume entry and an overage entry.
    assert [(e.event_id, e.kind, e.credits) for e in entries] == [
        (events[0].pk, "consume", Decimal("-8750.000000")), (events[1].pk, "consume", Decimal("-1243.437500")),
        (events[1].pk, "overage", Decimal("-6.562500")), (events[2].pk, "overage", Decimal("-1.250000"))]


def test_instants_read_by_hand_are_the_orms_to_the_zone(customer):
    """On PostgreSQL `rows` reads timestamptz with psycopg's C loader, not Django's: the
    same datetimes as the ORM's, microseconds and zone object (`timezone.utc`) included."""
    from datetime import timezone

    record_events(events=[EventInput(event_id="late", customer="acme", feature="api", quantity=Decimal("1"),
                                     timestamp=utc(2026, 5, 10, 8, 59, 59).replace(microsecond=654321))],
                  now=NOW)
    for model in (Customer, BillingPeriod, CreditGrant, UsageEvent):
        by_hand = rows.fetch(model, "customer_id = %s" if model is not Customer else "id = %s", [customer.pk],
                             order_by="id")
        by_orm = list((model.objects.filter(pk=customer.pk) if model is Customer
                       else model.objects.filter(customer=customer)).order_by("id"))
        assert [_values(obj) for obj in by_hand] == [_values(obj) for obj in by_orm] != []
        instants = [(value, value.tzinfo) for obj in by_hand for value in _values(obj).values()
                    if isinstance(value, datetime)]
        assert instants == [(value, value.tzinfo) for obj in by_orm for value in _values(obj).values()
                            if isinstance(value, datetime)]
        assert instants and all(zone is timezone.utc for _, zone in instants)
    assert utc(2026, 5, 10, 8, 59, 59).replace(microsecond=654321) in [
        e.timestamp for e in rows.fetch(UsageEvent, "event_id = %s", ["late"])]
