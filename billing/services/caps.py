"""Spend caps: the most overage money a customer may run up in a period.

- The business sets a cap per plan (`Plan.overage_cap`) and may override it per
  customer (`Customer.overage_cap_override`).
- The customer may set a lower cap of their own (`Customer.spend_cap`); it can never
  exceed the business's.
- Plans with cap behaviour `approval` let the customer (or an admin) approve a higher
  cap for the current period (`SpendCapApproval`); the latest approval for a period
  replaces the other caps for that period. Plans with `pause` stay paused until the
  next period or until a cap setting is raised.
"""

from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.errors import BillingError
from billing.models import BillingPeriod, Customer, SpendCapApproval
from billing.services.locks import lock_customer
from plans.models import Plan
from plans.money import format_money


def business_cap(plan: Plan, customer: Customer) -> Decimal | None:
    return customer.overage_cap_override if customer.overage_cap_override is not None else plan.overage_cap


def effective_overage_cap(plan: Plan, customer: Customer, period: BillingPeriod | None = None) -> Decimal | None:
    """The overage money cap in force (None = uncapped)."""
    business = business_cap(plan, customer)
    if period is not None and plan.cap_behaviour == Plan.CapBehaviour.APPROVAL:
        approved = SpendCapApproval.objects.filter(period=period).order_by("-approved_at", "-id").first()
        if approved is not None:
            business = approved.cap
    # The customer's own cap always applies: an approval clears it (see
    # approve_higher_cap), and a cap they set afterwards lowers the approved one.
    caps = [cap for cap in (business, customer.spend_cap) if cap is not None]
    return min(caps) if caps else None


@transaction.atomic
def customer_set_spend_cap(*, customer: Customer, spend_cap: Decimal | None, now: datetime) -> Customer:
    """The customer's own cap (None removes it). It may only lower the business's cap."""
    customer = lock_customer(customer.pk)
    if spend_cap is not None:
        if spend_cap < 0:
            raise BillingError("A spend cap cannot be negative.", code="invalid", field="spend_cap", status=400)
        from billing.services.customers import live_subscription  # customers → ledger → caps

        subscription = live_subscription(customer)
        limit = business_cap(subscription.plan, customer) if subscription else None
        if limit is not None and spend_cap > limit:
            raise BillingError(f"The spend cap cannot exceed the plan's cap of "
                               f"{format_money(limit, subscription.plan.currency)}.",
                               code="spend_cap_above_business_cap", field="spend_cap")
    customer.spend_cap = spend_cap
    customer.save(update_fields=["spend_cap"])
    return customer


@transaction.atomic
def approve_higher_cap(*, customer: Customer, cap: Decimal, now: datetime, approved_by=None,
                       note: str = "") -> SpendCapApproval:
    """Approve a higher overage cap for the current period (plans with cap behaviour
    `approval`)."""
    from billing.services.customers import current_period  # customers → ledger → caps

    lock_customer(customer.pk)
    period = current_period(customer=customer, now=now)
    if period is None:
        raise BillingError("The customer has no current period.", code="no_subscription")
    if period.plan.cap_behaviour != Plan.CapBehaviour.APPROVAL:
        raise BillingError("This plan pauses at its cap; it does not take approvals.", code="approval_not_allowed")
    current = effective_overage_cap(period.plan, customer, period)
    if current is not None and cap <= current:
        raise BillingError(f"An approval must raise the cap above the current "
                           f"{format_money(current, period.plan.currency)}.", code="cap_not_higher", field="cap")
    # Approving a higher cap supersedes the customer's own lower cap; they may set a new
    # one afterwards, which then lowers the approved cap again.
    Customer.objects.filter(pk=customer.pk).update(spend_cap=None)
    return SpendCapApproval.objects.create(customer=customer, period=period, cap=cap, approved_at=now,
                                           approved_by=approved_by, note=note)
