"""Recording usage events: idempotent by event id, one transaction per event."""

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction

from billing.errors import BillingError, Conflict, NotFound
from billing.periods import as_utc
from billing.models import BillingPeriod, Customer, Reservation, UsageEvent, UsageRollup
from billing.services.customers import live_subscription, open_periods
from billing.services.ledger import apply_charge, plan_charge
from billing.services.locks import lock_customer
from plans.models import Feature, FeatureCost
from plans.money import quantize_credits


@dataclass(frozen=True)
class EventInput:
    event_id: str
    customer: str  # the customer's external_id
    feature: str  # feature code
    quantity: Decimal
    timestamp: datetime | None = None
    properties: dict = field(default_factory=dict)
    reservation_id: str | None = None

    def fingerprint(self) -> str:
        """Identifies the request as sent: a retry has the same fingerprint, a
        different event reusing the id does not."""
        canonical = {
            "customer": self.customer,
            "feature": self.feature,
            "quantity": format(self.quantity.normalize(), "f"),
            "timestamp": as_utc(self.timestamp).isoformat() if self.timestamp else None,
            "properties": self.properties,
            "reservation_id": str(self.reservation_id) if self.reservation_id else None,
        }
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def credits_for(plan, feature: Feature, quantity: Decimal) -> Decimal:
    """Credits for `quantity` units of `feature` on `plan`: the plan's feature cost if
    it lists one, otherwise the feature's default."""
    cost = FeatureCost.objects.filter(plan=plan, feature=feature).values_list("credits_per_unit", flat=True).first()
    per_unit = feature.default_credits_per_unit if cost is None else cost
    return quantize_credits(quantity * per_unit)


def record_event(*, event: EventInput, now: datetime) -> tuple[UsageEvent, bool]:
    """Record one usage event. Returns (event, created); a retry of an id already seen
    with the same body returns the stored event with created=False."""
    fingerprint = event.fingerprint()
    try:
        return _record_event(event, fingerprint, now)
    except IntegrityError:
        # Only reachable without row locks (SQLite): a concurrent twin won the insert.
        existing = UsageEvent.objects.filter(customer__external_id=event.customer, event_id=event.event_id).first()
        if existing is None:
            raise
        return _repeat(existing, fingerprint), False


def _repeat(existing: UsageEvent, fingerprint: str) -> UsageEvent:
    if existing.fingerprint != fingerprint:
        raise Conflict(f"Event id {existing.event_id!r} was already used with a different body.",
                       code="idempotency_conflict", field="id")
    return existing


@transaction.atomic
def _record_event(event: EventInput, fingerprint: str, now: datetime) -> tuple[UsageEvent, bool]:
    customer_id = Customer.objects.filter(external_id=event.customer).values_list("pk", flat=True).first()
    if customer_id is None:
        raise NotFound(f"No customer with external_id {event.customer!r}.", code="customer_not_found",
                       field="customer")
    customer = lock_customer(customer_id)
    existing = UsageEvent.objects.filter(customer=customer, event_id=event.event_id).first()
    if existing is not None:
        return _repeat(existing, fingerprint), False

    timestamp = as_utc(event.timestamp) if event.timestamp else now
    if timestamp > now + timedelta(seconds=settings.OVERAGE_CLOCK_SKEW_SECONDS):
        raise BillingError("The event's timestamp is in the future.", code="timestamp_in_future", field="timestamp")
    feature = Feature.objects.filter(code=event.feature).first()
    if feature is None:
        raise BillingError(f"Unknown feature {event.feature!r}.", code="unknown_feature", field="feature")
    subscription = live_subscription(customer)
    if subscription is None:
        raise BillingError("The customer has no subscription.", code="no_subscription", field="customer")
    open_periods(subscription=subscription, until=timestamp)
    period = (
        BillingPeriod.objects.select_related("plan")
        .filter(customer=customer, start__lte=timestamp, end__gt=timestamp).order_by("-start").first()
    )
    if period is None:
        raise BillingError("No subscription covers the event's timestamp.", code="no_subscription", field="timestamp")
    grace = timedelta(seconds=settings.OVERAGE_PERIOD_GRACE_SECONDS)
    if period.status == BillingPeriod.Status.CLOSED or now >= period.end + grace:
        raise BillingError("The billing period of this event's timestamp is closed.", code="period_closed",
                           field="timestamp")

    reservation = None
    if event.reservation_id:
        reservation = Reservation.objects.filter(pk=event.reservation_id, customer=customer).first()
        if reservation is None:
            raise NotFound("No such reservation for this customer.", code="reservation_not_found",
                           field="reservation_id", status=422)
    holding = reservation if reservation is not None and reservation.is_holding(now) else None

    credits = credits_for(period.plan, feature, event.quantity)
    charge = plan_charge(customer=customer, subscription=subscription, period=period, feature=feature,
                         credits=credits, at=timestamp, now=now, reservation=holding)
    usage = UsageEvent.objects.create(
        customer=customer, event_id=event.event_id, feature=feature, quantity=event.quantity, credits=credits,
        overage_credits=charge.overage_credits if charge.allowed else 0, timestamp=timestamp, received_at=now,
        properties=event.properties, period=period, reservation=reservation, fingerprint=fingerprint,
        status=UsageEvent.Status.ACCEPTED if charge.allowed else UsageEvent.Status.REJECTED,
        reject_reason="" if charge.allowed else charge.reason,
    )
    if charge.allowed:
        apply_charge(charge, customer=customer, event=usage)
        _add_to_rollup(usage)
    if reservation is not None and reservation.status == Reservation.Status.ACTIVE:
        # Settling ends the hold whatever the outcome: unused held credits return.
        Reservation.objects.filter(pk=reservation.pk).update(status=Reservation.Status.SETTLED, ended_at=now)
    return usage, True


def _add_to_rollup(usage: UsageEvent) -> None:
    """Add an accepted event to its day's rollup. The customer lock makes the
    read-then-write safe; sums are taken in Decimal (SQLite's SQL arithmetic is float)."""
    key = {"period_id": usage.period_id, "feature_id": usage.feature_id, "day": usage.timestamp.date()}
    rollup = UsageRollup.objects.filter(**key).first()
    if rollup is None:
        UsageRollup.objects.create(**key, events=1, quantity=usage.quantity, credits=usage.credits,
                                   overage_credits=usage.overage_credits)
        return
    UsageRollup.objects.filter(pk=rollup.pk).update(
        events=rollup.events + 1, quantity=rollup.quantity + usage.quantity, credits=rollup.credits + usage.credits,
        overage_credits=rollup.overage_credits + usage.overage_credits,
    )


@dataclass
class BatchResult:
    event: UsageEvent | None = None
    created: bool = False
    error: BillingError | None = None


def record_events(*, events: list[EventInput], now: datetime) -> list[BatchResult]:
    """Record a batch: each event atomic on its own, results in input order."""
    results = []
    for item in events:
        try:
            usage, created = record_event(event=item, now=now)
            results.append(BatchResult(event=usage, created=created))
        except BillingError as error:
            results.append(BatchResult(error=error))
    return results
