"""Defects found in review of the billing engine, each pinned by what a customer relies on."""

from decimal import Decimal

import pytest
import time_machine
from django.test import override_settings

from billing.errors import BillingError
from billing.models import AutoTopUp, BillingPeriod, CreditGrant, CreditPurchase
from billing.reconciliation import disagreements
from billing.selectors import period_usage
from billing.services.caps import approve_higher_cap, customer_set_spend_cap, effective_overage_cap
from billing.services.invoicing import bill_progressively, close_period, invoice_void, upcoming_invoice
from billing.services.metering import EventInput, record_event
from billing.services.plan_changes import subscription_change_plan
from billing.services.purchases import purchase_pack, run_auto_topup
from billing.services.revenue import recognise_revenue
from plans.models import CreditPack, Plan
from tests.factories import FeatureFactory, PlanFactory, free_plan, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
JUNE, MID_JUNE = utc(2026, 6, 1), utc(2026, 6, 16)


@pytest.fixture(autouse=True)
def feature():
    FeatureFactory(code="api")


def use(customer, quantity, event_id, now):
    with time_machine.travel(now, tick=False):
        return record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api",
                                             quantity=Decimal(quantity), timestamp=now), now=now)[0]


def june(customer):
    return BillingPeriod.objects.get(customer=customer, start=JUNE)


def test_rollover_after_an_upgrade_carries_the_prorated_credits_too_and_revenue_reconciles():
    pro = pro_plan(rollover_policy=Plan.Rollover.ALL)
    PlanFactory(code="scale", name="Scale", base_price=Decimal("199"), included_credits=Decimal("100000"),
                overage_enabled=True, overage_unit_price=Decimal("0.0015"), rollover_policy=Plan.Rollover.ALL)
    customer = make_customer(pro, started_at=JUNE)
    subscription_change_plan(customer=customer, plan_code="scale", now=MID_JUNE)  # +45 000 prorated
    use(customer, "1000", "e1", MID_JUNE)
    now = utc(2026, 7, 2)

    with time_machine.travel(now, tick=False):
        close_period(period_id=june(customer).pk, now=now)
        recognise_revenue(now=now)
        found = disagreements(now=now, customer=customer)

    rolled = CreditGrant.objects.filter(customer=customer, source="rollover")
    assert sum(g.credits for g in rolled) == Decimal("54000")
    assert sum(g.cost for g in rolled) == Decimal("44.10") + Decimal("75")  # 9 000 / 10 000 of $49, all of $75
    assert found == []
    assert_ledger_consistent()


def test_capped_rollover_applies_the_cap_to_the_periods_total_across_upgrade_grants():
    pro = pro_plan(rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=Decimal("20000"))
    PlanFactory(code="scale", name="Scale", base_price=Decimal("199"), included_credits=Decimal("100000"),
                rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=Decimal("20000"))
    customer = make_customer(pro, started_at=JUNE)
    subscription_change_plan(customer=customer, plan_code="scale", now=MID_JUNE)

    close_period(period_id=june(customer).pk, now=utc(2026, 7, 2))

    assert sum(g.credits for g in CreditGrant.objects.filter(customer=customer, source="rollover")) == Decimal(
        "20000")
    assert_ledger_consistent()


def test_a_pack_on_a_plan_with_unbilled_overage_is_not_spent_on_free_usage():
    plan = free_plan(hard_limit_behaviour=Plan.HardLimit.ALLOW_UNBILLED)
    CreditPack.objects.create(code="5k", name="5k", credits=Decimal("5000"), price=Decimal("10"))
    customer = make_customer(plan, started_at=JUNE)
    use(customer, "3000", "e1", MID_JUNE)  # 2 000 unbilled overage, priced at 0

    purchase, _ = purchase_pack(customer=customer, pack_code="5k", idempotency_key="k1", now=MID_JUNE)

    purchase.grant.refresh_from_db()
    assert purchase.grant.remaining == Decimal("5000")


def test_a_progressive_invoice_then_an_upgrade_still_bills_the_price_of_the_whole_period():
    pro = pro_plan(progressive_billing_threshold=Decimal("10"))
    PlanFactory(code="scale", name="Scale", base_price=Decimal("199"), included_credits=Decimal("10000"),
                overage_enabled=True, overage_unit_price=Decimal("0.0015"))
    customer = make_customer(pro, started_at=JUNE)
    use(customer, "20000", "e1", utc(2026, 6, 10))
    first = bill_progressively(period_id=june(customer).pk, now=utc(2026, 6, 10))
    subscription_change_plan(customer=customer, plan_code="scale", now=MID_JUNE)
    use(customer, "10000", "e2", utc(2026, 6, 20))
    now = utc(2026, 7, 2)

    with time_machine.travel(now, tick=False):
        close = close_period(period_id=june(customer).pk, now=now)
        found = disagreements(now=now, customer=customer)

    # 20 000 overage credits at Scale's $0.0015 = $30: $20 already billed, $10 at close.
    assert first.total == Decimal("20.00")
    assert close.lines.get(kind="overage").amount == Decimal("10.00")
    assert found == []


def test_upgrading_through_a_plan_with_fewer_credits_grants_no_extra_allotment():
    basic = PlanFactory(code="basic", name="Basic", base_price=Decimal("10"), included_credits=Decimal("10000"))
    PlanFactory(code="lite", name="Lite", base_price=Decimal("20"), included_credits=Decimal("0"))
    PlanFactory(code="big", name="Big", base_price=Decimal("30"), included_credits=Decimal("20000"))
    customer = make_customer(basic, started_at=JUNE)

    subscription_change_plan(customer=customer, plan_code="lite", now=MID_JUNE)
    subscription_change_plan(customer=customer, plan_code="big", now=MID_JUNE)

    granted = sum(g.credits for g in CreditGrant.objects.filter(customer=customer, source="plan_allocation"))
    assert granted == Decimal("15000")  # as Basic → Big directly: 10 000 + (20 000 − 10 000) × ½


@override_settings(STRIPE_SECRET_KEY="sk_test_x")
def test_a_top_up_awaiting_payment_is_not_bought_again():
    pack = CreditPack.objects.create(code="1k", name="1k", credits=Decimal("1000"), price=Decimal("2"))
    customer = make_customer(free_plan(), started_at=JUNE)
    AutoTopUp.objects.create(customer=customer, enabled=True, pack=pack, threshold=Decimal("200"))
    use(customer, "900", "e1", MID_JUNE)

    for _ in range(5):
        run_auto_topup(customer_id=customer.pk, now=MID_JUNE)

    assert CreditPurchase.objects.filter(customer=customer).count() == 1


def test_an_invoice_billing_a_base_fee_cannot_be_voided():
    customer = make_customer(pro_plan(), started_at=JUNE)
    invoice = close_period(period_id=june(customer).pk, now=utc(2026, 7, 2))

    with pytest.raises(BillingError) as refused:
        invoice_void(invoice=invoice, now=utc(2026, 7, 2))

    assert refused.value.code == "invoice_not_voidable"
    invoice.refresh_from_db()
    assert invoice.status == "issued"


def test_a_customer_can_lower_the_cap_after_an_approval():
    plan = pro_plan(overage_cap=Decimal("10"), cap_behaviour=Plan.CapBehaviour.APPROVAL)
    customer = make_customer(plan, started_at=JUNE)
    with time_machine.travel(MID_JUNE, tick=False):
        approve_higher_cap(customer=customer, cap=Decimal("100"), now=MID_JUNE)
        approved = effective_overage_cap(plan, type(customer).objects.get(pk=customer.pk), june(customer))
        customer_set_spend_cap(customer=customer, spend_cap=Decimal("5"), now=MID_JUNE)

    customer.refresh_from_db()
    assert (approved, effective_overage_cap(plan, customer, june(customer))) == (Decimal("100"), Decimal("5"))


def test_the_usage_estimate_leaves_out_a_waived_band():
    customer = make_customer(pro_plan(progressive_billing_threshold=Decimal("5")), started_at=JUNE)
    use(customer, "15000", "e1", utc(2026, 6, 10))
    invoice_void(invoice=bill_progressively(period_id=june(customer).pk, now=utc(2026, 6, 10)), now=utc(2026, 6, 11))

    with time_machine.travel(utc(2026, 6, 12), tick=False):
        usage = period_usage(customer=customer, now=utc(2026, 6, 12))
        draft = upcoming_invoice(period=june(customer))

    upcoming_overage = sum((line.amount for line in draft.lines if line.kind == "overage"), Decimal("0"))
    assert usage.quote.overage.amount == upcoming_overage == Decimal("0")


def test_periods_close_in_order():
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1))
    period_for_june = period_usage(customer=customer, now=utc(2026, 6, 20)).period  # opens June

    with pytest.raises(BillingError) as refused:
        close_period(period_id=period_for_june.pk, now=utc(2026, 7, 2))

    assert refused.value.code == "period_not_due"
