"""Customers, subscriptions and the opening of billing periods."""

from datetime import datetime, timedelta

from django.conf import settings

from django.db import IntegrityError, transaction

from billing.errors import BillingError, Conflict, NotFound
from billing.models import BillingPeriod, CreditGrant, Customer, Subscription
from billing.periods import as_utc, period_index_at, period_start
from billing.services.ledger import grant_credits
from billing.services.locks import lock_customer
from billing.services.commit_hooks import after_commit
from plans.models import Plan
from plans.money import round_money


def active_plan(code: str, *, field: str = "plan") -> Plan:
    try:
        return Plan.objects.get(code=code, is_active=True)
    except Plan.DoesNotExist:
        raise NotFound(f"No active plan with code {code!r}.", code="plan_not_found", field=field, status=422) from None


@transaction.atomic
def customer_create(*, external_id: str, name: str, email: str = "", plan_code: str,
                    started_at: datetime | None = None, now: datetime) -> Customer:
    """Create a customer subscribed to a plan. `started_at` may be in the past: every
    period from then until now is opened with its included credits."""
    plan = active_plan(plan_code)
    started_at = as_utc(started_at or now)
    if started_at > now:
        raise BillingError("started_at cannot be in the future.", code="invalid", field="started_at", status=400)
    if started_at < now - timedelta(days=settings.OVERAGE_MAX_BACKDATE_DAYS):
        raise BillingError(f"started_at may be at most {settings.OVERAGE_MAX_BACKDATE_DAYS} days in the past.",
                           code="invalid", field="started_at", status=400)
    customer = Customer(external_id=external_id, name=name, email=email)
    customer.full_clean(exclude=["external_id"])  # uniqueness is the database's job, below
    try:
        with transaction.atomic():
            customer.save()
    except IntegrityError:
        raise Conflict(f"A customer with external_id {external_id!r} already exists.", code="customer_exists",
                       field="external_id") from None
    subscription = Subscription.objects.create(
        customer=customer, plan=plan, started_at=started_at, billing_anchor=started_at
    )
    lock_customer(customer.pk)
    periods = open_periods(subscription=subscription, until=now)
    from billing.services.invoicing import invoice_subscription_start  # invoicing builds on this module

    invoice_subscription_start(subscription=subscription, period=periods[0], now=now)
    if settings.STRIPE_SECRET_KEY:
        from billing import tasks

        # After commit: the Stripe customer (and base fee subscription) mirror this one.
        after_commit(tasks.stripe_push_customer_task.delay, customer.pk)
    return customer


def customer_get(external_id: str) -> Customer:
    try:
        return Customer.objects.get(external_id=external_id)
    except Customer.DoesNotExist:
        raise NotFound(f"No customer with external_id {external_id!r}.", code="customer_not_found") from None


def live_subscription(customer: Customer) -> Subscription | None:
    return (
        Subscription.objects.select_related("plan")
        .filter(customer=customer)
        .exclude(status=Subscription.Status.CANCELED)
        .first()
    )


_UNREAD = object()


def open_periods(*, subscription: Subscription, until: datetime, last=_UNREAD) -> list[BillingPeriod]:
    """Open every billing period of `subscription` up to the one containing `until`,
    each with a grant of its plan's included credits that expires at the period's end.

    Idempotent; the caller holds the customer's lock and never asks for a period that
    has not started (`until` ≤ now), so a plan change scheduled before a boundary always
    applies from that boundary (`pending_plan` takes effect when the period opens).

    `last`: the subscription's latest period (None: it has none), when the caller read
    it and `subscription` under this same lock, as the close does; both are then not
    read again. A stale `last` fails on the one-period-per-start constraint rather
    than opening a period twice.
    """
    if last is _UNREAD:
        subscription.refresh_from_db()  # under the lock: a concurrent plan change is seen
        last = subscription.periods.order_by("-start").first()
    elif last is not None and last.subscription_id != subscription.pk:
        raise ValueError("`last` is a period of another subscription")
    if last is not None and last.end > until:
        return []
    if until < subscription.started_at:
        return []
    anchor, interval = subscription.billing_anchor, subscription.plan.interval
    index = period_index_at(anchor, interval, last.start) + 1 if last else period_index_at(anchor, interval, subscription.started_at)
    created = []
    while True:
        start = period_start(anchor, interval, index)
        if start > until:
            break
        if subscription.pending_plan_id and last is not None:
            subscription.plan = subscription.pending_plan
            subscription.pending_plan = None
            subscription.save(update_fields=["plan", "pending_plan"])
        plan = subscription.plan
        end = period_start(anchor, interval, index + 1)
        # The first period starts when the subscription does (the anchor), later ones on
        # the anchor's rhythm.
        period = BillingPeriod.objects.create(
            subscription=subscription, customer_id=subscription.customer_id, plan=plan,
            start=max(start, subscription.started_at), end=end, included_credits=plan.included_credits,
            included_credits_level=plan.included_credits,
        )
        if plan.included_credits > 0:
            grant_credits(
                customer=subscription.customer, credits=plan.included_credits,
                source=CreditGrant.Source.PLAN_ALLOCATION, effective_at=period.start, expires_at=period.end,
                period=period, idempotency_key=f"included:period:{period.pk}", new=True,  # period just created
                description=f"Included in {plan.name}", now=period.start,
                # The base fee pays for the included credits (revenue is recognised
                # as they are used; the rest at expiry).
                cost=round_money(plan.base_price, plan.currency), currency=plan.currency,
            )
        created.append(period)
        last = period
        index += 1
    return created


def period_for(subscription: Subscription, at: datetime) -> BillingPeriod | None:
    return BillingPeriod.objects.select_related("plan").filter(subscription=subscription, start__lte=at, end__gt=at).first()


def current_period(*, customer: Customer, now: datetime) -> BillingPeriod | None:
    """The customer's open period containing `now`, opening periods if time has moved
    on since the last one (takes the customer lock only when there is work)."""
    subscription = live_subscription(customer)
    if subscription is None:
        return None
    period = period_for(subscription, now)
    if period is None:
        with transaction.atomic():
            lock_customer(customer.pk)
            open_periods(subscription=subscription, until=now)
        period = period_for(subscription, now)
    return period


@transaction.atomic
def subscription_set_paused(*, customer: Customer, paused: bool, now: datetime) -> Subscription:
    """Pause usage (every check and event is refused with reason `paused`) or resume it.
    Billing goes on: periods still close and base fees are still invoiced."""
    lock_customer(customer.pk)
    subscription = live_subscription(customer)
    if subscription is None:
        raise BillingError("The customer has no live subscription.", code="no_subscription")
    subscription.status = Subscription.Status.PAUSED if paused else Subscription.Status.ACTIVE
    subscription.save(update_fields=["status"])
    return subscription
