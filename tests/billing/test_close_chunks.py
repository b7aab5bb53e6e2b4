"""A chunk of periods closed together (a few dozen per transaction, in a few statements
for all of them): the same rows as closing each period alone, nothing closed twice when
another worker closes one meanwhile, and a period that cannot close fails alone."""

import threading
import time
from decimal import Decimal

import pytest
import time_machine
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from billing.models import BillingPeriod, CreditGrant, Invoice, InvoiceLine, LedgerEntry, Subscription
from billing.services.invoicing import bill_progressively, close_period, close_periods
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from billing.services.plan_changes import subscription_change_plan
from plans.models import Plan
from tests.factories import FeatureFactory, free_plan, make_customer, payg_plan, pro_plan, set_tiers, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY, JUNE = utc(2026, 5, 1), utc(2026, 6, 1)
AFTER_GRACE = utc(2026, 6, 1, 1, 0)


@pytest.fixture(autouse=True)
def feature():
    return FeatureFactory(code="api")


def use(customer, credits, at=utc(2026, 5, 20)):
    record_event(event=EventInput(event_id=f"e-{credits}-{at:%m%d%H%M}", customer=customer.external_id,
                                  feature="api", quantity=Decimal(credits), timestamp=at), now=at)


def may_period(customer):
    return BillingPeriod.objects.get(customer=customer, start=MAY)


def close_totals(customers):
    return [Invoice.objects.get(customer=c, period__start=MAY, kind="period_close").total for c in customers]


def invoice_numbers():
    return sorted(int(n.rsplit("-", 1)[1]) for n in Invoice.objects.values_list("number", flat=True))


# --- The same rows as one close at a time -------------------------------------------------

def _overage_in_tiers(customer):
    use(customer, "15000")  # 5 000 overage: 2 000 × 0.002 + 3 000 × 0.001 = 7.00


def _capped_rollover(customer):
    use(customer, "4000")  # 6 000 unused: 3 000 roll over, 3 000 expire


def _rollover_all(customer):
    use(customer, "2500")


def _promotional_credits_expiring_with_the_period(customer):
    grant_credits_once(customer=customer, idempotency_key="promo", credits=Decimal("1000"), source="promotional",
                       now=utc(2026, 5, 2), expires_at=JUNE, description="Spring promotion")
    use(customer, "9000")


def _billed_progressively_then_more_usage(customer):
    use(customer, "13000", at=utc(2026, 5, 10))  # 3 000 overage: 6.00, invoiced at once
    assert bill_progressively(period_id=may_period(customer).pk, now=utc(2026, 5, 10)).total == Decimal("6.00")
    use(customer, "1000")  # 4 000 in all: the close bills 8.00 − 6.00


def _june_opened_by_an_event_before_the_close(customer):
    use(customer, "12000")
    use(customer, "10", at=utc(2026, 6, 1, 0, 30))


def _upgraded_mid_period(customer):
    use(customer, "8000", at=utc(2026, 5, 10))
    subscription_change_plan(customer=customer, plan_code="business", now=utc(2026, 5, 16))
    use(customer, "20000")  # 2 000 Pro credits left + 40 000 × 16/31 prorated Business credits: no overage


def _downgrade_waiting_for_june(customer):
    use(customer, "5000")
    subscription_change_plan(customer=customer, plan_code="basic", now=utc(2026, 5, 16))


def _canceled(customer):
    use(customer, "11000")
    Subscription.objects.filter(customer=customer).update(status=Subscription.Status.CANCELED)


SCENARIOS = [  # (plan code, set-up, close invoice total)
    ("tiered", _overage_in_tiers, Decimal("56.00")),
    ("capped", _capped_rollover, Decimal("49.00")),
    ("all", _rollover_all, Decimal("49.00")),
    ("pro", _promotional_credits_expiring_with_the_period, Decimal("49.00")),
    ("progressive", _billed_progressively_then_more_usage, Decimal("51.00")),
    ("pro", _june_opened_by_an_event_before_the_close, Decimal("53.00")),
    ("pro", _upgraded_mid_period, Decimal("99.00")),  # June's base fee, on Business
    ("pro", _downgrade_waiting_for_june, Decimal("19.00")),  # June's base fee, on Basic
    ("pro", _canceled, Decimal("2.00")),  # 1 000 overage, no next period, no base fee
    ("free", lambda customer: use(customer, "1000"), Decimal("0.00")),
    ("payg", lambda customer: use(customer, "1234567"), Decimal("1234.57")),
]


def _plans():
    set_tiers(pro_plan(code="tiered"), ("2000", "0.002"), (None, "0.001"))
    pro_plan(code="capped", rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=Decimal("3000"))
    pro_plan(code="all", rollover_policy=Plan.Rollover.ALL)
    pro_plan(code="progressive", progressive_billing_threshold=Decimal("5.00"))
    pro_plan()
    pro_plan(code="business", name="Business", base_price=Decimal("99"), included_credits=Decimal("50000"),
             overage_unit_price=Decimal("0.001"))
    pro_plan(code="basic", name="Basic", base_price=Decimal("19"), included_credits=Decimal("2000"))
    free_plan()
    payg_plan()


def snapshot(customer) -> dict:
    """A customer's periods, grants, ledger entries, invoices and lines, with ids made
    ranks among the customer's own rows (so two customers' rows compare), and invoice
    numbers left out (they depend on the order of the closes)."""
    tables = {
        "period": BillingPeriod.objects.filter(customer=customer),
        "grant": CreditGrant.objects.filter(customer=customer),
        "entry": LedgerEntry.objects.filter(customer=customer),
        "invoice": Invoice.objects.filter(customer=customer),
        "line": InvoiceLine.objects.filter(invoice__customer=customer),
    }
    rows = {name: list(query.order_by("id").values()) for name, query in tables.items()}
    rank = {name: {row["id"]: n for n, row in enumerate(table, 1)} for name, table in rows.items()}
    references = {"period_id": "period", "grant_id": "grant", "invoice_id": "invoice", "through_entry_id": "entry"}
    keys = {"included:period": "period", "rollover:grant": "grant"}
    normalised = {}
    for name, table in rows.items():
        normalised[name] = []
        for row in table:
            item = {}
            for column, value in row.items():
                if column in ("customer_id", "subscription_id", "number", "event_id"):
                    continue
                if column == "id":
                    value = rank[name][value]
                elif column in references and value is not None:
                    value = rank[references[column]].get(value, "not the customer's")
                elif column == "idempotency_key" and value:
                    prefix, _, number = value.rpartition(":")
                    if prefix in keys:
                        value = (prefix, rank[keys[prefix]][int(number)])
                    elif value.startswith("progressive:"):  # progressive:<period>:<overage billed through>
                        _, period_id, through = value.split(":")
                        value = ("progressive", rank["period"][int(period_id)], through)
                    elif prefix.startswith(("subscription-start", "upgrade:period")):
                        value = prefix.split(":")[0]
                item[column] = value
            normalised[name].append(item)
    return normalised


def differences(got: dict, expected: dict) -> list:
    """(table, row rank, column, got, expected) of every column that differs."""
    found = []
    for table in expected:
        if len(got[table]) != len(expected[table]):
            found.append((table, "rows", len(got[table]), len(expected[table])))
            continue
        for rank, (row, reference) in enumerate(zip(got[table], expected[table]), 1):
            found += [(table, rank, column, row.get(column), reference.get(column))
                      for column in reference if row.get(column) != reference.get(column)]
    return found


def test_a_chunk_writes_exactly_the_rows_each_period_closed_alone_writes(caplog):
    _plans()
    with time_machine.travel(MAY, tick=False):
        alone = [make_customer(Plan.objects.get(code=code), started_at=MAY) for code, _, _ in SCENARIOS]
        together = [make_customer(Plan.objects.get(code=code), started_at=MAY) for code, _, _ in SCENARIOS]
    for (_, set_up, _), one, other in zip(SCENARIOS, alone, together):
        with time_machine.travel(utc(2026, 5, 31), tick=False):  # the twins' rows stamped alike
            set_up(one)
            set_up(other)

    with time_machine.travel(AFTER_GRACE, tick=False):
        for customer in alone:
            close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)
        chunk = close_periods(period_ids=[may_period(c).pk for c in together], now=AFTER_GRACE)

    assert [invoice.customer_id for invoice in chunk] == [c.pk for c in together]
    assert "together failed" not in caplog.text  # written by the batch, not by its fallback
    assert close_totals(together) == close_totals(alone) == [total for _, _, total in SCENARIOS]
    for (_, set_up, _), one, other in zip(SCENARIOS, alone, together):
        assert differences(snapshot(other), snapshot(one)) == [], set_up.__name__
    assert invoice_numbers() == list(range(1, len(invoice_numbers()) + 1))
    assert_ledger_consistent()


def test_the_upgraded_scenario_bills_the_next_base_fee_on_the_new_plan_and_no_overage():
    _plans()
    customer = make_customer(pro_plan(), started_at=MAY)
    _upgraded_mid_period(customer)

    invoice = close_periods(period_ids=[may_period(customer).pk], now=AFTER_GRACE)[0]

    assert [(line.kind, line.amount) for line in invoice.lines.order_by("id")] == [("base_fee", Decimal("99.00"))]
    assert may_period(customer).overage_credits == Decimal("0")


# --- Batches, statements -------------------------------------------------------------------

def test_a_chunk_is_closed_in_batches_of_the_configured_size(settings):
    settings.OVERAGE_CLOSE_BATCH_PERIODS = 2
    customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(5)]
    use(customers[2], "12500")

    period_ids = [may_period(c).pk for c in customers]
    with CaptureQueriesContext(connection) as queries:
        invoices = close_periods(period_ids=period_ids, now=AFTER_GRACE)

    locks = [q["sql"] for q in queries if q["sql"].startswith('SELECT "billing_customer"') and "FOR UPDATE" in q["sql"]]
    if connection.features.has_select_for_update:  # (SQLite locks the whole file instead)
        assert len(locks) == 3  # 2 + 2 + 1 periods
    assert [i.total for i in invoices] == [Decimal("49.00")] * 2 + [Decimal("54.00")] + [Decimal("49.00")] * 2
    assert invoice_numbers() == list(range(1, 11))
    assert_ledger_consistent()


def test_the_statements_of_a_chunk_do_not_grow_with_its_periods():
    counts = []
    for size in (3, 12):
        customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(size)]
        for customer in customers[::3]:
            use(customer, "11000")
        period_ids = [may_period(c).pk for c in customers]
        with CaptureQueriesContext(connection) as queries:
            invoices = close_periods(period_ids=period_ids, now=AFTER_GRACE)
        assert len(invoices) == size
        assert sorted(i.total for i in invoices) == [Decimal("49.00")] * (size - size // 3) + [Decimal("51.00")] * (
            size // 3)
        counts.append(len(queries))

    assert counts[0] == counts[1]


# --- Failures and races --------------------------------------------------------------------

def test_a_period_that_fails_in_a_batch_fails_alone_and_the_rest_of_the_batch_closes(caplog):
    customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(3)]
    use(customers[0], "12000")
    broken = may_period(customers[1])
    # A close invoice already there for a period still open (written by hand, say): the
    # batch's insert breaks the one-close-invoice-per-period constraint.
    Invoice.objects.create(number="HAND-1", customer=customers[1], subscription=broken.subscription, period=broken,
                           kind="period_close", currency="USD", total=Decimal("0"), issued_at=MAY, due_at=MAY)

    invoices = close_periods(period_ids=[may_period(c).pk for c in customers], now=AFTER_GRACE)

    assert [(i.customer_id, i.total) for i in invoices] == [(customers[0].pk, Decimal("53.00")),
                                                            (customers[2].pk, Decimal("49.00"))]
    assert [may_period(c).status for c in customers] == ["closed", "open", "closed"]
    assert not BillingPeriod.objects.filter(customer=customers[1], start=JUNE).exists()
    assert not LedgerEntry.objects.filter(customer=customers[1], kind="expire").exists()
    assert "closing 3 periods together failed" in caplog.text
    assert f"closing billing period {broken.pk} failed" in caplog.text
    numbers = sorted(Invoice.objects.exclude(number="HAND-1").values_list("number", flat=True))
    assert numbers == [f"OVG-{n:06d}" for n in range(1, 6)]  # 3 start invoices, 2 closes: no gap
    assert_ledger_consistent()


def test_periods_a_batch_cannot_close_are_refused_one_by_one_as_before(caplog):
    due = make_customer(pro_plan(), started_at=MAY)
    not_due = make_customer(pro_plan(), started_at=utc(2026, 5, 15))  # its first period ends June 15
    use(due, "10001")

    invoices = close_periods(period_ids=[BillingPeriod.objects.get(customer=not_due).pk, may_period(due).pk],
                             now=AFTER_GRACE)

    assert [(i.customer_id, i.total) for i in invoices] == [(due.pk, Decimal("49.00"))]  # 1 credit: 0.002 → 0.00
    assert BillingPeriod.objects.get(customer=not_due).status == "open"
    assert "stays open and is retried next run" in caplog.text


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_period_closed_by_another_worker_while_the_chunk_waits_for_its_lock_is_not_closed_again(caplog):
    customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(3)]
    use(customers[1], "12000")
    periods = [may_period(c).pk for c in customers]
    holding, release, outcome = threading.Event(), threading.Event(), {}

    def other_worker():  # closes the middle period, then keeps its customer locked until told
        try:
            with transaction.atomic():
                outcome["other"] = close_period(period_id=periods[1], now=AFTER_GRACE)
                holding.set()
                release.wait(30)
        finally:
            connections.close_all()

    def chunk():  # reads the three periods as open, then waits for the middle customer's lock
        try:
            connection.ensure_connection()
            outcome["pid"] = connection.connection.info.backend_pid
            outcome["chunk"] = close_periods(period_ids=periods, now=AFTER_GRACE)
        except Exception as error:
            outcome["error"] = error
        finally:
            connections.close_all()

    other = threading.Thread(target=other_worker)
    other.start()
    assert holding.wait(30)
    worker = threading.Thread(target=chunk)
    worker.start()
    try:
        with connections["default"].cursor() as cursor:
            for _ in range(200):
                cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [outcome.get("pid")])
                row = cursor.fetchone()
                if row and row[0] == "Lock":
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the chunk never waited for the customer's lock")
    finally:
        release.set()
        other.join(30)
        worker.join(30)

    assert "error" not in outcome
    assert "together failed" not in caplog.text  # skipped by the batch, not by its fallback
    assert [i.pk for i in outcome["chunk"]][1] == outcome["other"].pk
    assert [i.total for i in outcome["chunk"]] == [Decimal("49.00"), Decimal("53.00"), Decimal("49.00")]
    assert Invoice.objects.filter(kind="period_close").count() == 3
    assert BillingPeriod.objects.filter(customer=customers[1], start=JUNE).count() == 1
    assert LedgerEntry.objects.filter(customer=customers[1], kind="expire").count() == 0  # all 10 000 used
    assert CreditGrant.objects.filter(customer=customers[1], source="plan_allocation").count() == 2
    assert invoice_numbers() == list(range(1, 7))
    assert_ledger_consistent()
