"""Stripe, when configured: what Overage sends to Stripe.

Each write here follows one rule: look for what a previous attempt may already have
created (our stored id, or the Stripe object carrying our reference in its metadata),
create only if there is none, then store the id. A retry after a crash, a double
click or a duplicated task therefore never creates two Stripe objects. (Stripe's own
`Idempotency-Key` is sent too; it guards the same request for 24 h on real Stripe.)

Credits are never granted here: a payment grants them only when its
`payment_intent.succeeded` webhook arrives (billing/services/stripe_webhooks.py).
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

import stripe
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from djstripe.models import Customer as StripeCustomer

from billing.errors import BillingError
from billing.models import AutoTopUp, CreditPurchase, Customer, Invoice, InvoiceLine
from billing.services.commit_hooks import after_commit
from billing.services.customers import live_subscription
from billing.services.locks import lock_customer
from plans.models import Plan
from plans.money import minor_unit_exponent, round_money

logger = logging.getLogger(__name__)


def configure_sdk() -> None:
    """Point the Stripe SDK (ours and dj-stripe's) at the configured account, or at
    localstripe when STRIPE_API_BASE says so."""
    if settings.STRIPE_SECRET_KEY:
        stripe.api_key = settings.STRIPE_SECRET_KEY
    if settings.STRIPE_API_BASE:
        stripe.api_base = settings.STRIPE_API_BASE


def to_minor(amount: Decimal, currency: str) -> int:
    """Money → Stripe's integer minor units (after our half-up rounding at the line)."""
    return int(round_money(amount, currency).scaleb(minor_unit_exponent(currency)))


def from_minor(amount: int, currency: str) -> Decimal:
    return Decimal(amount).scaleb(-minor_unit_exponent(currency))


class PaymentError(BillingError):
    """Stripe refused or could not be reached; nothing was granted."""

    def __init__(self, message: str):
        super().__init__(message, code="payment_failed", status=402)


# --- Customers -----------------------------------------------------------------------------

def customer_push(*, customer_id: int) -> Customer:
    """Mirror the customer to Stripe (once) and link dj-stripe's copy."""
    _localstripe_account()
    with transaction.atomic():
        customer = lock_customer(customer_id)
        if customer.stripe_customer_id:
            return customer
        found = stripe.Customer.search(query=f"metadata['overage_customer']:'{customer.external_id}'").data \
            if _search_supported() else []
        remote = found[0] if found else stripe.Customer.create(
            name=customer.name, email=customer.email or None,
            metadata={"overage_customer": customer.external_id},
            idempotency_key=f"overage-customer-{customer.pk}",
        )
        customer.stripe_customer = StripeCustomer.sync_from_stripe_data(remote)
        customer.save(update_fields=["stripe_customer"])
    subscription_push(customer_id=customer_id)
    return customer


def _localstripe_account() -> None:
    """localstripe serves no /v1/account, which dj-stripe reads once per API key to know
    whose objects it mirrors: record a local platform account for the key instead."""
    from djstripe.models import Account, APIKey

    if not settings.STRIPE_API_BASE or APIKey.objects.filter(secret=settings.STRIPE_SECRET_KEY,
                                                             djstripe_owner_account__isnull=False).exists():
        return
    account, _ = Account.objects.get_or_create(id="acct_localstripe", defaults={"livemode": False,
                                                                                "stripe_data": {}})
    key, _ = APIKey.objects.get_or_create_by_api_key(settings.STRIPE_SECRET_KEY)
    key.djstripe_owner_account = account
    key.save()


def _search_supported() -> bool:
    # localstripe has no search endpoint; there the lock + stored id alone guard retries.
    return not settings.STRIPE_API_BASE


def stripe_customer_id(customer: Customer) -> str:
    if not customer.stripe_customer_id:
        customer = customer_push(customer_id=customer.pk)
    return customer.stripe_customer.id


# --- Saved card ----------------------------------------------------------------------------

def card_setup_intent(*, customer: Customer) -> stripe.SetupIntent:
    """A SetupIntent the portal confirms with Stripe Elements to save a card for later
    (off-session) payments."""
    return stripe.SetupIntent.create(customer=stripe_customer_id(customer), payment_method_types=["card"],
                                     usage="off_session", metadata={"overage_customer": customer.external_id})


@transaction.atomic
def card_save(*, customer_id: int, setup_intent_id: str) -> Customer:
    """Make the card of a succeeded SetupIntent the customer's card for payments. Called
    by the portal after Elements confirms, and by the `setup_intent.succeeded` webhook;
    whichever comes second changes nothing."""
    customer = lock_customer(customer_id)
    intent = stripe.SetupIntent.retrieve(setup_intent_id)
    if intent.status != "succeeded" or intent.customer != stripe_customer_id(customer):
        raise BillingError("That card setup has not succeeded.", code="card_not_saved", status=400)
    method_id = intent.payment_method if isinstance(intent.payment_method, str) else intent.payment_method.id
    if customer.stripe_payment_method_id == method_id:
        return customer
    method = stripe.PaymentMethod.retrieve(method_id)
    if not method.customer:
        method = stripe.PaymentMethod.attach(method_id, customer=intent.customer)
    stripe.Customer.modify(intent.customer, invoice_settings={"default_payment_method": method_id})
    customer.stripe_payment_method_id = method_id
    customer.card_summary = card_summary(method)
    customer.save(update_fields=["stripe_payment_method_id", "card_summary"])
    after_commit(subscription_push, customer_id=customer.pk)
    return customer


def card_summary(method) -> str:
    """How the portal names a saved card: "visa •••• 4242"."""
    card = method.card
    return f"{card.brand} •••• {card.last4}" if card else "card"


# --- Paying for packs and top-ups -------------------------------------------------------------

def purchase_charge(*, purchase_id: int, off_session: bool) -> stripe.PaymentIntent:
    """Charge a pending purchase with the saved card: one PaymentIntent per purchase
    (its id is stored as the purchase's payment reference). The credits come with the
    `payment_intent.succeeded` webhook. On-session, a card that needs authentication
    leaves the intent in `requires_action` for the portal to finish with Stripe.js."""
    with transaction.atomic():
        purchase = CreditPurchase.objects.select_for_update().select_related("customer").get(pk=purchase_id)
        customer = purchase.customer
        if purchase.payment_reference:
            return stripe.PaymentIntent.retrieve(purchase.payment_reference)
        if purchase.status != CreditPurchase.Status.PENDING:
            raise BillingError("This purchase is not awaiting payment.", code="not_pending", status=409)
        if not customer.stripe_payment_method_id:
            raise BillingError("Save a card first.", code="no_card", status=400)
        try:
            intent = stripe.PaymentIntent.create(
                amount=to_minor(purchase.price, purchase.currency), currency=purchase.currency.lower(),
                customer=stripe_customer_id(customer), payment_method=customer.stripe_payment_method_id,
                confirm=True, off_session=off_session, payment_method_types=["card"],
                metadata={"overage_purchase": str(purchase.pk), "overage_customer": customer.external_id,
                          "pack": purchase.pack.code, "credits": f"{purchase.credits.normalize():f}"},
                idempotency_key=f"overage-purchase-{purchase.pk}",
            )
        except stripe.CardError as error:
            intent = error.error.payment_intent if error.error else None
            declined = error.user_message or "The card was declined."
        if intent is not None:
            purchase.payment_reference = intent.id
            purchase.save(update_fields=["payment_reference"])
            return intent
    # Declined with no intent to follow (no webhook will come): fail it now.
    from billing.services.stripe_webhooks import purchase_payment_failed

    purchase_payment_failed(purchase_id=purchase_id, reason=declined, now=timezone.now())
    raise PaymentError(declined)


# --- The base fee subscription ------------------------------------------------------------

def stripe_plan_id(plan: Plan) -> str:
    """The Stripe Plan carrying a plan's base fee (amount 0 for pure usage-based)."""
    return f"overage-{plan.code}-{plan.currency.lower()}-{plan.interval}"


def _ensure_stripe_plan(plan: Plan) -> str:
    plan_id = stripe_plan_id(plan)
    try:
        stripe.Plan.retrieve(plan_id)
    except stripe.InvalidRequestError:
        product = stripe.Product.create(name=f"{plan.name} base fee", type="service",
                                        metadata={"overage_plan": plan.code})
        stripe.Plan.create(id=plan_id, product=product.id, amount=to_minor(plan.base_price, plan.currency),
                           currency=plan.currency.lower(), interval=plan.interval, metadata={"overage_plan": plan.code})
    return plan_id


def subscription_push(*, customer_id: int) -> str | None:
    """Start the Stripe Subscription for the customer's base fee, once: at once for a
    plan with no base fee, else when the customer has saved a card. Its first invoice is
    the counterpart of our subscription-start invoice, paid when Stripe says so."""
    with transaction.atomic():
        customer = lock_customer(customer_id)
        subscription = live_subscription(customer)
        if subscription is None or subscription.stripe_subscription_id or not customer.stripe_customer_id:
            return subscription.stripe_subscription_id if subscription else None
        if subscription.plan.base_price > 0 and not customer.stripe_payment_method_id:
            return None  # started when a card is saved: Stripe charges the first base fee at once
        remote = stripe.Subscription.create(
            customer=customer.stripe_customer.id, items=[{"plan": _ensure_stripe_plan(subscription.plan)}],
            metadata={"overage_subscription": str(subscription.pk)},
            idempotency_key=f"overage-subscription-{subscription.pk}",
        )
        subscription.stripe_subscription_id = remote.id
        subscription.save(update_fields=["stripe_subscription_id"])
        first = Invoice.objects.filter(subscription=subscription, kind=Invoice.Kind.SUBSCRIPTION_START).first()
        if first is not None and remote.latest_invoice:
            stripe_invoice_record(invoice=first, remote=stripe.Invoice.retrieve(remote.latest_invoice),
                                  now=timezone.now())
        return remote.id


# --- Period invoices -----------------------------------------------------------------------

def invoice_push(*, invoice_id: int) -> Invoice:
    """Send a period-close invoice to Stripe: each overage line becomes an InvoiceItem on
    the subscription, and the subscription's invoice for the next period (its base fee
    plus those items) is created and charged. Its total must equal ours to the cent;
    `stripe_total` records Stripe's, and the admin flags a difference."""
    with transaction.atomic():
        invoice = (Invoice.objects.select_for_update(of=("self",)).select_related("subscription", "customer")
                   .get(pk=invoice_id))  # of=self: PostgreSQL cannot lock the nullable side of a join
        if invoice.stripe_invoice_id or invoice.kind != Invoice.Kind.PERIOD_CLOSE:
            return invoice
        subscription = invoice.subscription
        if subscription is None or not subscription.stripe_subscription_id:
            logger.warning("invoice %s: no Stripe subscription to bill it on", invoice.number)
            return invoice
        remote = _find_stripe_invoice(subscription.stripe_subscription_id, invoice.number)
        if remote is None:
            customer_id = invoice.customer.stripe_customer.id
            pending = {item.metadata.get("overage_invoice_line") for item in
                       stripe.InvoiceItem.list(customer=customer_id, limit=100).auto_paging_iter()
                       if not item.invoice}
            for line in invoice.lines.filter(kind=InvoiceLine.Kind.OVERAGE):
                if str(line.pk) in pending or line.amount == 0:
                    continue
                stripe.InvoiceItem.create(
                    customer=customer_id, subscription=subscription.stripe_subscription_id,
                    amount=to_minor(line.amount, invoice.currency), currency=invoice.currency.lower(),
                    description=line.description,
                    metadata={"overage_invoice": invoice.number, "overage_invoice_line": str(line.pk)},
                    idempotency_key=f"overage-line-{line.pk}",
                )
            remote = stripe.Invoice.create(customer=customer_id, subscription=subscription.stripe_subscription_id,
                                           metadata={"overage_invoice": invoice.number},
                                           idempotency_key=f"overage-invoice-{invoice.pk}")
        stripe_invoice_record(invoice=invoice, remote=remote, now=timezone.now())
    if remote.status == "draft" and invoice.total > 0:
        try:
            remote = stripe.Invoice.pay(remote.id)
        except stripe.StripeError as error:  # no card yet, or declined: Stripe keeps it open; webhooks follow
            logger.info("invoice %s: Stripe could not charge it now: %s", invoice.number, error)
            remote = stripe.Invoice.retrieve(remote.id)
        with transaction.atomic():
            locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
            stripe_invoice_record(invoice=locked, remote=remote, now=timezone.now())
    return Invoice.objects.get(pk=invoice.pk)


def _find_stripe_invoice(subscription_id: str, number: str):
    for remote in stripe.Invoice.list(subscription=subscription_id, limit=100).auto_paging_iter():
        if (remote.metadata or {}).get("overage_invoice") == number:
            return remote
    return None


def stripe_invoice_record(*, invoice: Invoice, remote, now: datetime, status: str = "") -> Invoice:
    """Record Stripe's side of an invoice (id, status, total). Stripe saying "paid" marks
    ours paid: the webhook that also says so may come later, twice, or never (a resync)."""
    invoice.stripe_invoice_id = remote["id"]
    invoice.stripe_status = status or remote["status"]
    invoice.stripe_total = from_minor(remote["total"], invoice.currency)
    invoice.stripe_synced_at = now
    fields = ["stripe_invoice_id", "stripe_status", "stripe_total", "stripe_synced_at"]
    if invoice.stripe_status == "paid" and invoice.status == Invoice.Status.ISSUED:
        invoice.status, invoice.paid_at = Invoice.Status.PAID, now
        fields += ["status", "paid_at"]
    invoice.save(update_fields=fields)
    return invoice


def invoice_refresh(*, invoice: Invoice, now: datetime) -> Invoice:
    """Re-read an invoice's Stripe counterpart (status, total)."""
    if not invoice.stripe_invoice_id:
        return invoice
    return stripe_invoice_record(invoice=invoice, remote=stripe.Invoice.retrieve(invoice.stripe_invoice_id), now=now)


def topup_payment_failed(*, customer: Customer) -> AutoTopUp | None:
    """Count a failed top-up payment; after OVERAGE_TOPUP_MAX_FAILURES in a row, switch
    automatic top-up off (the customer turns it back on in the portal)."""
    topup = AutoTopUp.objects.select_for_update().filter(customer=customer).first()
    if topup is None:
        return None
    topup.consecutive_failures += 1
    fields = ["consecutive_failures"]
    if topup.enabled and topup.consecutive_failures >= settings.OVERAGE_TOPUP_MAX_FAILURES:
        topup.enabled = False
        topup.disabled_reason = (f"Switched off after {topup.consecutive_failures} failed payments in a row; "
                                 f"update your card and turn it back on.")
        fields += ["enabled", "disabled_reason"]
    topup.save(update_fields=fields)
    return topup


# --- Webhook endpoint -----------------------------------------------------------------------

WEBHOOK_ENDPOINT_ID = "we_overage"


def webhook_endpoint_ensure(*, base_url: str):
    """The dj-stripe endpoint Stripe posts to, with the signing secret from
    STRIPE_WEBHOOK_SECRET. Returns it; its URL is `webhook_url(endpoint, base_url)`.
    Against localstripe the endpoint is also registered there, so it delivers."""
    from djstripe.models import WebhookEndpoint

    if not settings.STRIPE_WEBHOOK_SECRET:
        raise BillingError("Set STRIPE_WEBHOOK_SECRET first (the endpoint's signing secret).", code="not_configured")
    endpoint = WebhookEndpoint.objects.filter(id=WEBHOOK_ENDPOINT_ID).first() or WebhookEndpoint(
        id=WEBHOOK_ENDPOINT_ID, livemode=settings.STRIPE_LIVE_MODE, enabled_events=["*"], status="enabled")
    endpoint.secret = settings.STRIPE_WEBHOOK_SECRET
    endpoint.url = webhook_url(endpoint, base_url)
    endpoint.save()
    if settings.STRIPE_API_BASE:
        import requests

        requests.post(f"{settings.STRIPE_API_BASE}/_config/webhooks/overage",
                      json={"url": endpoint.url, "secret": endpoint.secret}, timeout=10).raise_for_status()
    return endpoint


def webhook_url(endpoint, base_url: str) -> str:
    from django.urls import reverse

    return base_url.rstrip("/") + reverse("stripe-webhook", kwargs={"uuid": endpoint.djstripe_uuid})


def customer_resync(*, customer_id: int, now: datetime) -> list[Invoice]:
    """Re-read a customer from Stripe: dj-stripe's copy, the default card, and each of
    its invoices' Stripe status and total. Returns the invoices mirrored in Stripe."""
    customer = customer_push(customer_id=customer_id)
    remote = stripe.Customer.retrieve(customer.stripe_customer.id)
    StripeCustomer.sync_from_stripe_data(remote)
    default = (remote.invoice_settings or {}).get("default_payment_method")
    if default and default != customer.stripe_payment_method_id:
        Customer.objects.filter(pk=customer.pk).update(
            stripe_payment_method_id=default, card_summary=card_summary(stripe.PaymentMethod.retrieve(default)))
    invoices = list(Invoice.objects.filter(customer=customer).exclude(stripe_invoice_id="").order_by("issued_at"))
    for invoice in invoices:
        invoice_refresh(invoice=invoice, now=now)
    return invoices
