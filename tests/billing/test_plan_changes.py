"""Plan changes mid-period: upgrades now and prorated, downgrades at period end, no
second allotment, other credits untouched."""

from decimal import Decimal

import pytest

from billing.models import BillingPeriod, CreditGrant, Invoice
from billing.services.invoicing import close_period
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from billing.services.plan_changes import subscription_change_plan
from billing.services.purchases import purchase_pack
from plans.models import CreditPack
from tests.factories import FeatureFactory, PlanFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
JUNE = utc(2026, 6, 1)  # a 30-day period
MID_JUNE = utc(2026, 6, 16)  # exactly half of it left


@pytest.fixture
def plans():
    FeatureFactory(code="api")
    return {
        "pro": pro_plan(),
        "scale": PlanFactory(code="scale", name="Scale", base_price=Decimal("199"), included_credits=Decimal("100000"),
                             overage_enabled=True, overage_unit_price=Decimal("0.0015")),
        "free": PlanFactory(code="free", name="Free", included_credits=Decimal("1000")),
    }


def june(customer):
    return BillingPeriod.objects.get(customer=customer, start=JUNE)


def change(customer, code, now=MID_JUNE):
    return subscription_change_plan(customer=customer, plan_code=code, now=now)


def test_an_upgrade_takes_effect_now_with_prorated_fee_and_credits(plans):
    customer = make_customer(plans["pro"], started_at=JUNE)

    subscription = change(customer, "scale")

    assert (subscription.plan.code, subscription.pending_plan) == ("scale", None)
    invoice = Invoice.objects.get(kind="plan_change")
    assert [(l.kind, l.amount, l.service_start, l.service_end) for l in invoice.lines.all()] == [
        ("proration", Decimal("75.00"), MID_JUNE, utc(2026, 7, 1))]  # (199 − 49) × ½
    extra = CreditGrant.objects.get(idempotency_key__startswith="upgrade:")
    assert (extra.credits, extra.expires_at, extra.cost) == (Decimal("45000"), utc(2026, 7, 1), Decimal("75.00"))
    period = june(customer)
    assert (period.plan.code, period.included_credits) == ("scale", Decimal("55000"))
    assert_ledger_consistent()


def test_after_an_upgrade_the_periods_overage_is_priced_by_the_new_plan_and_the_next_fee_is_the_new_one(plans):
    customer = make_customer(plans["pro"], started_at=JUNE)
    change(customer, "scale")
    record_event(event=EventInput(event_id="e", customer=customer.external_id, feature="api",
                                  quantity=Decimal("65000"), timestamp=utc(2026, 6, 20)), now=utc(2026, 6, 20))

    invoice = close_period(period_id=june(customer).pk, now=utc(2026, 7, 1, 2))

    # 55 000 included (10 000 + 45 000 prorated): 10 000 overage at $0.0015 = $15, plus July's $199.
    assert [(l.kind, l.amount) for l in invoice.lines.all()] == [("overage", Decimal("15.00")),
                                                                 ("base_fee", Decimal("199.00"))]


def test_a_downgrade_waits_for_the_next_period(plans):
    customer = make_customer(plans["pro"], started_at=JUNE)

    subscription = change(customer, "free")

    assert (subscription.plan.code, subscription.pending_plan.code) == ("pro", "free")
    assert june(customer).included_credits == Decimal("10000")
    assert not Invoice.objects.filter(kind="plan_change").exists()
    invoice = close_period(period_id=june(customer).pk, now=utc(2026, 7, 1, 2))
    july = BillingPeriod.objects.get(customer=customer, start=utc(2026, 7, 1))
    assert (july.plan.code, july.included_credits, invoice.total) == ("free", Decimal("1000"), Decimal("0.00"))


def test_downgrade_then_re_upgrade_in_one_period_grants_no_second_allotment(plans):
    customer = make_customer(plans["pro"], started_at=JUNE)

    change(customer, "free", now=utc(2026, 6, 5))
    change(customer, "pro", now=utc(2026, 6, 10))  # back to the plan in force: cancels the downgrade

    subscription = customer.subscriptions.get()
    assert (subscription.plan.code, subscription.pending_plan) == ("pro", None)
    assert CreditGrant.objects.filter(customer=customer, source="plan_allocation").count() == 1
    assert not Invoice.objects.filter(kind="plan_change").exists()


def test_up_down_up_grants_the_upgrade_difference_once(plans):
    customer = make_customer(plans["pro"], started_at=JUNE)

    change(customer, "scale", now=MID_JUNE)
    change(customer, "pro", now=utc(2026, 6, 20))  # a downgrade: scheduled, June stays on Scale
    change(customer, "scale", now=utc(2026, 6, 25))  # Scale is in force: cancels it

    assert june(customer).included_credits == Decimal("55000")
    assert CreditGrant.objects.filter(customer=customer, source="plan_allocation").count() == 2
    assert Invoice.objects.filter(kind="plan_change").count() == 1
    assert customer.subscriptions.get().pending_plan is None


def test_rolled_over_promotional_and_purchased_credits_survive_plan_changes(plans):
    CreditPack.objects.create(code="5k", name="5k", credits=Decimal("5000"), price=Decimal("10"))
    customer = make_customer(plans["pro"], started_at=JUNE)
    purchase_pack(customer=customer, pack_code="5k", idempotency_key="p", now=utc(2026, 6, 2))
    grant_credits_once(customer=customer, idempotency_key="promo", credits=Decimal("300"), source="promotional",
                       now=utc(2026, 6, 2))

    change(customer, "scale")
    change(customer, "free", now=utc(2026, 6, 20))
    close_period(period_id=june(customer).pk, now=utc(2026, 7, 1, 2))

    remaining = dict(CreditGrant.objects.filter(customer=customer, source__in=["purchase", "promotional"])
                     .values_list("source", "remaining"))
    assert remaining == {"purchase": Decimal("5000"), "promotional": Decimal("300")}
    assert_ledger_consistent()


def test_changing_currency_or_interval_is_refused(plans):
    from billing.errors import BillingError

    PlanFactory(code="eur", name="EUR", currency="EUR", base_price=Decimal("99"))
    PlanFactory(code="yearly", name="Yearly", interval="year", base_price=Decimal("490"))
    customer = make_customer(plans["pro"], started_at=JUNE)

    for code, error in (("eur", "currency_mismatch"), ("yearly", "interval_change_unsupported")):
        with pytest.raises(BillingError) as refused:
            change(customer, code)
        assert refused.value.code == error
