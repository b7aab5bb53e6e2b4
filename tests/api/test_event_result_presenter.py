"""The batch and single-event endpoints answer with `event_result`, a direct build of
`EventResultSerializer`'s output (the schema): the two must never drift apart."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import time_machine
from rest_framework import serializers

from billing.api.serializers import EventResultSerializer, event_result, timestamp_string
from billing.models import UsageEvent
from billing.services.entitlements import check_entitlement
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 12, 30, 15)


@time_machine.travel(NOW, tick=False)
def test_event_result_equals_the_serializer_for_accepted_rejected_and_reserved_events():
    FeatureFactory(code="api")
    make_customer(pro_plan(overage_enabled=False, hard_limit_behaviour="block"), started_at=utc(2026, 5, 1),
                  external_id="acme")
    hold = check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("2"), now=NOW,
                             reserve=True).reservation
    inputs = [
        EventInput(event_id="plain", customer="acme", feature="api", quantity=Decimal("1.5"), timestamp=NOW,
                   properties={"model": "small", "n": 3, "nested": {"a": [1, 2]}}),
        EventInput(event_id="held", customer="acme", feature="api", quantity=Decimal("2"),
                   reservation_id=str(hold.pk)),
        EventInput(event_id="refused", customer="acme", feature="api", quantity=Decimal("20000"),
                   timestamp=utc(2026, 5, 9, 8, 0, 0, 123456)),
    ]
    for item in inputs:
        record_event(event=item, now=NOW)

    events = list(UsageEvent.objects.select_related("customer", "feature").order_by("pk"))
    assert [e.status for e in events] == ["accepted", "accepted", "rejected"]
    for event in events:
        assert event_result(event) == EventResultSerializer(event).data
    assert event_result(events[2])["reason"] == "insufficient_credits"
    assert event_result(events[1])["reservation_id"] == str(hold.pk)


@pytest.mark.parametrize("value", [
    utc(2026, 5, 10, 12, 30, 15), utc(2026, 5, 9, 8, 0, 0, 123456), utc(1999, 12, 31, 23, 59, 59, 1),
    datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris")),
    datetime(2026, 11, 1, 1, 30, 0, 500, tzinfo=ZoneInfo("America/New_York")),
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=45))),
])
def test_timestamp_string_equals_drf_for_any_offset(value):
    assert timestamp_string(value) == serializers.DateTimeField().to_representation(value)


@time_machine.travel(NOW, tick=False)
def test_entitlement_result_equals_the_serializer():
    """The check's answer is built by `entitlement_result`; the serializer is its schema."""
    from billing.api.serializers import EntitlementResultSerializer, entitlement_result
    from billing.services.entitlements import EntitlementDecision

    FeatureFactory(code="api")
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    decisions = [
        check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("2"), now=NOW),
        check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("2.5"), now=NOW,
                          reserve=True),
        check_entitlement(customer_external_id="acme", feature_code="nope", quantity=Decimal("1"), now=NOW),
        EntitlementDecision(allowed=True, reason="overage", credits_required=Decimal("12.500000"),
                            credits_remaining=Decimal("0"), overage_credits=Decimal("12.5"),
                            estimated_overage_amount=Decimal("1234.5"), currency="JPY"),
        EntitlementDecision(allowed=True, reason="overage", credits_required=Decimal("1"),
                            credits_remaining=Decimal("0"), overage_credits=Decimal("1"),
                            estimated_overage_amount=Decimal("0.1"), currency="USD"),
    ]
    assert decisions[1].reservation is not None and decisions[2].currency is None
    for decision in decisions:
        body = {field: getattr(decision, field) for field in (
            "allowed", "reason", "credits_required", "credits_remaining", "overage_credits",
            "estimated_overage_amount", "currency")}
        body["reservation_id"] = decision.reservation.pk if decision.reservation else None
        body["reservation_expires_at"] = decision.reservation.expires_at if decision.reservation else None
        assert entitlement_result(decision) == EntitlementResultSerializer().to_representation(body)


def test_event_result_equals_the_serializer_whatever_amounts_and_instants_repeat():
    """`event_result` keeps the texts of amounts it has seen and of the last `received_at`:
    a batch's events answered one after another, repeating equal amounts written
    differently (1.5 and 1.500000), zero and negative zero, and sharing or not their
    `received_at` object as timestamp, each answer as the serializer's."""
    from billing.models import Customer
    from plans.models import Feature

    customer, feature = Customer(external_id="acme"), Feature(code="api")
    received = utc(2026, 5, 10, 12, 30, 15, 250)
    amounts = [Decimal("1.5"), Decimal("1.500000"), Decimal("0"), Decimal("-0"), Decimal("1E+3"),
               Decimal("1000.000000"), Decimal("0.000001"), Decimal("-2.50")]
    for round_ in range(2):
        for index, amount in enumerate(amounts):
            stamp = received if index % 2 else utc(2026, 5, 9, 8, 0, index)
            event = UsageEvent(customer=customer, feature=feature, event_id=f"e{index}", quantity=amount,
                               credits=amounts[-1 - index], overage_credits=amount, timestamp=stamp,
                               received_at=received if round_ == 0 else utc(2026, 5, 11), properties={"i": index},
                               status="accepted", reject_reason="")
            assert event_result(event) == EventResultSerializer(event).data
