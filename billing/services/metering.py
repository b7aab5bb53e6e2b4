"""Recording usage events: idempotent by event id.

A batch is grouped by customer; each customer's events are decided in order against
one `CustomerLedger` under that customer's lock and written in one transaction, so a
1 000-event batch costs a few dozen statements, not thousands. A single event is a
batch of one. Every event is all or nothing: refused events write nothing, rejected
ones are recorded with their reason and charge nothing, and a failure rolls back the
customer's whole group (a retry is safe: ids make it idempotent).
"""

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction

from billing.errors import BillingError, Conflict, NotFound
from billing.models import BillingPeriod, Customer, Reservation, UsageEvent
from billing.periods import as_utc
from billing.services.alerts import enqueue_alert_checks
from billing.services.customers import live_subscription, open_periods
from billing.services.ledger import CustomerLedger
from billing.services.locks import lock_customer
from billing.services.commit_hooks import after_commit
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


@dataclass
class BatchResult:
    event: UsageEvent | None = None
    created: bool = False
    error: BillingError | None = None


def credits_per_unit(plan, feature: Feature) -> Decimal:
    """The plan's credit cost for one unit of `feature`, or the feature's default."""
    cost = FeatureCost.objects.filter(plan=plan, feature=feature).values_list("credits_per_unit", flat=True).first()
    return feature.default_credits_per_unit if cost is None else cost


def credits_for(plan, feature: Feature, quantity: Decimal) -> Decimal:
    return quantize_credits(quantity * credits_per_unit(plan, feature))


def record_event(*, event: EventInput, now: datetime) -> tuple[UsageEvent, bool]:
    """Record one usage event. Returns (event, created); a retry of an id already seen
    with the same body returns the stored event with created=False."""
    result = record_events(events=[event], now=now)[0]
    if result.error is not None:
        raise result.error
    return result.event, result.created


def record_events(*, events: list[EventInput], now: datetime) -> list[BatchResult]:
    """Record a batch; results in input order."""
    results: list[BatchResult | None] = [None] * len(events)
    by_customer: dict[str, list[int]] = {}
    for index, item in enumerate(events):
        by_customer.setdefault(item.customer, []).append(index)
    customer_ids = dict(Customer.objects.filter(external_id__in=list(by_customer)).values_list("external_id", "pk"))
    features = {f.code: f for f in Feature.objects.filter(code__in={e.feature for e in events})}
    for external_id in set(by_customer) - set(customer_ids):
        for index in by_customer[external_id]:
            results[index] = BatchResult(error=NotFound(f"No customer with external_id {external_id!r}.",
                                                        code="customer_not_found", field="customer"))
    # One customer at a time, in primary-key order: never two locks held at once.
    for external_id, customer_id in sorted(customer_ids.items(), key=lambda item: item[1]):
        items = [(index, events[index]) for index in by_customer[external_id]]
        try:
            _record_customer_events(customer_id, items, features, now, results)
        except IntegrityError:
            # Only reachable without row locks (SQLite): a concurrent request inserted
            # one of these ids first. Once more, now seeing it as a repeat.
            _record_customer_events(customer_id, items, features, now, results)
    return results


@transaction.atomic
def _record_customer_events(customer_id: int, items: list[tuple[int, EventInput]], features: dict[str, Feature],
                            now: datetime, results: list) -> None:
    customer = lock_customer(customer_id)
    stored = {
        e.event_id: e for e in UsageEvent.objects.filter(customer=customer, event_id__in=[i.event_id for _, i in items])
        .select_related("customer", "feature")
    }
    subscription = live_subscription(customer)
    skew = timedelta(seconds=settings.OVERAGE_CLOCK_SKEW_SECONDS)
    stamps = [as_utc(i.timestamp) if i.timestamp else now for _, i in items]
    if subscription is not None:
        # Never a period that has not started: a plan change made before the boundary
        # must still shape it.
        open_periods(subscription=subscription, until=min(max(stamps), now))
    periods = list(
        BillingPeriod.objects.select_related("plan").prefetch_related("plan__overage_tiers")
        .filter(customer=customer, end__gt=min(stamps)).order_by("-start")
    )
    reservations = {
        str(r.pk): r for r in Reservation.objects.filter(
            customer=customer, pk__in=[i.reservation_id for _, i in items if i.reservation_id])
    }
    ledger = CustomerLedger(customer, subscription, now=now, since=min(stamps))
    settled_here: set = set()
    per_unit: dict[tuple[int, int], Decimal] = {}
    grace = timedelta(seconds=settings.OVERAGE_PERIOD_GRACE_SECONDS)

    for (index, item), timestamp in zip(items, stamps):
        fingerprint = item.fingerprint()
        prior = stored.get(item.event_id)
        if prior is not None:
            if prior.fingerprint != fingerprint:
                results[index] = BatchResult(error=Conflict(
                    f"Event id {item.event_id!r} was already used with a different body.",
                    code="idempotency_conflict", field="id"))
            else:
                results[index] = BatchResult(event=prior, created=False)
            continue
        try:
            if timestamp > now + skew:
                raise BillingError("The event's timestamp is in the future.", code="timestamp_in_future",
                                   field="timestamp")
            feature = features.get(item.feature)
            if feature is None:
                raise BillingError(f"Unknown feature {item.feature!r}.", code="unknown_feature", field="feature")
            if subscription is None:
                raise BillingError("The customer has no subscription.", code="no_subscription", field="customer")
            period = next((p for p in periods if p.start <= timestamp < p.end), None)
            if period is None and timestamp > now:
                raise BillingError("The event's timestamp falls in a billing period that has not started yet.",
                                   code="timestamp_in_future", field="timestamp")
            if period is None:
                raise BillingError("No subscription covers the event's timestamp.", code="no_subscription",
                                   field="timestamp")
            if period.status == BillingPeriod.Status.CLOSED or now >= period.end + grace:
                raise BillingError("The billing period of this event's timestamp is closed.", code="period_closed",
                                   field="timestamp")
            reservation = None
            if item.reservation_id:
                reservation = reservations.get(str(item.reservation_id))
                if reservation is None:
                    raise NotFound("No such reservation for this customer.", code="reservation_not_found",
                                   field="reservation_id", status=422)
                if reservation.feature_id != feature.pk:
                    raise BillingError("The reservation was made for another feature.",
                                       code="reservation_mismatch", field="reservation_id")
                if reservation.status == Reservation.Status.SETTLED or reservation.pk in settled_here:
                    raise Conflict("This reservation was already settled by another event.",
                                   code="reservation_settled", field="reservation_id")
        except BillingError as error:
            results[index] = BatchResult(error=error)
            continue

        key = (period.plan_id, feature.pk)
        if key not in per_unit:
            per_unit[key] = credits_per_unit(period.plan, feature)
        credits = quantize_credits(item.quantity * per_unit[key])
        holding = reservation is not None and reservation.is_holding(now)
        charge = ledger.plan_charge(period=period, feature=feature, credits=credits, at=timestamp,
                                    reservation_id=reservation.pk if holding else None)
        usage = UsageEvent(
            customer=customer, event_id=item.event_id, feature=feature, quantity=item.quantity, credits=credits,
            overage_credits=charge.overage_credits if charge.allowed else 0, timestamp=timestamp, received_at=now,
            properties=item.properties, period=period, reservation=reservation, fingerprint=fingerprint,
            status=UsageEvent.Status.ACCEPTED if charge.allowed else UsageEvent.Status.REJECTED,
            reject_reason="" if charge.allowed else charge.reason,
        )
        ledger.record(usage, charge)
        if reservation is not None:
            settled_here.add(reservation.pk)
        stored[item.event_id] = usage  # a repeat later in the same batch is a repeat
        results[index] = BatchResult(event=usage, created=True)
    ledger.flush()
    # Follow-ups (alerts, automatic top-up, progressive billing) run after the commit,
    # in tasks; this only queues them.
    recorded = [results[i].event for i, _ in items if results[i] is not None and results[i].created]
    enqueue_alert_checks(customer_id=customer.pk, events=recorded)
    _enqueue_billing_follow_ups(customer.pk, recorded)


def _enqueue_billing_follow_ups(customer_id: int, events: list[UsageEvent]) -> None:
    """After consumption: check the automatic top-up, and progressive billing for
    periods whose plan has a threshold. No query here; the tasks decide."""
    from billing import tasks  # lazily: services never import celery tasks at import time

    accepted = [e for e in events if e.status == UsageEvent.Status.ACCEPTED]
    if not accepted:
        return
    after_commit(tasks.run_auto_topup_task.delay, customer_id)
    for period_id in sorted({e.period_id for e in accepted if e.period.plan.progressive_billing_threshold is not None}):
        after_commit(tasks.bill_progressively_task.delay, period_id)
