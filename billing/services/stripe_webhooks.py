"""Stripe webhooks: what Overage does when Stripe reports something.

The endpoint (billing/stripe_views.py) keeps every delivery as a dj-stripe
WebhookEventTrigger, verifies its signature (400 and logged when it is bad or missing)
and passes the event to `process_stripe_event`. Each event is acted on once, by its id (`StripeEventReceipt`), and
each action is itself idempotent and monotonic, so duplicated and out-of-order
deliveries change nothing twice: a purchase is granted once (keyed by its
PaymentIntent), a paid invoice never goes back to failed, a failure after a success is
ignored.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import AutoTopUp, CreditPurchase, Customer, Invoice, Notification, StripeEventReceipt
from billing.services.purchases import complete_purchase
from billing.services.stripe_sync import card_save, stripe_invoice_record, topup_payment_failed
from billing.services.commit_hooks import enqueue

logger = logging.getLogger(__name__)


@transaction.atomic
def process_stripe_event(event: dict, *, now: datetime) -> str:
    """Act on one Stripe event once. Returns what was done (also stored)."""
    try:
        with transaction.atomic():
            receipt = StripeEventReceipt.objects.create(event_id=event["id"], type=event.get("type", ""),
                                                        processed_at=now)
    except IntegrityError:
        return "duplicate"
    handler = HANDLERS.get(receipt.type)
    outcome = handler(event["data"]["object"], now) if handler else "ignored"
    receipt.outcome = outcome[:255]
    receipt.save(update_fields=["outcome"])
    logger.info("stripe event %s %s: %s", receipt.type, receipt.event_id, outcome)
    return outcome


def _purchase_for(intent: dict) -> CreditPurchase | None:
    purchase = CreditPurchase.objects.filter(payment_reference=intent["id"]).first()
    if purchase is None and (intent.get("metadata") or {}).get("overage_purchase", "").isdigit():
        purchase = CreditPurchase.objects.filter(pk=int(intent["metadata"]["overage_purchase"])).first()
    return purchase


def payment_succeeded(intent: dict, now: datetime) -> str:
    purchase = _purchase_for(intent)
    if purchase is None:
        return "not a credit purchase"
    if purchase.status == CreditPurchase.Status.PAID:
        return f"purchase {purchase.pk} already granted"
    # A success after a reported failure (a retried card) still pays: grant it.
    complete_purchase(purchase_id=purchase.pk, now=now, payment_reference=intent["id"])
    if purchase.source == CreditPurchase.Source.AUTO_TOPUP:
        AutoTopUp.objects.filter(customer=purchase.customer).update(consecutive_failures=0)
    return f"purchase {purchase.pk} paid: {purchase.credits.normalize():f} credits granted"


def payment_failed(intent: dict, now: datetime) -> str:
    purchase = _purchase_for(intent)
    if purchase is None:
        return "not a credit purchase"
    error = intent.get("last_payment_error") or {}
    return purchase_payment_failed(purchase_id=purchase.pk, reason=error.get("message") or "The payment failed.",
                                   payment_reference=intent["id"], now=now)


@transaction.atomic
def purchase_payment_failed(*, purchase_id: int, reason: str, now: datetime,
                            payment_reference: str | None = None) -> str:
    """A pack or top-up payment failed: no credits, the customer is told, and a top-up
    that keeps failing is switched off. A failure reported after the success, or twice,
    changes nothing."""
    purchase = CreditPurchase.objects.select_for_update().select_related("customer", "pack").get(pk=purchase_id)
    if purchase.status != CreditPurchase.Status.PENDING:
        return f"purchase {purchase.pk} is {purchase.status}: unchanged"
    purchase.status = CreditPurchase.Status.FAILED
    purchase.failure_reason = reason[:255]
    purchase.payment_reference = payment_reference or purchase.payment_reference
    purchase.save(update_fields=["status", "failure_reason", "payment_reference"])
    customer = purchase.customer
    what = "automatic top-up" if purchase.source == CreditPurchase.Source.AUTO_TOPUP else "purchase"
    body = f"Your {what} of {purchase.pack.name} was not paid: {purchase.failure_reason} No credits were added."
    if purchase.source == CreditPurchase.Source.AUTO_TOPUP:
        topup = topup_payment_failed(customer=customer)
        if topup is not None and not topup.enabled:
            body += f" {topup.disabled_reason}"
    notify(customer, title=f"Payment failed: {purchase.pack.name}", body=body, now=now)
    return f"purchase {purchase.pk} failed"


def setup_succeeded(intent: dict, now: datetime) -> str:
    customer = Customer.objects.filter(stripe_customer__id=intent.get("customer")).first()
    if customer is None:
        return "unknown customer"
    card_save(customer_id=customer.pk, setup_intent_id=intent["id"])
    return f"card saved for {customer.external_id}"


def _invoice_for(remote: dict) -> Invoice | None:
    invoice = Invoice.objects.select_for_update().filter(stripe_invoice_id=remote["id"]).first()
    number = (remote.get("metadata") or {}).get("overage_invoice")
    if invoice is None and number:
        invoice = Invoice.objects.select_for_update().filter(number=number).first()
    return invoice


def invoice_paid(remote: dict, now: datetime) -> str:
    invoice = _invoice_for(remote)
    if invoice is None:
        return "not an Overage invoice"
    stripe_invoice_record(invoice=invoice, remote=remote, now=now, status="paid")
    return f"invoice {invoice.number} paid"


def invoice_payment_failed(remote: dict, now: datetime) -> str:
    invoice = _invoice_for(remote)
    if invoice is None:
        return "not an Overage invoice"
    if invoice.status == Invoice.Status.PAID or invoice.stripe_status == "paid":
        return f"invoice {invoice.number} already paid: unchanged"  # a late failure after the success
    invoice.stripe_status = "payment_failed"
    invoice.stripe_synced_at = now
    invoice.save(update_fields=["stripe_status", "stripe_synced_at"])
    notify(invoice.customer, title=f"Payment failed for invoice {invoice.number}",
           body="We could not charge your card for this invoice. Stripe will retry; please check your card.", now=now)
    return f"invoice {invoice.number} payment failed"


def subscription_updated(remote: dict, now: datetime) -> str:
    if remote.get("status") != "past_due":
        return f"subscription {remote.get('status')}"
    updated = (Invoice.objects.filter(subscription__stripe_subscription_id=remote["id"], status=Invoice.Status.ISSUED)
               .exclude(stripe_status="paid").update(stripe_status="past_due", stripe_synced_at=now))
    return f"{updated} invoice(s) past due"


def notify(customer: Customer, *, title: str, body: str, now: datetime) -> None:
    """In-app notification, and an email after commit when the customer has an address."""
    notification = Notification.objects.create(customer=customer, title=title, body=body, created_at=now)
    if customer.email:
        from billing import tasks

        enqueue(tasks.send_notification_email_task, notification.pk)


def email_notification(notification_id: int) -> int:
    """Email a notification to its customer, once (recorded under the row's lock, as
    alert emails are); returns the number of messages sent. An SMTP failure raises, so
    the task retries it."""
    with transaction.atomic():
        notification = Notification.objects.select_for_update().select_related("customer").get(pk=notification_id)
        if not notification.customer.email or notification.emailed_at is not None:
            return 0
        sent = send_mail(notification.title, notification.body, settings.DEFAULT_FROM_EMAIL,
                         [notification.customer.email])
        notification.emailed_at = timezone.now()
        notification.save(update_fields=["emailed_at"])
        return sent


HANDLERS = {
    "payment_intent.succeeded": payment_succeeded,
    "payment_intent.payment_failed": payment_failed,
    "setup_intent.succeeded": setup_succeeded,
    "invoice.paid": invoice_paid,
    "invoice.payment_succeeded": invoice_paid,
    "invoice.payment_failed": invoice_payment_failed,
    "customer.subscription.updated": subscription_updated,
}
