"""Reservations: holds that make an entitlement answer stick."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from billing.models import Reservation
from billing.services.entitlements import check_entitlement, reservation_release
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, free_plan, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


@pytest.fixture
def feature():
    return FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))


def reserve(customer, quantity="1", ttl=None, now=NOW):
    return check_entitlement(customer_external_id=customer.external_id, feature_code="gpt-4o",
                             quantity=Decimal(quantity), reserve=True, reservation_ttl_seconds=ttl, now=now)


def check(customer, quantity="1", now=NOW):
    return check_entitlement(customer_external_id=customer.external_id, feature_code="gpt-4o",
                             quantity=Decimal(quantity), now=now)


def send(customer, event_id, quantity, reservation=None, now=NOW):
    return record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="gpt-4o",
                                         quantity=Decimal(quantity),
                                         reservation_id=str(reservation.pk) if reservation else None), now=now)[0]


def test_held_credits_count_against_every_other_check(feature):
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))

    held = reserve(customer, "7")  # 70 credits
    other = check(customer, "4")  # 40 more would need 110

    assert (held.allowed, held.reason, held.credits_required) == (True, "ok", Decimal("70"))
    assert held.reservation.expires_at == NOW + timedelta(seconds=300)
    assert (other.allowed, other.reason, other.credits_remaining) == (False, "insufficient_credits", Decimal("30"))
    assert check(customer, "3").allowed


def test_an_unreserved_event_cannot_take_held_credits(feature):
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))
    decision = reserve(customer, "7")

    intruder = send(customer, "e1", "4")
    settled = send(customer, "e2", "7", reservation=decision.reservation)

    assert (intruder.status, intruder.reject_reason) == ("rejected", "insufficient_credits")
    assert settled.status == "accepted"
    assert_ledger_consistent()


def test_settling_with_less_releases_the_rest(feature):
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))
    decision = reserve(customer, "8")  # holds 80

    event = send(customer, "e1", "3", reservation=decision.reservation)  # uses 30

    assert (event.status, event.credits) == ("accepted", Decimal("30"))
    assert Reservation.objects.get().status == "settled"
    after = check(customer, "7")
    assert (after.allowed, after.credits_remaining) == (True, Decimal("70"))
    assert_ledger_consistent()


def test_an_expired_hold_returns_its_credits(feature):
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))
    reserve(customer, "10", ttl=60)

    assert not check(customer, "1").allowed
    later = NOW + timedelta(seconds=61)
    assert check(customer, "10", now=later).allowed
    assert send(customer, "e1", "10", now=later).status == "accepted"


def test_a_released_hold_returns_its_credits_and_release_is_idempotent(feature):
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1))
    decision = reserve(customer, "10")

    reservation_release(reservation_id=decision.reservation.pk, now=NOW)
    reservation_release(reservation_id=decision.reservation.pk, now=NOW)

    assert Reservation.objects.get().status == "released"
    assert check(customer, "10").allowed


def test_settling_an_expired_reservation_charges_like_any_event(feature):
    customer = make_customer(pro_plan(included_credits=Decimal("50")), started_at=utc(2026, 5, 1))
    decision = reserve(customer, "5", ttl=10)
    later = NOW + timedelta(seconds=30)

    event = send(customer, "e1", "6", reservation=decision.reservation, now=later)

    assert (event.status, event.credits, event.overage_credits) == ("accepted", Decimal("60"), Decimal("10"))


def test_reserved_overage_counts_against_the_spend_cap(feature):
    # $1 cap at $0.002/credit = 500 overage credits of room.
    customer = make_customer(pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("1.00")),
                             started_at=utc(2026, 5, 1))

    first = reserve(customer, "30")  # 300 overage credits = $0.60
    second = check(customer, "30")  # 300 more would make $1.20

    assert (first.allowed, first.reason, first.overage_credits) == (True, "overage", Decimal("300"))
    assert first.estimated_overage_amount == Decimal("0.60")
    assert (second.allowed, second.reason) == (False, "spend_cap_reached")
    assert check(customer, "20").estimated_overage_amount == Decimal("1.00")
    assert check(customer, "20").allowed  # exactly at the cap is allowed


def test_reservation_api_round_trip(api, feature):
    make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1), external_id="acme")
    with time_machine.travel(NOW, tick=False):
        held = api.post("/api/v1/entitlements/check", {"customer": "acme", "feature": "gpt-4o", "quantity": 2,
                                                       "reserve": True, "reservation_ttl_seconds": 120},
                        format="json").json()
        assert held["allowed"] is True
        assert held["reservation_expires_at"] == "2026-05-10T09:02:00Z"
        released = api.post(f"/api/v1/reservations/{held['reservation_id']}/release").json()
        assert released["status"] == "released"
        event = api.post("/api/v1/events", {"id": "e", "customer": "acme", "feature": "gpt-4o", "quantity": 1,
                                            "reservation_id": held["reservation_id"]}, format="json")
        assert event.status_code == 201  # a released reservation is simply not holding anything
        held2 = api.post("/api/v1/entitlements/check", {"customer": "acme", "feature": "gpt-4o", "reserve": True},
                         format="json").json()
        api.post("/api/v1/events", {"id": "e2", "customer": "acme", "feature": "gpt-4o", "quantity": 1,
                                    "reservation_id": held2["reservation_id"]}, format="json")
        conflict = api.post(f"/api/v1/reservations/{held2['reservation_id']}/release")
        assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "reservation_settled")
