"""Closing a period: one invoice, exact money, included credits rolled over or expired,
the next period allocated."""

from decimal import Decimal

import pytest
import time_machine

from billing.errors import BillingError
from billing.models import BillingPeriod, CreditGrant, Invoice, LedgerEntry
from billing.services.invoicing import close_due_periods, close_period, upcoming_invoice
from billing.services.metering import EventInput, record_event
from plans.models import Plan
from tests.factories import (
    FeatureFactory, free_plan, make_customer, payg_plan, pro_plan, set_tiers, utc,
)
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY = utc(2026, 5, 1)
JUNE = utc(2026, 6, 1)
AFTER_GRACE = utc(2026, 6, 1, 1, 0)  # one hour after May ends


@pytest.fixture(autouse=True)
def feature():
    return FeatureFactory(code="api")


def use(customer, credits, at=utc(2026, 5, 20), event_id=None):
    record_event(event=EventInput(event_id=event_id or f"e-{credits}-{at:%d%H%M}", customer=customer.external_id,
                                  feature="api", quantity=Decimal(credits), timestamp=at), now=at)


def may_period(customer):
    return BillingPeriod.objects.get(customer=customer, start=MAY)


def lines(invoice):
    return [(line.kind, line.credits, line.amount) for line in invoice.lines.order_by("id")]


def test_hybrid_plan_bills_overage_for_the_closed_period_and_the_next_base_fee_in_advance():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "13500")

    invoice = close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)

    assert lines(invoice) == [("overage", Decimal("3500"), Decimal("7.00")), ("base_fee", None, Decimal("49.00"))]
    assert (invoice.total, invoice.currency, invoice.status) == (Decimal("56.00"), "USD", "issued")
    base = invoice.lines.get(kind="base_fee")
    assert (base.service_start, base.service_end) == (JUNE, utc(2026, 7, 1))
    assert may_period(customer).status == "closed"
    june = BillingPeriod.objects.get(customer=customer, start=JUNE)
    assert june.grants.get(source="plan_allocation").remaining == Decimal("10000")
    assert_ledger_consistent()


def test_the_subscription_start_bills_the_first_base_fee():
    customer = make_customer(pro_plan(), started_at=MAY)

    start = Invoice.objects.get(customer=customer)

    assert (start.kind, start.total, start.number) == ("subscription_start", Decimal("49.00"), "OVG-000001")


def test_graduated_tiers_appear_as_a_breakdown_on_the_overage_line():
    plan = set_tiers(pro_plan(), ("2000", "0.002"), (None, "0.001"))
    customer = make_customer(plan, started_at=MAY)
    use(customer, "15000")  # 5 000 overage: 2 000 × 0.002 + 3 000 × 0.001

    line = close_period(period_id=may_period(customer).pk, now=AFTER_GRACE).lines.get(kind="overage")

    assert line.amount == Decimal("7.00")
    assert line.unit_price is None  # two rates: see the tiers
    assert [(t["credits"], t["unit_price"], t["amount"]) for t in line.tiers] == [
        ("2000.000000", "0.00200000", "4.00000000000000"), ("3000.000000", "0.00100000", "3.00000000000000")]


def test_pure_usage_based_plan_has_no_base_fee_line():
    customer = make_customer(payg_plan(), started_at=MAY)
    use(customer, "1234567")

    invoice = close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)

    assert lines(invoice) == [("overage", Decimal("1234567"), Decimal("1234.57"))]
    assert Invoice.objects.filter(customer=customer).count() == 1  # no start invoice either


def test_hard_limit_plan_closes_with_a_zero_invoice_marked_paid():
    customer = make_customer(free_plan(), started_at=MAY)
    use(customer, "1000")

    invoice = close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)

    assert (invoice.total, invoice.status, lines(invoice)) == (Decimal("0.00"), "paid", [])


def test_unused_included_credits_expire_without_rollover():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "4000")

    close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)

    may_grant = CreditGrant.objects.get(period=may_period(customer))
    assert may_grant.remaining == Decimal("0")
    assert LedgerEntry.objects.get(grant=may_grant, kind="expire").credits == Decimal("-6000")
    assert not CreditGrant.objects.filter(source="rollover").exists()
    assert_ledger_consistent()


def test_capped_rollover_carries_up_to_the_cap_for_one_period_and_expires_the_rest():
    plan = pro_plan(rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=Decimal("3000"))
    customer = make_customer(plan, started_at=MAY)
    use(customer, "4000")

    close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)

    rolled = CreditGrant.objects.get(source="rollover")
    assert (rolled.credits, rolled.effective_at, rolled.expires_at) == (Decimal("3000"), JUNE, utc(2026, 7, 1))
    assert rolled.cost == Decimal("49") * 3000 / 10000  # its share of May's base fee
    may_entries = LedgerEntry.objects.filter(grant__period=may_period(customer), grant__source="plan_allocation")
    assert sorted(e.credits for e in may_entries.filter(kind__in=["rollover", "expire"])) == [
        Decimal("-3000"), Decimal("-3000")]
    # June: 13 000 credits available (10 000 included + 3 000 rolled over) before overage.
    use(customer, "13000", at=utc(2026, 6, 15))
    assert BillingPeriod.objects.get(customer=customer, start=JUNE).overage_credits == Decimal("0")
    # The rolled-over credits do not roll again: they expire with June.
    july = close_period(period_id=BillingPeriod.objects.get(customer=customer, start=JUNE).pk,
                        now=utc(2026, 7, 1, 2))
    assert lines(july) == [("base_fee", None, Decimal("49.00"))]
    assert rolled.__class__.objects.get(pk=rolled.pk).remaining == Decimal("0")
    assert_ledger_consistent()


def test_rollover_all_keeps_every_unused_included_credit():
    customer = make_customer(pro_plan(rollover_policy=Plan.Rollover.ALL), started_at=MAY)
    use(customer, "2500")

    close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)

    assert CreditGrant.objects.get(source="rollover").credits == Decimal("7500")


def test_closing_twice_yields_one_invoice_and_closing_early_is_refused():
    customer = make_customer(pro_plan(), started_at=MAY)
    period = may_period(customer)

    with pytest.raises(BillingError) as early:
        close_period(period_id=period.pk, now=utc(2026, 6, 1, 0, 30))
    first = close_period(period_id=period.pk, now=AFTER_GRACE)
    second = close_period(period_id=period.pk, now=utc(2026, 6, 2))

    assert early.value.code == "period_not_due"
    assert first.pk == second.pk
    assert Invoice.objects.filter(kind="period_close").count() == 1
    assert close_due_periods(now=utc(2026, 6, 2)) == []


def test_a_late_close_catches_up_period_by_period_with_each_base_fee_once():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "12000")

    with time_machine.travel(utc(2026, 8, 15), tick=False):
        invoices = close_due_periods(now=utc(2026, 8, 15))

    assert [(i.period.start, i.total) for i in invoices] == [
        (MAY, Decimal("53.00")), (JUNE, Decimal("49.00")), (utc(2026, 7, 1), Decimal("49.00"))]
    assert BillingPeriod.objects.filter(customer=customer, status="open").get().start == utc(2026, 8, 1)
    assert_ledger_consistent()


def test_the_upcoming_invoice_is_exactly_what_the_close_then_writes():
    plan = set_tiers(pro_plan(), ("2000", "0.002"), (None, "0.001"))
    customer = make_customer(plan, started_at=MAY)
    use(customer, "16789.5")
    period = may_period(customer)

    upcoming = upcoming_invoice(period=period)
    invoice = close_period(period_id=period.pk, now=AFTER_GRACE)

    assert [(l.kind, l.credits, l.amount, l.tiers) for l in upcoming.lines] == [
        (l.kind, l.credits, l.amount, l.tiers) for l in invoice.lines.order_by("id")]
    assert upcoming.total == invoice.total == Decimal("57.79")  # 49 + 2 000 × 0.002 + 4 789.5 × 0.001 = 8.7895


def test_invoice_numbers_are_sequential_without_gaps():
    first = make_customer(pro_plan(), started_at=MAY)
    second = make_customer(pro_plan(), started_at=MAY)

    close_due_periods(now=AFTER_GRACE)

    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == ["OVG-000001", "OVG-000002", "OVG-000003", "OVG-000004"]
    assert first.invoices.count() == second.invoices.count() == 2
