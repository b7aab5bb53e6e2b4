"""Duplicate, delayed and out-of-order deliveries change nothing twice: celery tasks run
again (acks_late redelivers a task whose worker died or whose acknowledgement was lost),
and Stripe webhooks sent twice, under two event ids, or in the wrong order.

Already covered elsewhere, not repeated here: a close chunk run again and a second beat
(test_close_fanout), a close killed half-way then re-run (test_period_close_concurrency),
recognition run again or concurrently (test_revenue), a delivered webhook not sent again
(test_webhooks), a top-up awaiting payment not bought again
(test_engine_review_regressions), a Stripe event id delivered twice
(stripe/test_webhook_signatures), a pack or top-up paid once per webhook
(stripe/test_integration).
"""

from datetime import timedelta
from decimal import Decimal

import pytest
import stripe
import time_machine
from django.core import mail

from billing import tasks
from billing.models import (
    Alert, BillingPeriod, CreditGrant, CreditPurchase, Invoice, LedgerEntry, Notification, RevenueEntry,
    StripeEventReceipt, WebhookDelivery, WebhookEndpoint,
)
from billing.services.invoicing import close_period
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from billing.services.purchases import auto_topup_configure, purchase_pack
from billing.services.stripe_sync import webhook_endpoint_ensure
from plans.models import CreditPack
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent
from tests.stripe.conftest import WEBHOOK_SECRET, deliver
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.django_db
START = utc(2026, 3, 1)
NOW = utc(2026, 3, 15, 12)


@pytest.fixture
def acme():
    FeatureFactory(code="api-call")
    return make_customer(pro_plan(), started_at=START, external_id="acme")


def use(credits, event_id, at=NOW):
    return record_event(event=EventInput(event_id=event_id, customer="acme", feature="api-call",
                                         quantity=Decimal(credits), timestamp=at), now=at)[0]


# --- Celery tasks run twice -------------------------------------------------------------------

@time_machine.travel(NOW, tick=False)
def test_an_alert_check_delivered_twice_fires_one_alert_notification_email_and_webhook(
        acme, django_capture_on_commit_callbacks):
    period = BillingPeriod.objects.get(customer=acme)
    use("5000", "e1")  # 50 %: the check it queued on commit is not run (the worker "died")
    with WebhookReceiver() as receiver, django_capture_on_commit_callbacks(execute=True):
        WebhookEndpoint.objects.create(url=receiver.url, secret="whsec_test")
        first = tasks.check_alerts_task.delay(acme.pk, period.pk).get()
        again = tasks.check_alerts_task.delay(acme.pk, period.pk).get()

    assert (first, again) == (1, 0)
    assert list(Alert.objects.values_list("kind", "threshold")) == [("usage_threshold", 50)]
    assert Notification.objects.count() == 1
    assert [m.subject for m in mail.outbox] == ["You have used 50% of your included credits"]
    assert len(receiver.requests) == 1
    assert WebhookDelivery.objects.get().status == "delivered"


def test_an_alert_check_delivered_after_the_close_fires_nothing(acme, django_capture_on_commit_callbacks):
    period = BillingPeriod.objects.get(customer=acme)
    use("5000", "e1")
    close_period(period_id=period.pk, now=utc(2026, 4, 1, 2))

    with django_capture_on_commit_callbacks(execute=True), time_machine.travel(utc(2026, 4, 1, 3), tick=False):
        assert tasks.check_alerts_task.delay(acme.pk, period.pk).get() == 0

    assert not Alert.objects.exists() and mail.outbox == []


@time_machine.travel(NOW, tick=False)
def test_an_alert_email_task_delivered_twice_sends_one_email(acme, django_capture_on_commit_callbacks):
    period = BillingPeriod.objects.get(customer=acme)
    use("5000", "e1")
    tasks.check_alerts_task.delay(acme.pk, period.pk).get()  # its email task is left queued (not run)
    alert = Alert.objects.get()

    first = tasks.send_alert_email_task.delay(alert.pk, True, False).get()
    again = tasks.send_alert_email_task.delay(alert.pk, True, False).get()

    assert (first, again) == (1, 0)
    assert [m.to for m in mail.outbox] == [["billing@acme.test"]]


class RefusingBackend:
    """An SMTP server that is down (Django's email backend API; not Overage code)."""

    def __init__(self, *args, **kwargs):
        pass

    def send_messages(self, messages):
        raise ConnectionRefusedError("SMTP server down")


@time_machine.travel(NOW, tick=False)
def test_an_alert_email_that_failed_is_sent_by_the_retry_once(acme, settings):
    period = BillingPeriod.objects.get(customer=acme)
    use("5000", "e1")
    tasks.check_alerts_task.delay(acme.pk, period.pk).get()
    alert = Alert.objects.get()
    backend = settings.EMAIL_BACKEND
    settings.EMAIL_BACKEND = f"{__name__}.RefusingBackend"
    with pytest.raises(OSError):
        tasks.send_alert_email_task.apply(args=(alert.pk, True, False), retries=5, throw=True).get()

    settings.EMAIL_BACKEND = backend
    assert tasks.send_alert_email_task.delay(alert.pk, True, False).get() == 1
    assert tasks.send_alert_email_task.delay(alert.pk, True, False).get() == 0
    assert len(mail.outbox) == 1


@time_machine.travel(NOW, tick=False)
def test_a_webhook_task_redelivered_after_a_failed_attempt_waits_for_its_backoff(
        acme, django_capture_on_commit_callbacks):
    period = BillingPeriod.objects.get(customer=acme)
    use("5000", "e1")
    with WebhookReceiver() as receiver:
        receiver.statuses = [500]
        WebhookEndpoint.objects.create(url=receiver.url, secret="whsec_test")
        with django_capture_on_commit_callbacks(execute=True):
            tasks.check_alerts_task.delay(acme.pk, period.pk).get()  # first attempt: 500
        delivery = WebhookDelivery.objects.get()

        assert tasks.deliver_webhook_task.delay(delivery.pk).get() == "pending"  # redelivered at once: not due
        with time_machine.travel(NOW + timedelta(minutes=1), tick=False):
            assert tasks.deliver_webhook_task.delay(delivery.pk).get() == "delivered"
            assert tasks.deliver_webhook_task.delay(delivery.pk).get() == "delivered"
            assert tasks.retry_due_webhooks_task.delay().get() == 0

    assert [r.path for r in receiver.requests] == ["/", "/"]  # the failed attempt and the one that worked
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 2)


@time_machine.travel(NOW, tick=False)
def test_an_auto_top_up_task_delivered_twice_buys_one_pack(acme):
    CreditPack.objects.create(code="1k", name="1 000 credits", credits=Decimal("1000"), price=Decimal("2"))
    auto_topup_configure(customer=acme, enabled=True, pack_code="1k", threshold=Decimal("200"))
    use("9900", "e1")  # 100 left: below the threshold

    first = tasks.run_auto_topup_task.delay(acme.pk).get()
    again = tasks.run_auto_topup_task.delay(acme.pk).get()

    assert first is not None and again is None
    assert CreditPurchase.objects.get().status == "paid"
    assert CreditGrant.objects.filter(customer=acme, source="auto_topup").count() == 1
    assert Invoice.objects.filter(kind="pack_purchase").count() == 1
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_a_progressive_billing_task_delivered_twice_writes_one_invoice(acme):
    plan = acme.subscriptions.get().plan
    plan.progressive_billing_threshold = Decimal("5.00")
    plan.save()
    period = BillingPeriod.objects.get(customer=acme)
    use("13000", "e1")  # 3 000 overage credits at $0.002 = $6.00

    first = tasks.bill_progressively_task.delay(period.pk).get()
    again = tasks.bill_progressively_task.delay(period.pk).get()

    assert first is not None and again is None
    assert Invoice.objects.get(kind="progressive").total == Decimal("6.00")


def test_an_expiry_task_delivered_twice_expires_each_grant_once(acme):
    with time_machine.travel(NOW, tick=False):
        grant, _ = grant_credits_once(customer=acme, idempotency_key="promo", credits=Decimal("25"),
                                      source="promotional", now=NOW, expires_at=NOW + timedelta(days=2))
    with time_machine.travel(NOW + timedelta(days=3), tick=False):
        assert tasks.expire_credit_grants_task.delay().get() == 1
        assert tasks.expire_credit_grants_task.delay().get() == 0

    assert list(LedgerEntry.objects.filter(grant=grant).values_list("kind", "credits")) == [
        ("grant", Decimal("25")), ("expire", Decimal("-25"))]
    assert_ledger_consistent()


def test_a_beat_close_and_its_chunk_redelivered_then_recognition_twice_write_everything_once(acme):
    period = BillingPeriod.objects.get(customer=acme)
    use("12000", "e1")  # 2 000 overage credits: $4.00
    with time_machine.travel(utc(2026, 4, 1, 2), tick=False):
        assert tasks.close_due_periods_task.delay().get() == 1
        assert tasks.close_periods_task.delay([period.pk]).get() == 0  # the chunk message delivered again
        assert tasks.close_due_periods_task.delay().get() == 0
        written = tasks.recognise_revenue_task.delay().get()
        assert written > 0
        rows = RevenueEntry.objects.count()
        assert tasks.recognise_revenue_task.delay().get() == 0

    invoice = Invoice.objects.get(kind="period_close")
    assert (invoice.period_id, invoice.total) == (period.pk, Decimal("53.00"))  # $4 overage + next $49 base fee
    assert RevenueEntry.objects.count() == rows
    assert_ledger_consistent()


# --- Stripe webhooks twice and out of order ---------------------------------------------------

@pytest.fixture
def stripe_endpoint(settings):
    """Stripe configured (so purchases wait for their webhook), with no Stripe server: only
    webhooks arrive. dj-stripe's best-effort mirror gets a closed port, failing at once."""
    settings.STRIPE_SECRET_KEY = settings.STRIPE_TEST_SECRET_KEY = "sk_test_overage000000000000000000"
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = ""
    endpoint = webhook_endpoint_ensure(base_url="http://testserver")
    api_base = stripe.api_base
    stripe.api_base = "http://127.0.0.1:9"
    yield endpoint
    stripe.api_base = api_base


def stripe_event(event_id: str, kind: str, obj: dict) -> dict:
    return {"id": event_id, "object": "event", "type": kind, "livemode": False, "api_version": "2020-08-27",
            "created": 1780000000, "data": {"object": obj}}


def intent(purchase, status: str) -> dict:
    obj = {"id": "pi_redelivery", "object": "payment_intent", "status": status, "amount": 200, "currency": "usd",
           "metadata": {"overage_purchase": str(purchase.pk)}}
    if status == "requires_payment_method":
        obj["last_payment_error"] = {"message": "Your card was declined."}
    return obj


@pytest.fixture
def pending_purchase(stripe_endpoint, acme):
    CreditPack.objects.create(code="1k", name="1 000 credits", credits=Decimal("1000"), price=Decimal("2"))
    purchase, _ = purchase_pack(customer=acme, pack_code="1k", idempotency_key="buy-1", now=NOW)
    assert purchase.status == "pending"
    return purchase


def posted(endpoint, *events) -> list[bytes]:
    answers = []
    for event in events:
        response = deliver(endpoint, event)
        assert response.status_code == 200
        answers.append(response.content)
    return answers


def test_one_payment_reported_by_two_events_and_each_delivered_twice_grants_once(
        stripe_endpoint, pending_purchase, django_capture_on_commit_callbacks):
    paid = intent(pending_purchase, "succeeded")
    with django_capture_on_commit_callbacks(execute=True):
        answers = posted(stripe_endpoint, stripe_event("evt_a", "payment_intent.succeeded", paid),
                         stripe_event("evt_a", "payment_intent.succeeded", paid),
                         stripe_event("evt_b", "payment_intent.succeeded", paid))

    assert answers[1:] == [b"duplicate", f"purchase {pending_purchase.pk} already granted".encode()]
    pending_purchase.refresh_from_db()
    assert pending_purchase.status == "paid"
    assert CreditGrant.objects.filter(source="purchase").get().credits == Decimal("1000")
    assert Invoice.objects.filter(kind="pack_purchase").count() == 1
    assert StripeEventReceipt.objects.count() == 2
    assert_ledger_consistent()


def test_a_payment_failure_arriving_after_the_success_changes_nothing(
        stripe_endpoint, pending_purchase, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        answers = posted(stripe_endpoint,
                         stripe_event("evt_ok", "payment_intent.succeeded", intent(pending_purchase, "succeeded")),
                         stripe_event("evt_ko", "payment_intent.payment_failed",
                                      intent(pending_purchase, "requires_payment_method")))

    assert answers[1] == f"purchase {pending_purchase.pk} is paid: unchanged".encode()
    pending_purchase.refresh_from_db()
    assert (pending_purchase.status, pending_purchase.failure_reason) == ("paid", "")
    assert CreditGrant.objects.filter(source="purchase").count() == 1
    assert not Notification.objects.exists() and mail.outbox == []


def test_a_success_after_a_failure_grants_once_and_the_failure_repeated_tells_the_customer_once(
        stripe_endpoint, pending_purchase, django_capture_on_commit_callbacks):
    failed = intent(pending_purchase, "requires_payment_method")
    with django_capture_on_commit_callbacks(execute=True):
        posted(stripe_endpoint, stripe_event("evt_ko", "payment_intent.payment_failed", failed),
               stripe_event("evt_ko", "payment_intent.payment_failed", failed),  # the same event again
               stripe_event("evt_ko2", "payment_intent.payment_failed", failed),  # Stripe's second report
               stripe_event("evt_ok", "payment_intent.succeeded", intent(pending_purchase, "succeeded")),
               stripe_event("evt_ok", "payment_intent.succeeded", intent(pending_purchase, "succeeded")))

    pending_purchase.refresh_from_db()
    assert pending_purchase.status == "paid"  # the customer's retried card paid
    assert CreditGrant.objects.filter(source="purchase").count() == 1
    assert Notification.objects.count() == 1 and len(mail.outbox) == 1
    assert_ledger_consistent()


@pytest.fixture
def issued_invoice(stripe_endpoint, acme):
    period = BillingPeriod.objects.get(customer=acme)
    use("12000", "e1")
    invoice = close_period(period_id=period.pk, now=utc(2026, 4, 1, 2))
    assert (invoice.status, invoice.total) == ("issued", Decimal("53.00"))
    return invoice


def stripe_invoice(invoice, status: str) -> dict:
    return {"id": "in_redelivery", "object": "invoice", "status": status, "total": 5300, "currency": "usd",
            "subscription": "sub_redelivery", "metadata": {"overage_invoice": invoice.number}}


def test_invoice_events_out_of_order_end_paid_and_a_late_failure_tells_nobody(
        stripe_endpoint, issued_invoice, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        answers = posted(
            stripe_endpoint,
            stripe_event("evt_paid", "invoice.paid", stripe_invoice(issued_invoice, "paid")),
            stripe_event("evt_fin", "invoice.finalized", stripe_invoice(issued_invoice, "open")),  # late
            stripe_event("evt_succ", "invoice.payment_succeeded", stripe_invoice(issued_invoice, "paid")),
            stripe_event("evt_fail", "invoice.payment_failed", stripe_invoice(issued_invoice, "open")),  # late
            stripe_event("evt_paid", "invoice.paid", stripe_invoice(issued_invoice, "paid")),  # again
        )

    assert answers == [f"invoice {issued_invoice.number} paid".encode(), b"ignored",
                       f"invoice {issued_invoice.number} paid".encode(),
                       f"invoice {issued_invoice.number} already paid: unchanged".encode(), b"duplicate"]
    issued_invoice.refresh_from_db()
    assert (issued_invoice.status, issued_invoice.stripe_status, issued_invoice.stripe_total) == (
        "paid", "paid", Decimal("53.00"))
    assert issued_invoice.paid_at is not None
    assert not Notification.objects.exists() and mail.outbox == []


def test_a_failure_then_the_payment_ends_paid_and_a_late_past_due_leaves_it_paid(
        stripe_endpoint, issued_invoice, django_capture_on_commit_callbacks):
    issued_invoice.subscription.stripe_subscription_id = "sub_redelivery"
    issued_invoice.subscription.save(update_fields=["stripe_subscription_id"])
    past_due = {"id": "sub_redelivery", "object": "subscription", "status": "past_due"}
    with django_capture_on_commit_callbacks(execute=True):
        answers = posted(
            stripe_endpoint,
            stripe_event("evt_fail", "invoice.payment_failed", stripe_invoice(issued_invoice, "open")),
            stripe_event("evt_fail", "invoice.payment_failed", stripe_invoice(issued_invoice, "open")),
            stripe_event("evt_paid", "invoice.paid", stripe_invoice(issued_invoice, "paid")),
            stripe_event("evt_due", "customer.subscription.updated", past_due),  # sent before, arrives last
        )

    # Past due: only the invoice still unpaid (the first base fee), not the one paid meanwhile.
    assert answers[1:] == [b"duplicate", f"invoice {issued_invoice.number} paid".encode(), b"1 invoice(s) past due"]
    issued_invoice.refresh_from_db()
    assert (issued_invoice.status, issued_invoice.stripe_status) == ("paid", "paid")
    assert list(Invoice.objects.filter(stripe_status="past_due").values_list("kind", "status")) == [
        ("subscription_start", "issued")]
    assert Notification.objects.count() == 1 and len(mail.outbox) == 1  # the failure, told once
