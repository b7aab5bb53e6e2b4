"""Changing a customer's plan mid-period.

- An **upgrade** (a higher base price; at equal price, more included credits) takes
  effect at once: the period switches to the new plan, the customer is invoiced the
  base-fee difference prorated to the rest of the period, and gets the included-credit
  difference prorated the same way, as a grant that expires with the period.
- A **downgrade** (anything else) takes effect at the start of the next period; the
  current period keeps its plan and credits.
- Choosing the plan in force cancels a scheduled change.
- Rolled-over and purchased credits are separate grants and survive every change.
- Each upgrade grants only the difference between the new plan and the plan the period
  is on, so no sequence of changes (downgrade then re-upgrade, up-down-up…) can grant a
  second allotment of included credits within a period.
- The period's overage is priced by the plan in force when the period closes.
- Monthly ⇄ yearly changes are refused for now.
"""

from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.errors import BillingError
from billing.models import BillingPeriod, CreditGrant, Invoice, InvoiceLine, Subscription
from billing.services.customers import active_plan, live_subscription, open_periods, period_for
from billing.services.invoicing import DraftInvoice, DraftLine, issue_invoice
from billing.services.ledger import grant_credits
from billing.services.locks import lock_customer
from plans.models import Plan
from plans.money import ZERO, quantize_credits, round_money


def is_upgrade(current: Plan, new: Plan) -> bool:
    return (new.base_price, new.included_credits) > (current.base_price, current.included_credits)


def remaining_fraction(period: BillingPeriod, now: datetime) -> Decimal:
    """Share of the period still ahead at `now`, by the second."""
    total = int((period.end - period.start).total_seconds())
    left = max(0, int((period.end - now).total_seconds()))
    return Decimal(left) / Decimal(total)


@transaction.atomic
def subscription_change_plan(*, customer, plan_code: str, now: datetime) -> Subscription:
    lock_customer(customer.pk)
    subscription = live_subscription(customer)
    if subscription is None:
        raise BillingError("The customer has no live subscription.", code="no_subscription")
    open_periods(subscription=subscription, until=now)
    subscription.refresh_from_db()
    if plan_code == subscription.plan.code:
        # Staying put cancels a scheduled change, even on a plan no longer on sale.
        subscription.pending_plan = None
        subscription.save(update_fields=["pending_plan"])
        return subscription
    new = active_plan(plan_code)
    if new.interval != subscription.plan.interval:
        raise BillingError("Changing between monthly and yearly plans is not supported yet.",
                           code="interval_change_unsupported", field="plan")
    if new.currency != subscription.plan.currency:
        raise BillingError("The new plan is billed in another currency.", code="currency_mismatch", field="plan")
    period = period_for(subscription, now)
    if period is None or not is_upgrade(period.plan, new):
        subscription.pending_plan = new  # a downgrade applies from the next period
        subscription.save(update_fields=["pending_plan"])
        return subscription
    _upgrade_now(subscription, period, new, now)
    return subscription


def _upgrade_now(subscription: Subscription, period: BillingPeriod, new: Plan, now: datetime) -> None:
    old = period.plan
    fraction = remaining_fraction(period, now)
    # Only the part above the highest allotment this period was ever entitled to: going
    # Basic → Lite (0 credits) → Big grants Big − Basic, as Basic → Big does.
    extra_credits = quantize_credits(max(new.included_credits - period.included_credits_level, ZERO) * fraction)
    fee = round_money(max(new.base_price - old.base_price, ZERO) * fraction, new.currency)
    key = f"upgrade:period:{period.pk}:to:{new.pk}"
    if extra_credits > ZERO:
        grant_credits(
            customer=subscription.customer, credits=extra_credits, source=CreditGrant.Source.PLAN_ALLOCATION,
            effective_at=now, expires_at=period.end, period=period, idempotency_key=key,
            description=f"Upgrade to {new.name}: prorated included credits", cost=fee, currency=new.currency, now=now,
        )
    if fee > ZERO:
        line = DraftLine(
            kind=InvoiceLine.Kind.PRORATION,
            description=f"Upgrade from {old.name} to {new.name}: base fee difference for the rest of the period "
                        f"({(fraction * 100).quantize(Decimal('0.1'))} %)",
            amount=fee, service_start=now, service_end=period.end)
        issue_invoice(DraftInvoice(customer=subscription.customer, kind=Invoice.Kind.PLAN_CHANGE,
                                   currency=new.currency, subscription=subscription, period=period, lines=[line]),
                      now=now, idempotency_key=key)
    period.plan = new
    period.included_credits += extra_credits
    period.included_credits_level = max(period.included_credits_level, new.included_credits)
    period.save(update_fields=["plan", "included_credits", "included_credits_level"])
    subscription.plan, subscription.pending_plan = new, None
    subscription.save(update_fields=["plan", "pending_plan"])
