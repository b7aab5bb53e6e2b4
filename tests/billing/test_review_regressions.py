"""Defects found in review of the credit core, each pinned by the behaviour a user relies on."""

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.errors import BillingError
from billing.models import BillingPeriod, Reservation, UsageEvent
from billing.selectors import period_usage
from billing.services.customers import customer_create
from billing.services.plan_changes import subscription_change_plan
from billing.services.entitlements import check_entitlement
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, PlanFactory, free_plan, make_customer, payg_plan, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


def test_a_reservation_never_outlives_the_grant_it_holds():
    FeatureFactory(code="f")
    customer = make_customer(payg_plan(), started_at=utc(2026, 5, 1), now=NOW)
    grant_credits_once(customer=customer, idempotency_key="promo", credits=Decimal("100"), source="promotional",
                       now=NOW, expires_at=NOW + timedelta(seconds=30))

    held = check_entitlement(customer_external_id=customer.external_id, feature_code="f", quantity=Decimal("50"),
                             reserve=True, now=NOW)

    assert (held.allowed, held.reason) == (True, "ok")
    assert held.reservation.expires_at == NOW + timedelta(seconds=30)  # not the default 300 s
    later = NOW + timedelta(seconds=60)
    assert period_usage(customer=customer, now=later).credits_remaining == Decimal("0")


def test_a_reservation_ends_with_its_period():
    FeatureFactory(code="f")
    customer = make_customer(free_plan(), started_at=utc(2026, 5, 1), now=NOW)
    late = utc(2026, 5, 31, 23, 58)

    held = check_entitlement(customer_external_id=customer.external_id, feature_code="f", quantity=Decimal("1"),
                             reserve=True, now=late)

    assert held.reservation.expires_at == utc(2026, 6, 1)


def test_an_event_stamped_in_a_period_that_has_not_started_is_refused_and_a_later_plan_change_still_applies():
    FeatureFactory(code="f")
    free_plan()
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), now=utc(2026, 5, 1))

    with pytest.raises(BillingError) as refused:  # within the clock-skew allowance, but June has not begun
        record_event(event=EventInput(event_id="e1", customer=customer.external_id, feature="f",
                                      quantity=Decimal("1"), timestamp=utc(2026, 6, 1, 0, 1)),
                     now=utc(2026, 5, 31, 23, 58))
    subscription_change_plan(customer=customer, plan_code="free", now=utc(2026, 5, 31, 23, 59))
    june = period_usage(customer=customer, now=utc(2026, 6, 1, 0, 5)).period

    assert refused.value.code == "timestamp_in_future"
    assert (june.start, june.plan.code, june.included_credits) == (utc(2026, 6, 1), "free", Decimal("1000"))


def test_an_event_for_another_feature_cannot_settle_a_reservation():
    FeatureFactory(code="a")
    FeatureFactory(code="b")
    customer = make_customer(free_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1), now=NOW)
    held = check_entitlement(customer_external_id=customer.external_id, feature_code="a", quantity=Decimal("90"),
                             reserve=True, now=NOW)
    with pytest.raises(BillingError) as refused:
        record_event(event=EventInput(event_id="b1", customer=customer.external_id, feature="b", quantity=Decimal("1"),
                                      reservation_id=str(held.reservation.pk)), now=NOW)

    assert refused.value.code == "reservation_mismatch"
    assert Reservation.objects.get().status == "active"
    assert UsageEvent.objects.count() == 0


def test_a_zero_spend_cap_admits_no_overage_at_all():
    FeatureFactory(code="f")
    customer = make_customer(pro_plan(included_credits=Decimal("0"), overage_cap=Decimal("0")),
                             started_at=utc(2026, 5, 1), now=NOW)

    decision = check_entitlement(customer_external_id=customer.external_id, feature_code="f", quantity=Decimal("2"),
                                 now=NOW)  # 2 × $0.002 = $0.004, which rounds to $0.00

    assert (decision.allowed, decision.reason) == (False, "spend_cap_reached")


def test_usage_of_an_old_period_works_even_if_nothing_opened_it_since():
    customer = make_customer(free_plan(), started_at=utc(2026, 1, 1), now=utc(2026, 1, 1))

    usage = period_usage(customer=customer, now=utc(2026, 4, 15), at=utc(2026, 2, 10))

    assert (usage.period.start, usage.period.end) == (utc(2026, 2, 1), utc(2026, 3, 1))
    assert BillingPeriod.objects.filter(customer=customer).count() == 4
    assert_ledger_consistent()


def test_a_backdated_customer_gets_only_a_bounded_number_of_periods():
    pro_plan()

    with pytest.raises(BillingError) as refused:
        customer_create(external_id="old", name="Old", plan_code="pro", started_at=utc(1900, 1, 1), now=NOW)

    assert (refused.value.code, refused.value.field) == ("invalid", "started_at")
    assert BillingPeriod.objects.count() == 0


def test_a_plan_priced_in_yen_shows_no_minor_units(api):
    PlanFactory(code="jp", currency="JPY", base_price=Decimal("4900"), overage_enabled=True,
                overage_unit_price=Decimal("0.5"), overage_cap=Decimal("10000"))

    body = api.get("/api/v1/plans/jp").json()

    assert (body["base_price"], body["overage_cap"], body["overage_unit_price"]) == ("4900", "10000", "0.50")
