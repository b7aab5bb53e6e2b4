"""Invoices: gap-free numbering, the period close, the upcoming invoice, receipts.

The period close is one transaction per (subscription, period) under the customer's
lock: open the next period, roll over or expire the closed period's included credits,
write the invoice (overage for the closed period, base fee in advance for the next),
mark the period closed, and take the invoice's number last (the number sequence is the
one row every close locks). A crash anywhere rolls all of it back, and a second run — or
a second worker — finds the period closed and returns the same invoice. The upcoming
invoice is built by the same `build_close_invoice`, without saving it.

A close run starts from the oldest due period of each subscription (`due_period_ids`)
and closes the later ones after it, in order. Beat fans those periods out to the
workers in chunks (`tasks.close_due_periods_task`); `close_due_periods` runs the same
chunks in one process (`manage.py close_periods`). A chunk closes its periods a few
dozen per transaction with the same rules (`closing.py`), and one by one what it cannot.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q, Sum

from billing.errors import BillingError, NotFound
from billing.models import (
    BillingPeriod, CreditGrant, Customer, Invoice, InvoiceLine, InvoiceNumberSequence, LedgerEntry, Subscription,
)
from billing.periods import period_index_at, period_start
from billing.services.customers import open_periods
from billing.services.ledger import expire_grant, grant_credits
from billing.services.locks import lock_customer
from billing.services.commit_hooks import enqueue
from plans.models import Plan
from plans.money import ZERO, format_credits, round_money
from plans.pricing import price_overage, price_overage_band

log = logging.getLogger(__name__)


@dataclass
class DraftLine:
    kind: str
    description: str
    amount: Decimal
    credits: Decimal | None = None
    unit_price: Decimal | None = None
    service_start: datetime | None = None
    service_end: datetime | None = None
    period: BillingPeriod | None = None
    overage_from: Decimal | None = None
    overage_to: Decimal | None = None
    through_entry_id: int | None = None
    tiers: list = field(default_factory=list)


@dataclass
class DraftInvoice:
    customer: Customer
    kind: str
    currency: str
    subscription: Subscription | None = None
    period: BillingPeriod | None = None
    lines: list[DraftLine] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), ZERO)


# --- Building lines ---------------------------------------------------------------------

def base_fee_line(plan: Plan, start: datetime, end: datetime) -> DraftLine | None:
    """The base fee, billed in advance for [start, end). Pure usage-based plans have none."""
    if plan.base_price <= ZERO:
        return None
    return DraftLine(kind=InvoiceLine.Kind.BASE_FEE, description=f"{plan.name} base fee",
                     amount=round_money(plan.base_price, plan.currency), service_start=start, service_end=end)


def overage_billed(period: BillingPeriod) -> tuple[Decimal, Decimal]:
    """(overage credits of `period` already on an invoice, money already on its overage
    lines), in one query. Void invoices count: voiding waives a band and its money, it
    does not re-bill them (progressive billing)."""
    billed = InvoiceLine.objects.filter(period=period, kind=InvoiceLine.Kind.OVERAGE).aggregate(
        through=Max("overage_to"), invoiced=Sum("amount"))
    return billed["through"] or ZERO, billed["invoiced"] or ZERO


def overage_billed_through(period: BillingPeriod) -> Decimal:
    """Overage credits of `period` already on an invoice."""
    return overage_billed(period)[0]


def overage_waived_amount(period: BillingPeriod) -> Decimal:
    """Money of `period`'s overage lines on void invoices."""
    return InvoiceLine.objects.filter(period=period, kind=InvoiceLine.Kind.OVERAGE,
                                      invoice__status=Invoice.Status.VOID).aggregate(total=Sum("amount"))["total"] or ZERO


def overage_line(period: BillingPeriod, *, upto: Decimal | None = None) -> DraftLine | None:
    """The not-yet-invoiced overage of `period` (up to `upto` overage credits), with its
    tiers and a link to the usage behind it.

    Its amount is the price of the period's overage so far under the period's plan, less
    what earlier (progressive) lines already invoiced. Without a plan change in between
    that is exactly the band's price; after an upgrade it still makes the invoices of a
    period add up to the price of the whole at the plan it closes on (never below 0)."""
    end = period.overage_credits if upto is None else upto
    if end <= ZERO:
        return None  # nothing to bill, whatever was billed before: no query
    start, invoiced = overage_billed(period)
    if end <= start:
        return None
    through_entry_id = LedgerEntry.objects.filter(period=period, kind=LedgerEntry.Kind.OVERAGE).aggregate(
        last=Max("id"))["last"]
    return priced_overage_line(period, start=start, end=end, invoiced=invoiced, through_entry_id=through_entry_id,
                               tiers=list(period.plan.overage_tiers.all()))


def priced_overage_line(period: BillingPeriod, *, start: Decimal, end: Decimal, invoiced: Decimal,
                        through_entry_id: int | None, tiers: list) -> DraftLine:
    """The overage line of `period` for its overage credits from `start` to `end`, when
    `invoiced` money of its overage is on invoices already; no query (`overage_line`
    reads the figures one period at a time, the chunk close for many at once)."""
    plan = period.plan
    band = price_overage_band(plan, start, end, tiers=tiers)
    amount = max(price_overage(plan, end, tiers=tiers).amount - invoiced, ZERO)
    flat = len({tier.unit_price for tier in band.tiers}) == 1
    if not plan.overage_enabled:
        description = f"Usage beyond the plan's credits, not billed: {format_credits(band.credits)} credits"
    else:
        description = f"Overage: {format_credits(band.credits)} credits"
    return DraftLine(
        kind=InvoiceLine.Kind.OVERAGE, description=description, amount=amount, credits=band.credits,
        unit_price=band.tiers[0].unit_price if flat and band.tiers else None,
        service_start=period.start, service_end=period.end, period=period, overage_from=start, overage_to=end,
        through_entry_id=through_entry_id,
        tiers=[{"lower": str(t.lower), "upper": None if t.upper is None else str(t.upper), "credits": str(t.credits),
                "unit_price": str(t.unit_price), "amount": str(t.amount)} for t in band.tiers],
    )


def next_period_terms(period: BillingPeriod) -> tuple[Plan, datetime, datetime] | None:
    """(plan, start, end) of the period after `period`, if the subscription goes on."""
    subscription = period.subscription
    if subscription.status == Subscription.Status.CANCELED:
        return None
    following = BillingPeriod.objects.select_related("plan").filter(subscription=subscription,
                                                                     start=period.end).first()
    if following is not None:
        return following.plan, following.start, following.end
    plan = subscription.pending_plan or subscription.plan
    index = period_index_at(subscription.billing_anchor, subscription.plan.interval, period.start) + 1
    return plan, period.end, period_start(subscription.billing_anchor, plan.interval, index + 1)


_UNKNOWN = object()


def build_close_invoice(period: BillingPeriod, *, next_period=_UNKNOWN, overage=_UNKNOWN) -> DraftInvoice:
    """What closing `period` bills: its remaining overage, and the next period's base fee
    in advance. The real close and the upcoming invoice both use this. The close passes
    the `next_period` it holds (None: the subscription ends), sparing a query; the chunk
    close also passes the `overage` line (or None) it priced from figures read for the
    whole chunk."""
    draft = DraftInvoice(customer=period.customer, kind=Invoice.Kind.PERIOD_CLOSE, currency=period.plan.currency,
                         subscription=period.subscription, period=period)
    line = overage_line(period) if overage is _UNKNOWN else overage
    if line is not None:
        draft.lines.append(line)
    if next_period is _UNKNOWN:
        terms = next_period_terms(period)
    else:
        terms = None if next_period is None else (next_period.plan, next_period.start, next_period.end)
    if terms is not None:
        fee = base_fee_line(*terms)
        if fee is not None:
            draft.lines.append(fee)
    return draft


# --- Writing invoices ---------------------------------------------------------------------

def next_invoice_number() -> str:
    """The next number of the gap-free sequence. The UPDATE locks the sequence's row until
    the caller's transaction ends, so every invoice writer queues here: take the number
    as late as possible in the transaction."""
    return next_invoice_numbers(1)[0]


def next_invoice_numbers(count: int) -> list[str]:
    """The next `count` numbers of the gap-free sequence, in order, in one statement
    (UPDATE … RETURNING, PostgreSQL and SQLite ≥ 3.35 alike) instead of a locking read
    and a write. Locks the sequence's row as `next_invoice_number` does."""
    table = InvoiceNumberSequence._meta.db_table
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET last_value = last_value + %s WHERE name = %s RETURNING last_value",
                       [count, "invoice"])
        row = cursor.fetchone()
    if row is None:  # the very first invoice: create the row (a racing creator wins), then take the numbers
        InvoiceNumberSequence.objects.get_or_create(name="invoice")
        return next_invoice_numbers(count)
    return [f"{settings.OVERAGE_INVOICE_PREFIX}-{value:06d}" for value in range(row[0] - count + 1, row[0] + 1)]


def unsaved_invoice(draft: DraftInvoice, *, number: str, now: datetime, idempotency_key: str | None = None,
                    paid: bool = False) -> tuple[Invoice, list[InvoiceLine]]:
    """`draft` as an issued invoice (paid at once when it totals zero or `paid`) and its
    lines, not yet saved: `issue_invoice` saves one, the chunk close many at once."""
    total = draft.total
    settled = paid or total == ZERO
    invoice = Invoice(
        number=number, customer=draft.customer, subscription=draft.subscription, period=draft.period,
        kind=draft.kind, currency=draft.currency, total=total,
        status=Invoice.Status.PAID if settled else Invoice.Status.ISSUED,
        issued_at=now, due_at=now + timedelta(days=settings.OVERAGE_INVOICE_DUE_DAYS),
        paid_at=now if settled else None, idempotency_key=idempotency_key,
    )
    lines = [
        InvoiceLine(invoice=invoice, kind=line.kind, description=line.description[:255], credits=line.credits,
                    unit_price=line.unit_price, amount=line.amount, service_start=line.service_start,
                    service_end=line.service_end, period=line.period, overage_from=line.overage_from,
                    overage_to=line.overage_to, through_entry_id=line.through_entry_id, tiers=line.tiers)
        for line in draft.lines
    ]
    return invoice, lines


def issue_invoice(draft: DraftInvoice, *, now: datetime, idempotency_key: str | None = None,
                  paid: bool = False) -> Invoice:
    """Write `draft` as an issued invoice (paid at once when it totals zero or `paid`)."""
    assert transaction.get_connection().in_atomic_block, "issue_invoice needs the caller's transaction"
    invoice, lines = unsaved_invoice(draft, number=next_invoice_number(), now=now, idempotency_key=idempotency_key,
                                     paid=paid)
    invoice.save(force_insert=True)
    InvoiceLine.objects.bulk_create(lines)
    return invoice


def invoice_subscription_start(*, subscription: Subscription, period: BillingPeriod, now: datetime) -> Invoice | None:
    """The first period's base fee, in advance, when a subscription starts."""
    fee = base_fee_line(period.plan, period.start, period.end)
    if fee is None:
        return None
    draft = DraftInvoice(customer=subscription.customer, kind=Invoice.Kind.SUBSCRIPTION_START,
                         currency=period.plan.currency, subscription=subscription, lines=[fee])
    return issue_invoice(draft, now=now, idempotency_key=f"subscription-start:{subscription.pk}")


# --- Closing periods ----------------------------------------------------------------------

@dataclass
class CreditMove:
    """One step of settling a closed period's credits: `credits` taken out of `grant`
    at `at`, expired, or (`rollover`) carried into a new grant of the next period."""

    grant: CreditGrant
    credits: Decimal
    at: datetime
    note: str
    rollover: bool = False
    # The rollover grant's terms: its description, and its share of the source grant's
    # cost basis (revenue follows the credits).
    rollover_description: str = ""
    rollover_cost: Decimal = ZERO


def grants_settled_at_close(grants, period: BillingPeriod) -> tuple[list[CreditGrant], list[CreditGrant]]:
    """(the period's included grants, other grants that expired with it) among `grants`,
    a customer's grants with credits left, oldest first."""
    included_source = CreditGrant.Source.PLAN_ALLOCATION
    included = [g for g in grants if g.source == included_source and g.period_id == period.pk]
    expired_with_period = [g for g in grants if g.source != included_source and g.expires_at is not None
                           and g.expires_at <= period.end]
    return included, expired_with_period


def included_credits_settlement(period: BillingPeriod, next_period: BillingPeriod | None, included: list,
                                expired_with_period: list) -> list[CreditMove]:
    """What closing `period` does with credits (`grants_settled_at_close`), in order: roll
    the unused included credits (all its plan_allocation grants, prorated upgrade
    credits included) into the next period, as far as the plan allows — the cap applies
    to the period's total — and expire the rest. Rolled-over credits last one period and
    carry their share of the cost basis with them. Other credits that expired with the
    period (e.g. earlier rollovers) leave the ledger now too. Decides only: the close
    of one period and the chunk close write the moves each their own way."""
    plan = period.plan
    remaining = {grant.pk: grant.remaining for grant in included}
    unused = sum(remaining.values(), ZERO)
    carry = ZERO
    if next_period is not None and plan.rollover_policy == Plan.Rollover.ALL:
        carry = unused
    elif next_period is not None and plan.rollover_policy == Plan.Rollover.CAPPED:
        carry = min(unused, plan.rollover_max_credits or ZERO)
    moves, left = [], carry
    for grant in included:  # one rollover grant per source grant: each debit has its receiver
        if left <= ZERO:
            break
        taken = min(left, remaining[grant.pk])
        if taken <= ZERO:
            continue
        moves.append(CreditMove(
            grant=grant, credits=taken, at=period.end, rollover=True,
            note=f"Rolled over into the period starting {next_period.start:%Y-%m-%d}",
            rollover_description=f"Rolled over from {period.start:%Y-%m-%d}–{period.end:%Y-%m-%d}",
            rollover_cost=grant.cost * taken / grant.credits if grant.credits else ZERO,
        ))
        remaining[grant.pk] -= taken
        left -= taken
    for grant in included:
        if remaining[grant.pk] > ZERO:
            moves.append(CreditMove(grant=grant, credits=remaining[grant.pk], at=period.end,
                                    note="Unused included credits expired"))
    for grant in expired_with_period:
        moves.append(CreditMove(grant=grant, credits=grant.remaining, at=grant.expires_at, note="Expired"))
    return moves


def rollover_key(grant: CreditGrant) -> str:
    """The idempotency key of the grant that carries `grant`'s credits into the next period."""
    return f"rollover:grant:{grant.pk}"


def _settle_included_credits(period: BillingPeriod, next_period: BillingPeriod | None, now: datetime) -> None:
    """Write `included_credits_settlement` for one period. The caller holds the
    customer's lock, so the grants read here stay current: a grant with nothing left is
    never touched (one query for all of them)."""
    customer = period.customer
    included_source = CreditGrant.Source.PLAN_ALLOCATION
    grants = list(
        CreditGrant.objects.filter(customer=customer, remaining__gt=0)
        .filter(Q(period=period, source=included_source) | (Q(expires_at__lte=period.end) & ~Q(source=included_source)))
        .order_by("created_at", "id")
    )
    for grant in grants:
        if grant.period_id == period.pk:
            grant.period = period  # expire_grant files its entry under the grant's period: no query for it
    for move in included_credits_settlement(period, next_period, *grants_settled_at_close(grants, period)):
        if not move.rollover:
            expire_grant(grant=move.grant, customer=customer, at=move.at, note=move.note, credits=move.credits,
                         current=True)
            continue
        taken = expire_grant(grant=move.grant, customer=customer, at=move.at, credits=move.credits, current=True,
                             kind=LedgerEntry.Kind.ROLLOVER, note=move.note)
        grant_credits(
            customer=customer, credits=taken, source=CreditGrant.Source.ROLLOVER, effective_at=next_period.start,
            expires_at=next_period.end, period=next_period, idempotency_key=rollover_key(move.grant),
            description=move.rollover_description, cost=move.rollover_cost, currency=period.plan.currency, now=now,
            entry_kind=LedgerEntry.Kind.ROLLOVER, new=True,  # this period closes once: no rollover of it yet
        )


def _close_period(period_id: int, now: datetime, skip_grace: bool,
                  owner: tuple[int, int] | None = None) -> tuple[Invoice, BillingPeriod | None]:
    """`close_period` inside the caller's transaction. Also returns the next period of
    the subscription when this call closed the period (None if it was closed already,
    or if the subscription ended). `owner`: the period's (customer id, subscription id)
    if the caller read them already (they never change)."""
    assert transaction.get_connection().in_atomic_block, "closing a period needs the caller's transaction"
    if owner is None:
        owner = BillingPeriod.objects.filter(pk=period_id).order_by().values_list(
            "customer_id", "subscription_id").first()
        if owner is None:
            raise NotFound("No such billing period.", code="period_not_found")
    customer_id, subscription_id = owner
    customer = lock_customer(customer_id)
    # Under the lock: this period and the subscription's open ones — an earlier one
    # still open forbids the close, a later one is the next period, already opened.
    periods = list(
        BillingPeriod.objects.select_related("plan", "subscription")
        .filter(Q(pk=period_id) | Q(status=BillingPeriod.Status.OPEN), subscription_id=subscription_id)
        .order_by("start")
    )
    period = next(p for p in periods if p.pk == period_id)
    period.customer = customer
    if period.status == BillingPeriod.Status.CLOSED:
        return Invoice.objects.get(period=period, kind=Invoice.Kind.PERIOD_CLOSE), None
    grace = timedelta(seconds=0 if skip_grace else settings.OVERAGE_PERIOD_GRACE_SECONDS)
    if now < period.end + grace:
        raise BillingError("This period has not ended yet." if now < period.end
                           else "This period is still open for late events.", code="period_not_due")
    if any(p.start < period.start for p in periods):
        # Periods close in order: a later close must not roll credits into a period the
        # earlier one then cannot reach.
        raise BillingError("An earlier period of this subscription is still open.", code="period_not_due")
    subscription = period.subscription
    next_period = None
    if subscription.status != Subscription.Status.CANCELED:
        next_period = next((p for p in periods if p.start == period.end), None)
        if next_period is None:
            # The subscription and its latest period (every later one is open, so in
            # `periods`) were read under the lock just now: open_periods need not read
            # them again, nor the customer and plan rows already in hand.
            subscription.customer = customer
            if subscription.plan_id == period.plan_id:
                subscription.plan = period.plan
            opened = open_periods(subscription=subscription, until=period.end, last=periods[-1])
            next_period = opened[-1] if opened and opened[-1].start == period.end else (
                BillingPeriod.objects.select_related("plan").get(subscription=subscription, start=period.end))
    _settle_included_credits(period, next_period, now)
    draft = build_close_invoice(period, next_period=next_period)
    period.status = BillingPeriod.Status.CLOSED
    period.closed_at = now
    period.save(update_fields=["status", "closed_at"])
    # Last: numbering locks the sequence for every invoice writer until this commits.
    invoice = issue_invoice(draft, now=now)
    if settings.STRIPE_SECRET_KEY:
        from billing import tasks

        enqueue(tasks.stripe_push_invoice_task, invoice.pk)  # kept in the database if the broker is down
    return invoice, next_period


@transaction.atomic
def close_period(*, period_id: int, now: datetime, skip_grace: bool = False) -> Invoice:
    """Close one period, exactly once. Returns its invoice (the existing one if it was
    closed already). `skip_grace` (an admin's "close now") closes an ended period
    before its grace window is over; later late events for it are then refused."""
    return _close_period(period_id, now, skip_grace)[0]


def close_period_and_successors(*, period_id: int, now: datetime,
                                owner: tuple[int, int] | None = None) -> list[Invoice]:
    """Close a due period, then each following period of its subscription that is due as
    well (a close opens the next period, which a late run may find ended too), oldest
    first, each in its own transaction. The first failure is logged and ends the run for
    this subscription: its later periods cannot close before it anyway, and the next
    beat run retries it. Returns the invoices of the periods closed (or found closed)."""
    cutoff = now - timedelta(seconds=settings.OVERAGE_PERIOD_GRACE_SECONDS)
    invoices = []
    while period_id is not None:
        try:
            with transaction.atomic():
                invoice, next_period = _close_period(period_id, now, False, owner)
        except Exception:
            log.exception("closing billing period %s failed; it stays open and is retried next run", period_id)
            break
        invoices.append(invoice)
        period_id = next_period.pk if next_period is not None and next_period.end <= cutoff else None
    return invoices


def due_periods(now: datetime):
    cutoff = now - timedelta(seconds=settings.OVERAGE_PERIOD_GRACE_SECONDS)
    return BillingPeriod.objects.filter(status=BillingPeriod.Status.OPEN, end__lte=cutoff).order_by("end", "pk")


def due_period_ids(*, now: datetime, customer: Customer | None = None) -> list[int]:
    """The oldest due period of each subscription, oldest first: what a close run starts
    from (`close_period_and_successors` goes on to the later ones, in order). One pass
    over the due periods, however many there are."""
    periods = due_periods(now)
    if customer is not None:
        periods = periods.filter(customer=customer)
    seen, first = set(), []
    for period_id, subscription_id in periods.values_list("pk", "subscription_id").iterator(chunk_size=10_000):
        if subscription_id not in seen:
            seen.add(subscription_id)
            first.append(period_id)
    return first


def close_periods(*, period_ids: list[int], now: datetime) -> list[Invoice]:
    """Close the given periods (and their due successors); what one chunk of a fanned-out
    close run does. They close together, a few dozen per transaction, in a few
    statements for all of them (`closing.close_periods_together`); what that cannot
    close, and every period of a batch that failed, closes one by one. Periods closed
    meanwhile (a chunk delivered twice, an overlapping run) are skipped with one query
    for the chunk."""
    from billing.services.closing import close_periods_together  # it builds on this module

    still_open = {
        pk: (customer_id, subscription_id) for pk, customer_id, subscription_id in
        BillingPeriod.objects.filter(pk__in=period_ids, status=BillingPeriod.Status.OPEN).order_by()
        .values_list("pk", "customer_id", "subscription_id")
    }
    owners = {period_id: still_open[period_id] for period_id in period_ids if period_id in still_open}
    return close_periods_together(owners=owners, now=now)


def close_due_periods(*, now: datetime, customer: Customer | None = None) -> list[Invoice]:
    """Close every period whose end plus the grace window has passed, in this process:
    oldest first, in the chunks beat would send (`close_periods`), a subscription's
    periods in order. One failing period is logged and retried on the next run; it does
    not stop the others.
    (Beat fans the same work out to the workers: `tasks.close_due_periods_task`.)"""
    period_ids, size = due_period_ids(now=now, customer=customer), settings.OVERAGE_CLOSE_CHUNK_PERIODS
    invoices = []
    for start in range(0, len(period_ids), size):  # the chunks beat's workers would get
        invoices += close_periods(period_ids=period_ids[start:start + size], now=now)
    return invoices


def upcoming_invoice(*, period: BillingPeriod) -> DraftInvoice:
    """The invoice the current period would produce if it closed now."""
    return build_close_invoice(period)


def _settle_issued_invoice(invoice: Invoice, *, to: str, stamp: str, refused_code: str, now: datetime) -> Invoice:
    """Move an issued invoice to `to` (paid or void), stamping `stamp`; doing it again
    is harmless, any other starting status is refused."""
    invoice = Invoice.objects.select_for_update().get(pk=invoice.pk)
    if invoice.status == to:
        return invoice
    if invoice.status != Invoice.Status.ISSUED:
        raise BillingError(f"A {invoice.status} invoice cannot become {to}.", code=refused_code)
    invoice.status = to
    setattr(invoice, stamp, now)
    invoice.save(update_fields=["status", stamp])
    return invoice


@transaction.atomic
def invoice_mark_paid(*, invoice: Invoice, now: datetime) -> Invoice:
    """Local invoicing: an admin records the payment of an issued invoice."""
    return _settle_issued_invoice(invoice, to=Invoice.Status.PAID, stamp="paid_at", refused_code="invoice_not_payable",
                                  now=now)


@transaction.atomic
def invoice_void(*, invoice: Invoice, now: datetime) -> Invoice:
    """Cancel an unpaid overage invoice: its usage is waived, not billed again (see
    `overage_billed_through`). Invoices that bill a base fee or a proration paid for
    credits already granted (and deferred as revenue); they need a credit note, which
    does not exist yet, so they are refused. A paid invoice is refunded, not voided."""
    if invoice.lines.exclude(kind=InvoiceLine.Kind.OVERAGE).exists():
        raise BillingError("This invoice bills a base fee or proration for credits already granted; it cannot be "
                           "voided (a credit note is needed).", code="invoice_not_voidable")
    return _settle_issued_invoice(invoice, to=Invoice.Status.VOID, stamp="voided_at",
                                  refused_code="invoice_not_voidable", now=now)


# --- Progressive billing --------------------------------------------------------------------

@transaction.atomic
def bill_progressively(*, period_id: int, now: datetime) -> Invoice | None:
    """If the period's plan bills progressively and its not-yet-invoiced overage has
    reached the threshold, invoice that overage now. The close invoice later bills only
    the rest (`overage_billed_through`), and bands are priced so that the invoices of a
    period add up to exactly the price of its whole overage."""
    customer_id = BillingPeriod.objects.filter(pk=period_id).values_list("customer_id", flat=True).first()
    if customer_id is None:
        return None
    lock_customer(customer_id)
    period = BillingPeriod.objects.select_related("plan", "subscription", "customer").get(pk=period_id)
    threshold = period.plan.progressive_billing_threshold
    if period.status != BillingPeriod.Status.OPEN or threshold is None or not period.plan.overage_enabled:
        return None
    line = overage_line(period)
    if line is None or line.amount < threshold or line.amount <= ZERO:
        return None
    draft = DraftInvoice(customer=period.customer, kind=Invoice.Kind.PROGRESSIVE, currency=period.plan.currency,
                         subscription=period.subscription, period=period, lines=[line])
    return issue_invoice(draft, now=now, idempotency_key=f"progressive:{period.pk}:{line.overage_to}")


def bill_progressively_due(*, now: datetime) -> list[Invoice]:
    """Beat: progressive invoices for every open period whose unbilled overage reached its
    plan's threshold (each in its own transaction)."""
    candidates = BillingPeriod.objects.filter(status=BillingPeriod.Status.OPEN, overage_credits__gt=0,
                                              plan__progressive_billing_threshold__isnull=False)
    invoices = []
    for period_id in candidates.values_list("pk", flat=True).iterator():
        try:
            invoice = bill_progressively(period_id=period_id, now=now)
        except Exception:
            log.exception("progressive billing of period %s failed; retried next run", period_id)
            continue
        if invoice is not None:
            invoices.append(invoice)
    return invoices
