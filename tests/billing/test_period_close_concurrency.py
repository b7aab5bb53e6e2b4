"""Closing on PostgreSQL: two workers at once, and a crash half-way."""

import threading
import time
from decimal import Decimal

import pytest
from django.db import connection, connections

from billing.models import BillingPeriod, CreditGrant, Invoice, InvoiceNumberSequence, LedgerEntry
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
MAY, AFTER_GRACE = utc(2026, 5, 1), utc(2026, 6, 1, 1, 0)


@pytest.fixture
def may():
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(), started_at=MAY)
    record_event(event=EventInput(event_id="e1", customer=customer.external_id, feature="api",
                                  quantity=Decimal("12000"), timestamp=utc(2026, 5, 20)), now=utc(2026, 5, 20))
    return BillingPeriod.objects.get(customer=customer, start=MAY)


def test_two_workers_closing_the_same_period_write_one_invoice(may):
    results = run_concurrently(lambda: close_period(period_id=may.pk, now=AFTER_GRACE), [()] * 8)

    assert not [r for r in results if isinstance(r, Exception)]
    assert len({invoice.pk for invoice in results}) == 1
    assert Invoice.objects.filter(kind="period_close").count() == 1
    assert CreditGrant.objects.filter(source="plan_allocation", customer=may.customer).count() == 2
    assert_ledger_consistent()


def test_a_close_killed_half_way_leaves_nothing_and_a_rerun_closes_once(may):
    # Another session holds the invoice-number row, so the close blocks after it has
    # opened June and expired May's credits, before it can write the invoice. Then its
    # database connection is killed, as if the worker died mid-close.
    InvoiceNumberSequence.objects.get_or_create(name="invoice")
    holder = connections.create_connection("default")
    holder.set_autocommit(False)
    with holder.cursor() as cursor:
        cursor.execute("SELECT last_value FROM billing_invoicenumbersequence WHERE name = 'invoice' FOR UPDATE")
    backend_pid, outcome = {}, {}

    def doomed_close():
        try:
            connection.ensure_connection()
            backend_pid["pid"] = connection.connection.info.backend_pid
            close_period(period_id=may.pk, now=AFTER_GRACE)
        except Exception as error:
            outcome["error"] = error
        finally:
            connections.close_all()

    worker = threading.Thread(target=doomed_close)
    worker.start()
    with holder.cursor() as cursor:
        for _ in range(200):  # wait until the close is blocked on the invoice-number lock
            cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [backend_pid.get("pid")])
            row = cursor.fetchone()
            if row and row[0] == "Lock":
                break
            time.sleep(0.05)
        else:
            pytest.fail("the close never reached the invoice-number lock")
        cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid["pid"]])
    worker.join(timeout=30)
    holder.rollback()
    holder.close()

    assert "error" in outcome  # the close died
    assert not Invoice.objects.filter(kind="period_close").exists()
    assert BillingPeriod.objects.get(pk=may.pk).status == "open"
    assert not LedgerEntry.objects.filter(kind="expire").exists()
    assert not BillingPeriod.objects.filter(customer=may.customer, start=utc(2026, 6, 1)).exists()

    invoice = close_period(period_id=may.pk, now=AFTER_GRACE)

    assert invoice.total == Decimal("53.00")  # 2 000 overage credits × $0.002 + $49 for June
    assert Invoice.objects.filter(kind="period_close").count() == 1
    assert_ledger_consistent()
