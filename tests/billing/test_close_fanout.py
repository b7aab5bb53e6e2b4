"""The beat close fanned out: due periods dispatched in chunks, each chunk closing its
periods one transaction at a time, every period exactly once however often a chunk runs."""

from decimal import Decimal

import pytest
import time_machine
from celery.signals import task_postrun
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing import tasks
from billing.models import BillingPeriod, Invoice
from billing.services.invoicing import close_period, close_periods, due_period_ids
from billing.services.metering import EventInput, record_event, record_events
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY, JUNE = utc(2026, 5, 1), utc(2026, 6, 1)
AFTER_GRACE = utc(2026, 6, 1, 1, 0)


@pytest.fixture(autouse=True)
def feature():
    return FeatureFactory(code="api")


@pytest.fixture
def chunk_runs():
    """(period ids, periods closed) of every `close_periods_task` run, as Celery reports them."""
    runs = []

    def record(sender=None, args=None, retval=None, **kwargs):
        if sender.name == tasks.close_periods_task.name:
            runs.append((list(args[0]), retval))

    task_postrun.connect(record, weak=False)
    yield runs
    task_postrun.disconnect(record)


def use(customer, credits, at=utc(2026, 5, 20)):
    record_event(event=EventInput(event_id=f"e-{credits}", customer=customer.external_id, feature="api",
                                  quantity=Decimal(credits), timestamp=at), now=at)


def may_period(customer):
    return BillingPeriod.objects.get(customer=customer, start=MAY)


def close_invoices(customer):
    return list(Invoice.objects.filter(customer=customer, kind="period_close").order_by("number"))


def test_beat_fans_the_due_periods_out_in_chunks_and_closes_each_once(settings, chunk_runs):
    settings.OVERAGE_CLOSE_CHUNK_PERIODS = 2
    customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(5)]
    use(customers[0], "12000")  # 2 000 overage credits: $4.00
    use(customers[1], "9000")
    june_starter = make_customer(pro_plan(), started_at=JUNE)  # its period has not ended

    with time_machine.travel(AFTER_GRACE, tick=False):
        dispatched = tasks.close_due_periods_task.delay().get()

    periods = [may_period(c).pk for c in customers]
    assert dispatched == 5
    assert chunk_runs == [(periods[0:2], 2), (periods[2:4], 2), (periods[4:5], 1)]
    for customer in customers:
        assert may_period(customer).status == "closed"
        assert len(close_invoices(customer)) == 1
    assert close_invoices(customers[0])[0].total == Decimal("53.00")
    assert close_invoices(customers[1])[0].total == Decimal("49.00")
    assert not close_invoices(june_starter)
    assert_ledger_consistent()


def test_a_chunk_run_again_and_a_second_beat_close_nothing_twice(chunk_runs):
    customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(3)]
    use(customers[0], "15000")
    periods = [may_period(c).pk for c in customers]

    with time_machine.travel(AFTER_GRACE, tick=False):
        tasks.close_due_periods_task.delay()
        invoices = {i.pk: (i.number, i.total) for i in Invoice.objects.filter(kind="period_close")}
        again = tasks.close_periods_task.delay(periods).get()  # e.g. redelivered after a lost ack
        second_beat = tasks.close_due_periods_task.delay().get()

    assert again == 0 and second_beat == 0
    assert {i.pk: (i.number, i.total) for i in Invoice.objects.filter(kind="period_close")} == invoices
    assert len(invoices) == 3
    assert_ledger_consistent()


def test_a_late_run_closes_each_subscriptions_periods_in_order_from_its_oldest():
    customer = make_customer(pro_plan(), started_at=MAY)
    use(customer, "11000")
    other = make_customer(pro_plan(), started_at=utc(2026, 7, 1))

    now = utc(2026, 8, 15)
    assert due_period_ids(now=now) == [may_period(customer).pk, BillingPeriod.objects.get(customer=other).pk]
    with time_machine.travel(now, tick=False):
        tasks.close_due_periods_task.delay()

    invoices = close_invoices(customer)
    assert [(i.period.start, i.total) for i in invoices] == [
        (MAY, Decimal("51.00")), (JUNE, Decimal("49.00")), (utc(2026, 7, 1), Decimal("49.00"))]
    assert [[(line.kind, line.service_start) for line in i.lines.filter(kind="base_fee")] for i in invoices] == [
        [("base_fee", JUNE)], [("base_fee", utc(2026, 7, 1))], [("base_fee", utc(2026, 8, 1))]]
    assert len(close_invoices(other)) == 1
    assert BillingPeriod.objects.get(customer=customer, start=utc(2026, 8, 1)).status == "open"
    assert_ledger_consistent()


def test_a_period_that_cannot_close_does_not_stop_the_rest_of_its_chunk(caplog):
    due = make_customer(pro_plan(), started_at=MAY)
    not_due = make_customer(pro_plan(), started_at=utc(2026, 5, 15))  # its first period ends June 15

    not_due_period = BillingPeriod.objects.get(customer=not_due)

    invoices = close_periods(period_ids=[not_due_period.pk, may_period(due).pk], now=AFTER_GRACE)

    assert [i.customer_id for i in invoices] == [due.pk]
    assert BillingPeriod.objects.get(customer=not_due).status == "open"
    assert "stays open and is retried next run" in caplog.text


def test_the_queries_of_a_close_do_not_grow_with_the_usage_in_the_period():
    few = make_customer(pro_plan(), started_at=MAY)
    many = make_customer(pro_plan(), started_at=MAY)
    use(few, "12000")
    at = utc(2026, 5, 20)
    record_events(events=[EventInput(event_id=f"m-{n}", customer=many.external_id, feature="api",
                                     quantity=Decimal(200), timestamp=at) for n in range(60)], now=at)

    counts = []
    for customer in (few, many):
        with CaptureQueriesContext(connection) as queries:
            invoice = close_period(period_id=may_period(customer).pk, now=AFTER_GRACE)
        counts.append(len(queries))
        assert invoice.total == Decimal("53.00")  # 2 000 overage credits either way

    assert counts[0] == counts[1]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_workers_running_overlapping_chunks_write_one_invoice_per_period():
    customers = [make_customer(pro_plan(), started_at=MAY) for _ in range(6)]
    for customer in customers[::2]:
        use(customer, "10500")
    periods = [may_period(c).pk for c in customers]

    results = run_concurrently(lambda ids: close_periods(period_ids=ids, now=AFTER_GRACE),
                               [(periods,), (periods[::-1],), (periods[2:],)])

    assert not [r for r in results if isinstance(r, Exception)]
    invoices = Invoice.objects.filter(kind="period_close")
    assert sorted(invoices.values_list("period_id", flat=True)) == sorted(periods)
    numbers = sorted(int(n.rsplit("-", 1)[1]) for n in Invoice.objects.values_list("number", flat=True))
    assert numbers == list(range(1, len(numbers) + 1))  # gap-free across both workers
    assert sorted(invoices.values_list("total", flat=True)) == [Decimal("49.00")] * 3 + [Decimal("50.00")] * 3
    assert_ledger_consistent()
