"""Revenue recognition: credits paid for are deferred, recognised as they are used,
breakage at expiry, rollovers move deferred value without double counting, overage is
revenue of the period of use. Every cent once, none twice."""

from decimal import Decimal
from io import StringIO

import pytest
import time_machine
from django.core.management import call_command
from django.urls import reverse

from billing.models import BillingPeriod, CreditGrant, LedgerEntry, RevenueEntry
from billing.selectors_revenue import parse_month, revenue_report
from billing.services.invoicing import close_period, invoice_void
from billing.services.ledger import expire_credit_grants, grant_credits_once
from billing.services.metering import EventInput, record_event
from billing.services.purchases import purchase_pack
from billing.services.revenue import recognise_revenue
from plans.models import CreditPack, Plan
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, make_customer, payg_plan, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY, JUNE, JULY = utc(2026, 5, 1), utc(2026, 6, 1), utc(2026, 7, 1)
MAY_CLOSE, JUNE_CLOSE = utc(2026, 6, 1, 2), utc(2026, 7, 1, 2)  # after the one-hour grace window
LAST_INSTANT_OF_MAY = utc(2026, 5, 31, 23, 59, 59, 999999)
D = Decimal


@pytest.fixture(autouse=True)
def catalogue():
    FeatureFactory(code="api")
    # The seed's pack: 5 000 credits for $10.
    CreditPack.objects.create(code="credits-5k", name="5 000 credits", credits=D("5000"), price=D("10"))
    CreditPack.objects.create(code="week", name="1 000 credits, 7 days", credits=D("1000"), price=D("3"),
                              expires_after_days=7)


def use(customer, credits, at, event_id):
    record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api",
                                  quantity=D(credits), timestamp=at), now=at)


def recognise(now):
    with time_machine.travel(now, tick=False):
        return recognise_revenue(now=now)


def month(value, currency="USD"):
    [report] = revenue_report(month=parse_month(value), currency=currency)
    return report


def figures(value):
    """The month's figures as the report prints them (rounded once, to the cent)."""
    report = month(value)
    assert report.balances, report.identity_difference
    return {name: amount for name, amount in report.rounded().items() if amount or name in {"closing", "breakage"}}


def grant_rows_total(grant):
    """deferred in − transferred out − recognised − breakage of one grant (0 = closed)."""
    total = D(0)
    for row in RevenueEntry.objects.filter(kind__in=["deferred", "recognised", "breakage"]).filter(
            ledger_entry__grant=grant) | RevenueEntry.objects.filter(grant=grant, ledger_entry__isnull=True):
        total += row.amount if row.kind == "deferred" else -row.amount
    return total


def may(customer):
    return BillingPeriod.objects.get(customer=customer, start=MAY)


def test_seed_example_included_credits_and_a_pack_all_used_recognise_every_cent_once():
    customer = make_customer(pro_plan(), started_at=MAY)  # $49 / month, 10 000 included
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 10))
    use(customer, "10000", utc(2026, 5, 12), "e1")
    use(customer, "5000", utc(2026, 5, 20), "e2")

    recognise(utc(2026, 5, 31, 12))
    close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    recognise(MAY_CLOSE)

    recognised = RevenueEntry.objects.filter(kind="recognised")
    assert sum(row.amount for row in recognised) == D("59")  # exact, not just to the cent
    consumed = LedgerEntry.objects.filter(kind="consume")
    assert sorted(row.ledger_entry_id for row in recognised) == sorted(consumed.values_list("pk", flat=True))
    assert figures("2026-05") == {"billed": D("59.00"), "deferred_in": D("59.00"), "recognised": D("59.00"),
                                  "breakage": D("0.00"), "closing": D("0.00"), "revenue": D("59.00")}
    assert_ledger_consistent()


def test_half_used_included_credits_split_exactly_between_recognised_and_breakage_at_close():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "3333.333333", utc(2026, 5, 9), "e1")

    close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    recognise(MAY_CLOSE)

    may_grant = CreditGrant.objects.get(period__start=MAY, source="plan_allocation")
    recognised = RevenueEntry.objects.get(kind="recognised", grant=may_grant)
    breakage = RevenueEntry.objects.get(kind="breakage", grant=may_grant)
    assert recognised.amount == D("16.3333333317")  # 49 × 3 333.333333 / 10 000
    assert breakage.amount == D("32.6666666683")  # the remainder, not a product
    assert recognised.amount + breakage.amount == D("49")
    # Credits that die with May are May's revenue, though the expiry entry is at June 1 00:00.
    assert breakage.recognised_at == LAST_INSTANT_OF_MAY
    assert figures("2026-05") == {"billed": D("49.00"), "deferred_in": D("49.00"), "recognised": D("16.33"),
                                  "breakage": D("32.67"), "closing": D("0.00"), "revenue": D("49.00")}
    # June: the base fee invoiced at the close, and June's included credits deferred.
    assert figures("2026-06") == {"billed": D("49.00"), "deferred_in": D("49.00"), "breakage": D("0.00"),
                                  "closing": D("49.00")}


def test_a_pack_half_used_stays_half_deferred_and_an_expiring_pack_leaves_breakage():
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 2))
    purchase_pack(customer=customer, pack_code="week", idempotency_key="buy-2", now=utc(2026, 5, 2))
    use(customer, "250", utc(2026, 5, 3), "e1")  # the expiring pack goes first: $0.75
    expire_credit_grants(now=utc(2026, 5, 10))  # 750 credits expire: $2.25 breakage
    use(customer, "12500", utc(2026, 5, 20), "e2")  # 10 000 included ($49) + 2 500 of the pack ($5)

    close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    recognise(MAY_CLOSE)

    assert figures("2026-05") == {"billed": D("62.00"), "deferred_in": D("62.00"), "recognised": D("54.75"),
                                  "breakage": D("2.25"), "closing": D("5.00"), "revenue": D("57.00")}
    week = CreditGrant.objects.get(pack__code="week")
    assert grant_rows_total(week) == D("0")
    assert grant_rows_total(CreditGrant.objects.get(pack__code="credits-5k")) == D("5")
    assert_ledger_consistent()


def test_capped_rollover_moves_deferred_value_without_counting_it_twice():
    plan = pro_plan(rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=D("3000"))
    customer = make_customer(plan, started_at=MAY)
    use(customer, "4000", utc(2026, 5, 20), "e1")
    close_period(period_id=may(customer).pk, now=MAY_CLOSE)  # 3 000 roll over ($14.70), 3 000 expire
    use(customer, "11000", utc(2026, 6, 20), "e2")
    close_period(period_id=BillingPeriod.objects.get(customer=customer, start=JUNE).pk, now=JUNE_CLOSE)

    recognise(JUNE_CLOSE)

    # May keeps the value carried into June as deferred revenue at the month's end.
    assert figures("2026-05") == {"billed": D("49.00"), "deferred_in": D("49.00"), "recognised": D("19.60"),
                                  "breakage": D("14.70"), "closing": D("14.70"), "revenue": D("34.30")}
    june = month("2026-06")
    assert (june.rolled_over, june.rolled_over_net) == (D("14.70"), D("0"))
    assert figures("2026-06") == {"billed": D("49.00"), "opening": D("14.70"), "deferred_in": D("49.00"),
                                  "rolled_over": D("14.70"), "recognised": D("53.90"), "breakage": D("9.80"),
                                  "closing": D("0.00"), "revenue": D("63.70")}
    # Two base fees, $98, recognised once each: deferred in counts no transfer.
    total = RevenueEntry.objects.filter(kind__in=["recognised", "breakage"], recognised_at__lt=JULY)
    assert sum(row.amount for row in total) == D("98")
    for grant in CreditGrant.objects.filter(customer=customer, period__start__in=[MAY, JUNE]):
        assert grant_rows_total(grant) == D("0"), grant
    assert_ledger_consistent()


def test_rolling_over_everything_with_an_odd_share_closes_the_old_grant_to_the_last_place():
    customer = make_customer(pro_plan(rollover_policy=Plan.Rollover.ALL), started_at=MAY)
    use(customer, "3333.333333", utc(2026, 5, 9), "e1")

    close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    recognise(MAY_CLOSE)

    may_grant = CreditGrant.objects.get(period__start=MAY, source="plan_allocation")
    rolled = CreditGrant.objects.get(source="rollover")
    transfer_in = RevenueEntry.objects.get(kind="deferred", grant=rolled)
    transfer_out = RevenueEntry.objects.get(kind="deferred", ledger_entry__grant=may_grant, amount__lt=0)
    assert transfer_in.amount == rolled.cost == -transfer_out.amount == D("32.6667")  # cost kept to 4 places
    assert grant_rows_total(may_grant) == D("0")  # a sub-cent rounding of the share stays with May
    assert month("2026-06").rolled_over_net == D("0")


def test_overage_is_recognised_in_the_period_of_use_and_reversed_when_its_invoice_is_voided():
    # No base fee, so the close invoice bills overage only (base fees cannot be voided).
    customer = make_customer(pro_plan(base_price=D("0")), started_at=MAY)
    use(customer, "13500", utc(2026, 5, 20), "e1")  # 3 500 overage credits × $0.002

    invoice = close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    recognise(MAY_CLOSE)

    row = RevenueEntry.objects.get(kind="overage")
    assert (row.amount, row.recognised_at) == (D("7.0000"), LAST_INSTANT_OF_MAY)
    assert figures("2026-05")["overage"] == D("7.00")
    assert figures("2026-05")["revenue"] == D("7.00")
    assert "overage" not in figures("2026-06")  # issued in June, but used in May

    invoice_void(invoice=invoice, now=utc(2026, 6, 5))
    recognise(utc(2026, 6, 5))
    recognise(utc(2026, 6, 6))

    assert figures("2026-05")["overage"] == D("7.00")  # May's books stay as they were
    assert figures("2026-06")["overage"] == D("-7.00")  # the waiver, in the month of the void
    assert RevenueEntry.objects.filter(kind="overage").count() == 2


def test_an_overage_invoice_voided_before_recognition_is_never_recognised():
    customer = make_customer(pro_plan(base_price=D("0")), started_at=MAY)
    use(customer, "13500", utc(2026, 5, 20), "e1")
    invoice = close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    invoice_void(invoice=invoice, now=utc(2026, 6, 2))

    recognise(utc(2026, 6, 3))

    assert not RevenueEntry.objects.filter(kind="overage").exists()


def test_overage_paid_down_by_a_pack_is_recognised_from_the_pack_not_billed_as_overage():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "12000", utc(2026, 5, 10), "e1")  # 2 000 overage
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 11))

    close_period(period_id=may(customer).pk, now=MAY_CLOSE)
    recognise(MAY_CLOSE)

    paid_down = RevenueEntry.objects.get(kind="recognised", ledger_entry__event__isnull=True)
    assert paid_down.amount == D("4")  # 2 000 of the pack's 5 000 credits, of $10
    assert figures("2026-05") == {"billed": D("59.00"), "deferred_in": D("59.00"), "recognised": D("53.00"),
                                  "breakage": D("0.00"), "closing": D("6.00"), "revenue": D("53.00")}


def test_promotional_credits_recognise_nothing():
    customer = make_customer(payg_plan(), started_at=MAY)
    grant_credits_once(customer=customer, idempotency_key="welcome", credits=D("1000"), source="promotional",
                       now=utc(2026, 5, 2))
    use(customer, "600", utc(2026, 5, 3), "e1")

    assert recognise(utc(2026, 5, 4)) == 0
    assert not RevenueEntry.objects.exists()
    assert revenue_report(month=parse_month("2026-05")) == []


def test_running_recognition_again_writes_nothing_new():
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 10))
    use(customer, "13000", utc(2026, 5, 12), "e1")
    use(customer, "4000", utc(2026, 5, 14), "e2")
    close_period(period_id=may(customer).pk, now=MAY_CLOSE)

    first = recognise(MAY_CLOSE)
    rows = list(RevenueEntry.objects.order_by("pk").values_list("kind", "amount", "recognised_at"))
    again = [recognise(MAY_CLOSE), recognise(utc(2026, 6, 1, 3))]

    assert first == len(rows) > 0
    assert again == [0, 0]
    assert list(RevenueEntry.objects.order_by("pk").values_list("kind", "amount", "recognised_at")) == rows


def test_recognition_journals_only_what_happened_by_now():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "1000", utc(2026, 5, 5), "e1")
    use(customer, "1000", utc(2026, 5, 25), "e2")

    recognise(utc(2026, 5, 10))
    assert RevenueEntry.objects.filter(kind="recognised").count() == 1
    recognise(utc(2026, 5, 26))
    assert sum(r.amount for r in RevenueEntry.objects.filter(kind="recognised")) == D("9.80")


def test_revenue_report_command_prints_rounded_figures_and_the_identity():
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 10))
    use(customer, "15000", utc(2026, 5, 20), "e1")
    out = StringIO()

    with time_machine.travel(utc(2026, 6, 10), tick=False):
        close_period(period_id=may(customer).pk, now=MAY_CLOSE)
        call_command("revenue_report", "--month", "2026-05", stdout=out)

    text = out.getvalue()
    assert "Revenue 2026-05 (UTC), USD" in text
    lines = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in text.splitlines()
             if line.startswith("  ") and line.strip()[-1].isdigit()}
    assert lines["billed (invoices issued, not void)"] == "59.00"
    assert lines["− recognised on consumption"] == "59.00"
    assert lines["deferred revenue, closing"] == "0.00"
    assert "holds exactly" in text
    assert RevenueEntry.objects.filter(kind="recognised").count() == 2  # the command recognised first


def test_revenue_report_command_rejects_a_bad_month():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="YYYY-MM"):
        call_command("revenue_report", "--month", "May 2026")


def test_admin_shows_the_journal_and_the_monthly_report(admin_client):
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 10))
    use(customer, "15000", utc(2026, 5, 20), "e1")

    with time_machine.travel(utc(2026, 6, 10), tick=False):
        close_period(period_id=may(customer).pk, now=MAY_CLOSE)
        report = admin_client.get(reverse("admin:billing_revenueentry_report"), {"month": "2026-05"})
        changelist = admin_client.get(reverse("admin:billing_revenueentry_changelist"), {"kind__exact": "recognised"})

    page = report.content.decode()
    assert report.status_code == 200
    assert "Revenue report 2026-05" in page
    assert page.count("<td style=\"text-align: right\">59.00</td>") == 4  # billed, deferred in, recognised, revenue
    assert "holds exactly" in page
    assert changelist.status_code == 200
    assert "Monthly report" in changelist.content.decode()
    assert set(changelist.context["cl"].queryset.values_list("kind", flat=True)) == {"recognised"}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_recognition_runs_write_each_row_once():
    customer = make_customer(pro_plan(rollover_policy=Plan.Rollover.ALL), started_at=MAY)
    purchase_pack(customer=customer, pack_code="credits-5k", idempotency_key="buy-1", now=utc(2026, 5, 10))
    for number in range(20):  # 6 666.66666 of the 10 000 included: the rest rolls over
        use(customer, "333.333333", utc(2026, 5, 11, number // 4, number % 4), f"e{number}")
    close_period(period_id=may(customer).pk, now=MAY_CLOSE)

    results = run_concurrently(lambda: recognise_revenue(now=MAY_CLOSE), [()] * 8)

    assert not [r for r in results if isinstance(r, Exception)], results
    assert RevenueEntry.objects.filter(kind="recognised").count() == LedgerEntry.objects.filter(kind="consume").count()
    assert RevenueEntry.objects.filter(kind="deferred").count() == 5  # May, June, pack, transfer out and in
    may_grant = CreditGrant.objects.get(period__start=MAY, source="plan_allocation")
    assert grant_rows_total(may_grant) == D("0")
    assert recognise_revenue(now=MAY_CLOSE) == 0


def test_overage_billed_progressively_and_at_close_is_recognised_once_in_the_period_of_use():
    from billing.services.invoicing import bill_progressively

    customer = make_customer(pro_plan(progressive_billing_threshold=D("5")), started_at=MAY)
    use(customer, "13000", utc(2026, 5, 10), "e1")  # 3 000 overage: $6.00, over the threshold
    progressive = bill_progressively(period_id=may(customer).pk, now=utc(2026, 5, 10, 1))
    use(customer, "1234.5", utc(2026, 5, 20), "e2")  # 1 234.5 more: billed at the close
    close = close_period(period_id=may(customer).pk, now=MAY_CLOSE)

    recognise(MAY_CLOSE)

    rows = RevenueEntry.objects.filter(kind="overage").order_by("invoice_line__invoice__issued_at")
    assert [(row.invoice_line.invoice_id, row.amount) for row in rows] == [
        (progressive.pk, D("6.00")), (close.pk, D("2.47"))]  # price(4 234.5) = 8.469 → 8.47 = 6.00 + 2.47
    assert {row.recognised_at for row in rows} == {LAST_INSTANT_OF_MAY}
    assert figures("2026-05")["overage"] == D("8.47")
