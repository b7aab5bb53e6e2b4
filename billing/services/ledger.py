"""The only code that writes ledger entries.

Consumption order, holds and overage are decided in `plan_charge` (a read, under the
customer's lock) and written by `apply_charge`, so the entitlement check and the event
that follows it take exactly the same decision.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, Sum

from billing.errors import BillingError, Conflict
from billing.models import (
    BillingPeriod, CreditGrant, Customer, LedgerEntry, Reservation, ReservationHold, Subscription,
    UsageEvent,
)
from billing.services.locks import lock_customer
from plans.models import Feature, Plan
from plans.money import ZERO, credits_total
from plans.pricing import price_overage


class Reason:
    """Why an entitlement check or an event was allowed or refused (API contract)."""

    OK = "ok"
    OVERAGE = "overage"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    SPEND_CAP_REACHED = "spend_cap_reached"
    PAUSED = "paused"
    UNKNOWN_FEATURE = "unknown_feature"
    NO_SUBSCRIPTION = "no_subscription"


# --- Granting ---------------------------------------------------------------------------

def grant_credits(*, customer: Customer, credits: Decimal, source: str, effective_at: datetime,
                  expires_at: datetime | None = None, period: BillingPeriod | None = None,
                  idempotency_key: str | None = None, features=(), description: str = "",
                  pack=None, now: datetime) -> CreditGrant:
    """Add a bucket of credits and its `grant` entry. The caller holds the customer's
    lock. With an idempotency key, a repeat returns the first grant unchanged."""
    if credits <= ZERO:
        raise ValueError("a grant must add a positive number of credits")
    if idempotency_key:
        existing = CreditGrant.objects.filter(customer=customer, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    grant = CreditGrant.objects.create(
        customer=customer, source=source, credits=credits, remaining=credits,
        priority=CreditGrant.PRIORITY_BY_SOURCE[source], effective_at=effective_at, expires_at=expires_at,
        period=period, pack=pack, idempotency_key=idempotency_key, description=description,
    )
    if features:
        grant.features.set(features)
    LedgerEntry.objects.create(
        customer=customer, kind=LedgerEntry.Kind.GRANT, credits=credits, grant=grant, period=period,
        effective_at=effective_at, note=description[:255],
    )
    return grant


@transaction.atomic
def grant_credits_once(*, customer: Customer, idempotency_key: str, credits: Decimal, source: str,
                       now: datetime, expires_at: datetime | None = None, features=(),
                       description: str = "") -> tuple[CreditGrant, bool]:
    """A grant requested from outside (API, admin), effective now: idempotent by key,
    and a repeat of a key with different terms is a conflict rather than a silent
    no-op. Returns (grant, created)."""
    check_grant_request(credits=credits, expires_at=expires_at, now=now)
    features = list(features)
    terms = grant_terms(credits=credits, source=source, expires_at=expires_at, feature_codes=[f.code for f in features])
    lock_customer(customer.pk)
    existing = CreditGrant.objects.filter(customer=customer, idempotency_key=idempotency_key).first()
    if existing is not None:
        existing_terms = grant_terms(credits=existing.credits, source=existing.source, expires_at=existing.expires_at,
                                     feature_codes=[f.code for f in existing.features.all()])
        if existing_terms != terms:
            raise Conflict("This idempotency_key was used for a different grant.", code="idempotency_conflict",
                           field="idempotency_key")
        return existing, False
    grant = grant_credits(customer=customer, credits=credits, source=source, effective_at=now,
                          expires_at=expires_at, features=features, idempotency_key=idempotency_key,
                          description=description, now=now)
    return grant, True


def check_grant_request(*, credits: Decimal, expires_at: datetime | None, now: datetime) -> None:
    """The input rules of an external grant (forms call this to show errors inline)."""
    if credits <= ZERO:
        raise BillingError("A grant must add a positive number of credits.", code="invalid", field="credits",
                           status=400)
    if expires_at is not None and expires_at <= now:
        raise BillingError("expires_at must be in the future.", code="invalid", field="expires_at", status=400)


def grant_terms(*, credits: Decimal, source: str, expires_at: datetime | None, feature_codes) -> dict:
    """What makes two grant requests the same request."""
    return {
        "credits": format(credits.normalize(), "f"),
        "source": source,
        "expires_at": expires_at.isoformat() if expires_at else None,
        "features": sorted(feature_codes),
    }


# --- Deciding a charge ------------------------------------------------------------------

@dataclass
class Draw:
    grant: CreditGrant
    credits: Decimal


@dataclass
class ChargePlan:
    """What charging `credits` for `feature` at `at` would do, decided under lock."""

    period: BillingPeriod
    plan: Plan
    credits: Decimal
    allowed: bool
    reason: str
    draws: list[Draw] = field(default_factory=list)
    overage_credits: Decimal = ZERO
    # Credits this feature could still draw from grants (after others' holds), before
    # this charge.
    available_credits: Decimal = ZERO
    # The period's overage money if this charge goes through (or as it stands, if not).
    estimated_overage_amount: Decimal = ZERO


def usable_grants(customer: Customer, feature: Feature, at: datetime):
    """Grants that can pay for usage of `feature` stamped `at`, in consumption order:
    soonest expiry first, then priority (included/promotional before purchased), then
    oldest."""
    return (
        CreditGrant.objects.filter(customer=customer, remaining__gt=0, effective_at__lte=at)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=at))
        .filter(Q(features__isnull=True) | Q(features=feature))
        .distinct()
        .order_by(F("expires_at").asc(nulls_last=True), "priority", "created_at", "id")
    )


def active_reservations(customer: Customer, now: datetime, *, exclude: Reservation | None = None):
    qs = Reservation.objects.filter(customer=customer, status=Reservation.Status.ACTIVE, expires_at__gt=now)
    if exclude is not None:
        qs = qs.exclude(pk=exclude.pk)
    return qs


def effective_overage_cap(plan: Plan, customer: Customer) -> Decimal | None:
    """The overage money cap in force for this customer (None = uncapped)."""
    return plan.overage_cap


def plan_charge(*, customer: Customer, subscription: Subscription, period: BillingPeriod, feature: Feature,
                credits: Decimal, at: datetime, now: datetime,
                reservation: Reservation | None = None) -> ChargePlan:
    """Decide how `credits` would be paid: from which grants, how much overage, or why
    not. Reads only; call under the customer's lock when the result will be written.

    Credits held by other active reservations are not available here, so a reserved
    request can always settle what it reserved.
    """
    plan = period.plan
    others = active_reservations(customer, now, exclude=reservation)
    held_by_grant = {
        grant: credits_total(total)
        for grant, total in ReservationHold.objects.filter(reservation__in=others).values_list("grant_id")
        .annotate(Sum("credits"))
    }
    held_overage = credits_total(others.filter(period=period).aggregate(total=Sum("overage_credits"))["total"])

    draws, need, available = [], credits, ZERO
    for grant in usable_grants(customer, feature, at):
        free = grant.remaining - held_by_grant.get(grant.pk, ZERO)
        if free <= ZERO:
            continue
        available += free
        take = min(free, need)
        if take > ZERO:
            draws.append(Draw(grant, take))
            need -= take

    committed_overage = period.overage_credits + held_overage
    result = ChargePlan(period=period, plan=plan, credits=credits, allowed=True, reason=Reason.OK,
                        draws=draws, overage_credits=need, available_credits=available)

    def estimate(overage: Decimal) -> Decimal:
        return price_overage(plan, overage).amount

    if subscription.status == Subscription.Status.PAUSED:
        return _refused(result, Reason.PAUSED, estimate(committed_overage))
    if need > ZERO:
        if not plan.overage_enabled and plan.hard_limit_behaviour == Plan.HardLimit.BLOCK:
            return _refused(result, Reason.INSUFFICIENT_CREDITS, estimate(committed_overage))
        amount_after = estimate(committed_overage + need)
        cap = effective_overage_cap(plan, customer)
        if plan.overage_enabled and cap is not None and amount_after > cap:
            return _refused(result, Reason.SPEND_CAP_REACHED, estimate(committed_overage))
        result.reason = Reason.OVERAGE
        result.estimated_overage_amount = amount_after
    else:
        result.estimated_overage_amount = estimate(committed_overage)
    return result


def _refused(result: ChargePlan, reason: str, estimate: Decimal) -> ChargePlan:
    result.allowed = False
    result.reason = reason
    result.draws = []
    result.estimated_overage_amount = estimate
    return result


def apply_charge(charge: ChargePlan, *, customer: Customer, event: UsageEvent) -> None:
    """Write the consumption decided by `plan_charge`: one `consume` entry per grant
    drawn, one `overage` entry for the rest, and the period's cached totals."""
    assert charge.allowed
    entries = [
        LedgerEntry(customer=customer, kind=LedgerEntry.Kind.CONSUME, credits=-draw.credits, grant=draw.grant,
                    period=charge.period, event=event, feature=event.feature, effective_at=event.timestamp)
        for draw in charge.draws
    ]
    if charge.overage_credits > ZERO:
        entries.append(LedgerEntry(customer=customer, kind=LedgerEntry.Kind.OVERAGE, credits=-charge.overage_credits,
                                   period=charge.period, event=event, feature=event.feature,
                                   effective_at=event.timestamp))
    LedgerEntry.objects.bulk_create(entries)
    # New balances are computed here in Decimal, not with F() in SQL: SQLite does
    # decimal arithmetic in floating point. The customer lock makes the values read by
    # plan_charge current.
    for draw in charge.draws:
        draw.grant.remaining -= draw.credits
        CreditGrant.objects.filter(pk=draw.grant.pk).update(remaining=draw.grant.remaining)
    period = charge.period
    period.credits_used += charge.credits
    period.overage_credits += charge.overage_credits
    BillingPeriod.objects.filter(pk=period.pk).update(credits_used=period.credits_used,
                                                      overage_credits=period.overage_credits)


# --- Expiry -----------------------------------------------------------------------------

def expire_credit_grants(*, now: datetime) -> int:
    """Write `expire` entries for grants whose expiry (plus the late-event grace window)
    has passed. Included plan credits are left to the period close, which decides
    between rollover and expiry. Returns the number of grants expired."""
    cutoff = now - timedelta(seconds=settings.OVERAGE_PERIOD_GRACE_SECONDS)
    due = (
        CreditGrant.objects.filter(expires_at__lte=cutoff, remaining__gt=0)
        .exclude(source=CreditGrant.Source.PLAN_ALLOCATION)
        .values_list("customer_id", flat=True).distinct()
    )
    expired = 0
    for customer_id in sorted(set(due)):
        with transaction.atomic():
            customer = lock_customer(customer_id)
            grants = CreditGrant.objects.filter(
                customer=customer, expires_at__lte=cutoff, remaining__gt=0
            ).exclude(source=CreditGrant.Source.PLAN_ALLOCATION)
            for grant in grants:
                expire_grant(grant=grant, customer=customer, at=grant.expires_at)
                expired += 1
    return expired


def expire_grant(*, grant: CreditGrant, customer: Customer, at: datetime, note: str = "Expired") -> None:
    """Zero a grant's remaining credits with an `expire` entry (caller holds the lock)."""
    grant.refresh_from_db(fields=["remaining"])
    if grant.remaining <= ZERO:
        return
    LedgerEntry.objects.create(customer=customer, kind=LedgerEntry.Kind.EXPIRE, credits=-grant.remaining,
                               grant=grant, period=grant.period, effective_at=at, note=note)
    grant.remaining = ZERO
    CreditGrant.objects.filter(pk=grant.pk).update(remaining=ZERO)
