"""Credit packs: buying one, and automatic top-up.

A purchase is recorded first (pending) and its credits are granted once, when it is
paid: at once in local mode, on the payment webhook when Stripe is configured. Each
purchase gets its own receipt (a paid `pack_purchase` invoice); period invoices never
include packs.

If the plan says so (`purchases_pay_down_overage`, default on), credits bought while
the customer is in overage first pay down the current period's not-yet-invoiced
overage credits, which then are not billed: a `consume` entry on the new grant and an
opposite `overage` entry, with no event.
"""

import math
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum

from billing.errors import BillingError, Conflict, NotFound
from billing.models import AutoTopUp, BillingPeriod, CreditGrant, CreditPurchase, Customer, Invoice, InvoiceLine, LedgerEntry
from billing.services.customers import live_subscription, open_periods, period_for
from billing.services.invoicing import DraftInvoice, DraftLine, issue_invoice, overage_billed_through
from billing.services.ledger import grant_credits
from billing.services.locks import lock_customer
from billing.services.commit_hooks import enqueue
from plans.models import CreditPack
from plans.money import ZERO, format_credits, round_money


def payments_through_stripe() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


@transaction.atomic
def purchase_pack(*, customer: Customer, pack_code: str, idempotency_key: str, now: datetime,
                  source: str = CreditPurchase.Source.MANUAL) -> tuple[CreditPurchase, bool]:
    """Buy a pack. Idempotent by key: a repeat returns the first purchase; the same key
    for another pack is a conflict. Returns (purchase, created)."""
    lock_customer(customer.pk)
    existing = CreditPurchase.objects.select_related("pack").filter(customer=customer,
                                                                    idempotency_key=idempotency_key).first()
    if existing is not None:
        if existing.pack.code != pack_code:
            raise Conflict("This idempotency_key was used to buy another pack.", code="idempotency_conflict",
                           field="idempotency_key")
        return existing, False
    pack = CreditPack.objects.filter(code=pack_code, is_active=True).first()
    if pack is None:
        raise NotFound(f"No pack on sale with code {pack_code!r}.", code="pack_not_found", field="pack", status=422)
    subscription = live_subscription(customer)
    if subscription is not None and subscription.plan.currency != pack.currency:
        raise BillingError(f"This pack is sold in {pack.currency}; the customer is billed in "
                           f"{subscription.plan.currency}.", code="currency_mismatch", field="pack")
    purchase = CreditPurchase.objects.create(
        customer=customer, pack=pack, source=source, credits=pack.credits, price=pack.price, currency=pack.currency,
        idempotency_key=idempotency_key, created_at=now,
    )
    if not payments_through_stripe():
        _complete(purchase, now=now)
    elif source == CreditPurchase.Source.AUTO_TOPUP:
        from billing import tasks

        # Off-session with the saved card, after commit; credits come with the webhook.
        enqueue(tasks.stripe_charge_purchase_task, purchase.pk, True)
    return purchase, True


@transaction.atomic
def complete_purchase(*, purchase_id: int, now: datetime, payment_reference: str | None = None) -> CreditPurchase:
    """Mark a purchase paid and grant its credits, exactly once (a payment webhook
    delivered three times grants once)."""
    customer_id = CreditPurchase.objects.filter(pk=purchase_id).values_list("customer_id", flat=True).first()
    if customer_id is None:
        raise NotFound("No such purchase.", code="purchase_not_found")
    lock_customer(customer_id)
    purchase = CreditPurchase.objects.select_related("pack", "customer").get(pk=purchase_id)
    if purchase.status != CreditPurchase.Status.PAID:
        if payment_reference:
            purchase.payment_reference = payment_reference
        _complete(purchase, now=now)
    return purchase


def _complete(purchase: CreditPurchase, *, now: datetime) -> None:
    """Grant, pay down overage, write the receipt (caller holds the customer lock)."""
    customer, pack = purchase.customer, purchase.pack
    source = (CreditGrant.Source.AUTO_TOPUP if purchase.source == CreditPurchase.Source.AUTO_TOPUP
              else CreditGrant.Source.PURCHASE)
    grant = grant_credits(
        customer=customer, credits=purchase.credits, source=source, effective_at=now,
        expires_at=now + timedelta(days=pack.expires_after_days) if pack.expires_after_days else None,
        idempotency_key=f"purchase:{purchase.pk}", description=pack.name, pack=pack, cost=purchase.price,
        currency=purchase.currency, now=now,
    )
    _pay_down_overage(customer, grant, now)
    draft = DraftInvoice(customer=customer, kind=Invoice.Kind.PACK_PURCHASE, currency=purchase.currency, lines=[
        DraftLine(kind=InvoiceLine.Kind.PACK, description=f"{pack.name} ({format_credits(purchase.credits)} credits)",
                  amount=round_money(purchase.price, purchase.currency), credits=purchase.credits)])
    purchase.invoice = issue_invoice(draft, now=now, idempotency_key=f"purchase:{purchase.pk}", paid=True)
    purchase.grant = grant
    purchase.status = CreditPurchase.Status.PAID
    purchase.paid_at = now
    purchase.save(update_fields=["invoice", "grant", "status", "paid_at", "payment_reference"])


def _period_paying_down(customer: Customer, now: datetime) -> BillingPeriod | None:
    """The current period, if bought credits pay down its overage."""
    subscription = live_subscription(customer)
    if subscription is None:
        return None
    open_periods(subscription=subscription, until=now)
    period = period_for(subscription, now)
    # Only overage that would be billed is paid down: on a plan with overage off, usage
    # past the credits is never billed, and bought credits must not be spent on it.
    if period is None or not period.plan.overage_enabled or not period.plan.purchases_pay_down_overage:
        return None
    return period


def _overage_to_pay_down(customer: Customer, now: datetime) -> Decimal:
    period = _period_paying_down(customer, now)
    return period.overage_credits - overage_billed_through(period) if period else ZERO


def _pay_down_overage(customer: Customer, grant: CreditGrant, now: datetime) -> None:
    period = _period_paying_down(customer, now)
    if period is None:
        return
    amount = min(period.overage_credits - overage_billed_through(period), grant.remaining)
    if amount <= ZERO:
        return
    LedgerEntry.objects.bulk_create([
        LedgerEntry(customer=customer, kind=LedgerEntry.Kind.CONSUME, credits=-amount, grant=grant, period=period,
                    effective_at=now, note="Paid down this period's overage"),
        LedgerEntry(customer=customer, kind=LedgerEntry.Kind.OVERAGE, credits=amount, period=period,
                    effective_at=now, note=f"Overage paid down by {grant.description}"),
    ])
    grant.remaining -= amount
    CreditGrant.objects.filter(pk=grant.pk).update(remaining=grant.remaining)
    BillingPeriod.objects.filter(pk=period.pk).update(overage_credits=period.overage_credits - amount)


# --- Automatic top-up ---------------------------------------------------------------------

def credits_remaining(customer: Customer, now: datetime) -> Decimal:
    """Credits the customer can still draw now (all grants, less active holds)."""
    from billing.selectors import balance_at

    balance = balance_at(customer, now, now)
    return balance.total - balance.held


@transaction.atomic
def run_auto_topup(*, customer_id: int, now: datetime) -> CreditPurchase | None:
    """Top up when the balance has fallen below the threshold. Runs under the customer
    lock, and a top-up lifts the balance above the threshold, so however many checks
    race after one crossing, exactly one buys. Buys as many packs as needed to get
    above the threshold (refill mode: to the target), within the monthly limits."""
    if not AutoTopUp.objects.filter(customer_id=customer_id, enabled=True).exists():
        return None  # most customers: no lock taken after every batch
    customer = lock_customer(customer_id)
    topup = AutoTopUp.objects.select_related("pack").filter(customer=customer, enabled=True).first()
    if topup is None or not topup.pack.is_active:
        return None
    if CreditPurchase.objects.filter(customer=customer, source=CreditPurchase.Source.AUTO_TOPUP,
                                     status=CreditPurchase.Status.PENDING).exists():
        return None  # a top-up is awaiting payment (Stripe): its credits are on their way
    balance = credits_remaining(customer, now)
    if balance >= topup.threshold:
        return None
    target = topup.target_balance if topup.mode == AutoTopUp.Mode.REFILL and topup.target_balance else topup.threshold
    # Bought credits first pay down unbilled overage (when the plan says so), so that
    # part does not lift the balance: count it in, or the next check would buy again.
    deficit = target - balance + _overage_to_pay_down(customer, now)
    packs = max(1, math.ceil(deficit / topup.pack.credits))
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    this_month = CreditPurchase.objects.filter(customer=customer, source=CreditPurchase.Source.AUTO_TOPUP,
                                               created_at__gte=month_start).exclude(status=CreditPurchase.Status.FAILED)
    if topup.max_per_month is not None:
        packs = min(packs, topup.max_per_month - this_month.count())
    if topup.max_amount_per_month is not None:
        spent = this_month.aggregate(total=Sum("price"))["total"] or ZERO
        packs = min(packs, int((topup.max_amount_per_month - spent) // topup.pack.price) if topup.pack.price else packs)
    if packs <= 0:
        return None  # the monthly limit is reached
    sequence = CreditPurchase.objects.filter(customer=customer, source=CreditPurchase.Source.AUTO_TOPUP).count()
    last = None
    for number in range(sequence + 1, sequence + packs + 1):
        last, _ = purchase_pack(customer=customer, pack_code=topup.pack.code, idempotency_key=f"auto-topup:{number}",
                                source=CreditPurchase.Source.AUTO_TOPUP, now=now)
    return last


@transaction.atomic
def auto_topup_configure(*, customer: Customer, enabled: bool, pack_code: str, threshold: Decimal,
                         mode: str = AutoTopUp.Mode.PACK, target_balance: Decimal | None = None,
                         max_per_month: int | None = None, max_amount_per_month: Decimal | None = None) -> AutoTopUp:
    """Create or replace a customer's automatic top-up settings. Re-enabling clears the
    record of past payment failures."""
    lock_customer(customer.pk)
    pack = CreditPack.objects.filter(code=pack_code, is_active=True).first()
    if pack is None:
        raise NotFound(f"No pack on sale with code {pack_code!r}.", code="pack_not_found", field="pack", status=422)
    if mode == AutoTopUp.Mode.REFILL and (target_balance is None or target_balance <= threshold):
        raise BillingError("Refill mode needs a target balance above the threshold.", code="invalid",
                           field="target_balance", status=400)
    subscription = live_subscription(customer)
    if subscription is not None and subscription.plan.currency != pack.currency:
        raise BillingError(f"This pack is sold in {pack.currency}; the customer is billed in "
                           f"{subscription.plan.currency}.", code="currency_mismatch", field="pack")
    topup, _ = AutoTopUp.objects.update_or_create(customer=customer, defaults=dict(
        enabled=enabled, pack=pack, threshold=threshold, mode=mode,
        target_balance=target_balance if mode == AutoTopUp.Mode.REFILL else None,
        max_per_month=max_per_month, max_amount_per_month=max_amount_per_month,
    ))
    if enabled and (topup.consecutive_failures or topup.disabled_reason):
        topup.consecutive_failures, topup.disabled_reason = 0, ""
        topup.save(update_fields=["consecutive_failures", "disabled_reason"])
    return topup
