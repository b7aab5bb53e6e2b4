"""The batch and single-event endpoints answer with `event_result`, a direct build of
`EventResultSerializer`'s output (the schema): the two must never drift apart."""

from decimal import Decimal

import pytest
import time_machine

from billing.api.serializers import EventResultSerializer, event_result
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
