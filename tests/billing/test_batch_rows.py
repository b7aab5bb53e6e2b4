"""What a batch writes, row by row: on PostgreSQL events and ledger entries go in by
COPY with keys drawn from their sequences (billing.services.ledger.bulk_insert), on
SQLite by bulk_create; both must store the same rows, linked the same way."""

from decimal import Decimal

import pytest
from django.db import connection, transaction
import time_machine

from billing.models import LedgerEntry, UsageEvent
from billing.services.metering import EventInput, record_events
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


@time_machine.travel(NOW, tick=False)
def test_a_batch_stores_every_field_and_links_entries_to_their_events():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    properties = {"model": "gpt-4o", "note": "naïve \u2603 'quoted' \\ back\tslash", "n": [1, 2.5, None]}
    events = [EventInput(event_id=f"e{i}", customer="acme", feature="gpt-4o", quantity=Decimal("333.5"),
                         timestamp=utc(2026, 5, 10, 8, i), properties=properties) for i in range(4)]
    results = record_events(events=events, now=NOW)

    # 4 × 3 335 credits against 10 000 included: the third draws the last 3 330 and overflows 5.
    stored = list(UsageEvent.objects.order_by("id"))
    assert [e.event_id for e in stored] == ["e0", "e1", "e2", "e3"]
    assert [r.event.pk for r in results] == [e.pk for e in stored]
    assert stored[0].properties == properties and stored[0].quantity == Decimal("333.5")
    assert [e.credits for e in stored] == [Decimal("3335")] * 4
    assert [e.overage_credits for e in stored] == [0, 0, Decimal("5"), Decimal("3335")]
    assert stored[3].timestamp == utc(2026, 5, 10, 8, 3) and stored[3].received_at == NOW

    entries = list(LedgerEntry.objects.filter(event__isnull=False).order_by("id"))
    assert [(e.event.event_id, e.kind, e.credits) for e in entries] == [
        ("e0", "consume", Decimal("-3335")), ("e1", "consume", Decimal("-3335")),
        ("e2", "consume", Decimal("-3330")), ("e2", "overage", Decimal("-5")), ("e3", "overage", Decimal("-3335")),
    ]
    assert all(e.created_at == NOW and e.feature.code == "gpt-4o" and e.customer.external_id == "acme"
               for e in entries)
    assert entries[-1].grant_id is None and entries[0].grant_id is not None and entries[2].grant_id == entries[0].grant_id

    # The keys came from the sequences: an ordinary insert after the batch gets the next one.
    after = record_events(events=[EventInput(event_id="later", customer="acme", feature="gpt-4o",
                                             quantity=Decimal("1"), timestamp=NOW)], now=NOW)[0].event
    assert after.pk > stored[-1].pk
    assert UsageEvent.objects.get(pk=after.pk).event_id == "later"


def _as_built(obj) -> tuple:
    attributes = {name: value for name, value in obj.__dict__.items() if name != "_state"}
    return type(obj), attributes, dict(obj._state.fields_cache), obj._state.adding, obj._state.db


@time_machine.travel(NOW, tick=False)
def test_new_row_builds_what_the_model_constructor_builds():
    """The batch builds events and entries with `new_row`; a new field, default or
    relation on either model must not make them differ from `Model(**values)`."""
    from billing.services.ledger import new_row

    feature = FeatureFactory(code="gpt-4o")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    period = customer.periods.get()
    grant = period.grants.get()
    event_values = dict(customer=customer, event_id="e1", feature=feature, quantity=Decimal("2"), credits=Decimal("20"),
                        overage_credits=Decimal("0"), timestamp=NOW, received_at=NOW, properties={"a": 1},
                        period=period, reservation=None, fingerprint="f" * 64, status=UsageEvent.Status.ACCEPTED,
                        reject_reason="")
    event = UsageEvent(**event_values)
    assert _as_built(new_row(UsageEvent, **event_values)) == _as_built(event)
    for values in (
        dict(customer=customer, kind=LedgerEntry.Kind.CONSUME, credits=Decimal("-20"), grant=grant, period=period,
             event=event, feature=feature, effective_at=NOW),
        dict(customer=customer, kind=LedgerEntry.Kind.OVERAGE, credits=Decimal("-5"), period=period, event=event,
             feature=feature, effective_at=NOW),
        dict(customer=customer, kind=LedgerEntry.Kind.GRANT, credits=Decimal("5")),
    ):
        assert _as_built(new_row(LedgerEntry, **values)) == _as_built(LedgerEntry(**values))
    # Defaults built per object, never shared (UsageEvent.properties defaults to a new dict).
    first, second = (new_row(UsageEvent, event_id=f"x{i}") for i in range(2))
    assert first.properties == {} and first.properties is not second.properties
    with pytest.raises(TypeError):
        new_row(LedgerEntry, credit=Decimal("1"))


@time_machine.travel(NOW, tick=False)
def test_rows_written_from_tuples_keep_every_instant_and_amount_exactly():
    """`insert_rows` (COPY on PostgreSQL, where instants go as ISO text) stores the
    instants it is given to the microsecond, whatever their offset, and exact decimals."""
    from datetime import datetime, timedelta, timezone

    from billing.services.ledger import _USAGE_ENTRY_FIELDS, insert_rows

    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    period = customer.periods.get()
    grant = period.grants.get()
    instants = [utc(2026, 5, 10, 8, 59, 59).replace(microsecond=123456), utc(2026, 5, 10, 9),
                datetime(2026, 5, 10, 11, 30, 0, 1, tzinfo=timezone(timedelta(hours=2, minutes=30)))]
    credits = [Decimal("-0.000001"), Decimal("-1E+3"), Decimal("-123456789.123456")]
    before = LedgerEntry.objects.count()
    with transaction.atomic():
        insert_rows(LedgerEntry, _USAGE_ENTRY_FIELDS, [
            (customer.pk, LedgerEntry.Kind.CONSUME, amount, grant.pk, period.pk, None, None, at, instants[2], "")
            for amount, at in zip(credits, instants)])
    written = list(LedgerEntry.objects.order_by("id")[before:])
    assert [e.effective_at for e in written] == instants
    # COPY writes the instant given; SQLite's bulk_create stamps auto_now_add itself.
    assert [e.created_at for e in written] == [instants[2] if connection.vendor == "postgresql" else NOW] * 3
    assert [e.credits for e in written] == credits
    assert [e.event_id for e in written] == [None] * 3 and {e.grant_id for e in written} == {grant.pk}
