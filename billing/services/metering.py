"""Recording usage events: idempotent by event id.

A batch is one transaction: its customers are locked together (in primary-key order),
loaded together, and each customer's events are decided in order against its
`CustomerLedger`; everything is written in a few bulk statements, so a 1 000-event
batch costs about twenty statements whatever the number of customers. A single event is
a batch of one. Refused events write nothing, rejected ones are recorded with their
reason and charge nothing, and a failure rolls back the whole batch (a retry is safe:
ids make it idempotent).
"""

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction

from billing.errors import BillingError, Conflict, NotFound
from billing.models import AutoTopUp, BillingPeriod, Customer, LedgerEntry, Reservation, Subscription, UsageEvent
from billing.periods import as_utc
from billing.services.alerts import enqueue_alert_checks, periods_crossing_a_threshold, periods_of
from billing.services.customers import open_periods
from billing.services import rows
from billing.services.json_text import compact_encoder
from billing.services.ledger import CustomerLedger, draw_keys, new_row
from billing.services.locks import lock_customers
from billing.services.commit_hooks import enqueue
from plans.models import Feature, FeatureCost, OverageTier, Plan
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
        return hashlib.sha256(_canonical_json(canonical).encode()).hexdigest()


# Sorted keys, no spaces, anything else as text: stored fingerprints depend on every byte.
_canonical_json = compact_encoder(sort_keys=True, default=str)


@dataclass
class BatchResult:
    event: UsageEvent | None = None
    created: bool = False
    error: BillingError | None = None
    # Not attempted: the customer was locked by another transaction and the caller asked
    # not to wait (`skip_locked`). Nothing was written for it.
    locked_out: bool = False


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


def record_events(*, events: list[EventInput], now: datetime, skip_locked: bool = False) -> list[BatchResult]:
    """Record a batch; results in input order. With `skip_locked` (group commit, whose
    events are independent requests), the events of customers another transaction holds
    are not waited for: they come back `locked_out`, to be sent again. An API batch
    waits: it is all or nothing."""
    results: list[BatchResult | None] = [None] * len(events)
    by_customer: dict[str, list[int]] = {}
    for index, item in enumerate(events):
        by_customer.setdefault(item.customer, []).append(index)
    external_ids, codes = list(by_customer), list({e.feature for e in events})
    reads = rows.Together()  # both in one round trip
    of_external_ids, external_id_params = rows.one_of("external_id", external_ids, "text")
    found_customers = reads.values(f"SELECT external_id, id FROM {Customer._meta.db_table} WHERE {of_external_ids}",
                                   external_id_params, [None, None])
    found_features = reads.fetch(Feature, *rows.one_of("code", codes, "text"))
    # Keys for the rows the batch will most likely write (an event and one entry each),
    # drawn now rather than under the customers' locks.
    keys = draw_keys([(UsageEvent, len(events)), (LedgerEntry, len(events))], reads=reads)
    reads.run()
    customer_ids, features = dict(found_customers), {f.code: f for f in found_features}
    for external_id in set(by_customer) - set(customer_ids):
        for index in by_customer[external_id]:
            results[index] = BatchResult(error=NotFound(f"No customer with external_id {external_id!r}.",
                                                        code="customer_not_found", field="customer"))
    items_by_customer = {pk: [(index, events[index]) for index in by_customer[external_id]]
                         for external_id, pk in customer_ids.items()}
    if not items_by_customer:
        return results
    # Before the transaction: the customers' locks are held for as short a time as can be.
    fingerprints = {index: item.fingerprint() for items in items_by_customer.values() for index, item in items}
    skip_locked = skip_locked and transaction.get_connection().features.has_select_for_update_skip_locked
    try:
        follow_ups = _record_batch(items_by_customer, features, fingerprints, now, results, keys,
                                   skip_locked=skip_locked)
    except IntegrityError:
        # Only reachable without row locks (SQLite): a concurrent request inserted one
        # of these ids first. Once more, now seeing it as a repeat.
        follow_ups = _record_batch(items_by_customer, features, fingerprints, now, results, keys)
    _enqueue_follow_ups(*follow_ups)
    return results


@transaction.atomic
def _record_batch(items_by_customer: dict[int, list[tuple[int, EventInput]]], features: dict[str, Feature],
                  fingerprints: dict[int, str], now: datetime, results: list, keys: list[list[int]] | None, *,
                  skip_locked: bool = False) -> tuple[dict[int, list[UsageEvent]], set[int], set[int]]:
    """Every customer of the batch in one transaction: their locks taken together in
    primary-key order (so two batches never wait on each other in a cycle), their
    positions read with the locks in one round trip (`rows.Together`), each event
    decided in order in memory, and everything written in a few bulk statements.
    Returns what `_enqueue_follow_ups` needs: (events recorded by customer, periods
    that crossed an alert threshold, customers with automatic top-up on)."""
    customer_pks = sorted(items_by_customer)
    stamps = {pk: [as_utc(i.timestamp) if i.timestamp else now for _, i in items]
              for pk, items in items_by_customer.items()}
    since = min(min(s) for s in stamps.values())
    reads = rows.Together()
    customers = lock_customers(customer_pks, skip_locked=skip_locked, reads=reads)  # first: the rest read under it
    stored_pks = reads.values(*_stored_events_query(
        [(pk, item.event_id) for pk, items in items_by_customer.items() for _, item in items]), [None])
    of_customers, customer_params = rows.one_of("customer_id", customer_pks, "bigint")
    found_subscriptions = reads.fetch(Subscription, f"{of_customers} AND status <> %s",
                                      [*customer_params, Subscription.Status.CANCELED], order_by="id")
    periods = _periods_by_customer(customer_pks, since, reads=reads)
    loaded = CustomerLedger._load(customer_pks, now, since, reads=reads)
    charged_where, charged_params = _periods_ending_after(customer_pks, since)
    costs = reads.values(*_feature_costs_query(f"plan_id IN (SELECT plan_id FROM {BillingPeriod._meta.db_table} "
                                               f"WHERE {charged_where})", charged_params, features.values()),
                         _CREDITS_PER_UNIT)
    with_topup = reads.values(f"SELECT customer_id FROM {AutoTopUp._meta.db_table} WHERE {of_customers} "
                              "AND enabled = %s", [*customer_params, True], [None])
    reads.run()

    if len(customers) < len(items_by_customer):  # only with skip_locked: held by another transaction
        for pk in set(items_by_customer) - set(customers):
            for index, _ in items_by_customer[pk]:
                results[index] = BatchResult(locked_out=True)
        items_by_customer = {pk: items for pk, items in items_by_customer.items() if pk in customers}
        if not items_by_customer:
            return {}, set(), set()
    stored = _stored_events([pk for pk, in stored_pks])
    subscriptions: dict[int, Subscription] = {}
    for subscription in found_subscriptions:
        subscriptions.setdefault(subscription.customer_id, subscription)
    plans = {period.plan_id: period.plan for ps in periods.values() for period in ps}
    costs_read_for = set(plans)
    for subscription in subscriptions.values():
        if subscription.plan_id in plans:  # (else read when needed: a plan changed mid-period)
            subscription.plan = plans[subscription.plan_id]
    opened_for = []
    for pk, subscription in subscriptions.items():
        if pk not in customers:
            continue
        # Never a period that has not started: a plan change made before the boundary
        # must still shape it.
        until = min(max(stamps[pk]), now)
        if not any(p.end > until for p in periods.get(pk, [])) and open_periods(subscription=subscription,
                                                                                 until=until):
            opened_for.append(pk)
    if opened_for:  # read again: new periods, and the grants of their included credits
        reread = _periods_by_customer(opened_for, since)
        periods.update((pk, reread.get(pk, [])) for pk in opened_for)
        loaded.update(CustomerLedger._load(opened_for, now, since))
    reservation_ids = [i.reservation_id for items in items_by_customer.values() for _, i in items if i.reservation_id]
    reservations = {
        (r.customer_id, str(r.pk)): r
        for r in Reservation.objects.filter(customer_id__in=list(customers), pk__in=reservation_ids)
    } if reservation_ids else {}
    ledgers = CustomerLedger.load_many(customers, subscriptions, now=now, since=since, loaded=loaded)
    per_unit = _costs_by_plan(costs_read_for, features.values(), costs)
    opened_since = {p.plan_id for ps in periods.values() for p in ps} - costs_read_for
    if opened_since:  # periods opened just now, on a plan none of the others is on
        per_unit.update(feature_costs(opened_since, features.values()))
    recorded_by_customer: dict[int, list[UsageEvent]] = {}
    for pk in sorted(items_by_customer):
        recorded_by_customer[pk] = _decide_customer_events(
            customers[pk], subscriptions.get(pk), items_by_customer[pk], stamps[pk], periods.get(pk, []),
            reservations, ledgers[pk], stored, features, per_unit, fingerprints, now, results)
    included_drawn = {period: credits for ledger in ledgers.values()
                      for period, credits in ledger.included_drawn().items()}
    CustomerLedger.flush_many(list(ledgers.values()), keys)
    # Read under the locks: which included allowances these events took past a threshold.
    return (recorded_by_customer, periods_crossing_a_threshold(included_drawn),
            {customer_id for customer_id, in with_topup})


def _enqueue_follow_ups(recorded_by_customer: dict[int, list[UsageEvent]], thresholds_crossed: set[int],
                        topup_on: set[int]) -> None:
    """Follow-ups (alerts, automatic top-up, progressive billing) run after the commit,
    in tasks; this only queues those the batch may have made due. Outside the batch's
    transaction: working them out held every customer's lock a little longer."""
    for pk, recorded in recorded_by_customer.items():
        enqueue_alert_checks(customer_id=pk, events=recorded, thresholds_crossed=thresholds_crossed)
        _enqueue_billing_follow_ups(pk, recorded, auto_topup=pk in topup_on)


def _stored_events_query(keys: list[tuple[int, str]]) -> tuple[str, list]:
    """The ids of the events already recorded under these (customer, event id) keys. On
    PostgreSQL the keys travel as one JSON array of pairs joined to the unique index, one
    probe per key: `IN` lists of customers and of ids made PostgreSQL probe every
    combination (50 customers × 1 000 ids) and psycopg parse 1 000 placeholders, and
    arrays cost psycopg a Python step per element to quote."""
    table = UsageEvent._meta.db_table
    if transaction.get_connection().vendor == "postgresql":
        # One index probe per key, whatever the table's size: as a plain join,
        # PostgreSQL hashed the whole table instead (22 ms at 44 000 events and
        # growing with it); LIMIT keeps the lateral subquery from being flattened.
        return ("SELECT e.id FROM jsonb_array_elements(%s::jsonb) AS k(pair) "
                f"CROSS JOIN LATERAL (SELECT id FROM {table} "
                "WHERE customer_id = (k.pair->>0)::bigint AND event_id = k.pair->>1 LIMIT 1) e",
                [json.dumps(keys)])
    by_customer: dict[int, list[str]] = {}
    for customer_id, event_id in keys:
        by_customer.setdefault(customer_id, []).append(event_id)
    return (f"SELECT id FROM {table} WHERE "
            + " OR ".join(f"(customer_id = %s AND event_id IN ({rows.in_list(ids)}))" for ids in by_customer.values()),
            [value for customer_id, ids in by_customer.items() for value in (customer_id, *ids)])


def _stored_events(pks: list[int]) -> dict[tuple[int, str], UsageEvent]:
    """The events found by `_stored_events_query`, by (customer, event id). Repeats are
    rare: they are loaded by primary key."""
    if not pks:
        return {}
    return {(e.customer_id, e.event_id): e
            for e in UsageEvent.objects.filter(pk__in=pks).select_related("customer", "feature")}


def _periods_ending_after(customer_ids: list[int], since: datetime) -> tuple[str, list]:
    """The periods a batch can charge: its customers' that end after `since` (a WHERE
    clause on the period table and its parameters)."""
    of_customers, customer_params = rows.one_of("customer_id", customer_ids, "bigint")
    return f'{of_customers} AND "end" > %s', [*customer_params, rows.db_value(BillingPeriod, "end", since)]


def _periods_by_customer(customer_ids: list[int], since: datetime,
                         reads: rows.Together | None = None) -> dict[int, list[BillingPeriod]]:
    """Each customer's periods that end after `since`, newest first, with their plans and
    the plans' overage tiers. With `reads`, queued there and filled when they run."""
    periods: dict[int, list[BillingPeriod]] = {}
    where, params = _periods_ending_after(customer_ids, since)
    # The periods' plans and tiers through subqueries: the plans are not known yet.
    of_periods = f"SELECT plan_id FROM {BillingPeriod._meta.db_table} WHERE {where}"

    def assemble(tiers):
        by_pk = {plan.pk: plan for plan in plans}
        rows.attach_related(by_pk.values(), "overage_tiers", tiers, key="plan_id")
        for period in found:
            period.plan = by_pk[period.plan_id]
            periods.setdefault(period.customer_id, []).append(period)

    with rows.queued(reads) as queue:
        found = queue.fetch(BillingPeriod, where, params, order_by="start DESC, id")
        plans = queue.fetch(Plan, f"id IN ({of_periods})", params)
        queue.fetch(OverageTier, f"plan_id IN ({of_periods})", params, order_by="plan_id, up_to IS NULL, up_to",
                    then=assemble)
    return periods


def _feature_costs_query(of_plans: str, plan_params: list, features) -> tuple[str, list]:
    """(plan, feature, credits per unit) of the plans for which `of_plans` (SQL on
    `plan_id`) holds."""
    of_features, feature_params = rows.one_of("feature_id", [f.pk for f in features], "bigint")
    return (f"SELECT plan_id, feature_id, credits_per_unit FROM {FeatureCost._meta.db_table} "
            f"WHERE {of_plans} AND {of_features}", [*plan_params, *feature_params])


_CREDITS_PER_UNIT = [None, None, FeatureCost._meta.get_field("credits_per_unit")]  # how the query's rows convert


def _costs_by_plan(plan_ids, features, found) -> dict[tuple[int, int], Decimal]:
    """(plan, feature) → credits per unit: the plan's cost among `found` (rows of
    `_feature_costs_query`), else the feature's default."""
    costs = {(plan_id, feature.pk): feature.default_credits_per_unit for plan_id in plan_ids for feature in features}
    costs.update(((plan_id, feature_id), credits) for plan_id, feature_id, credits in found)
    return costs


def feature_costs(plan_ids: set[int], features) -> dict[tuple[int, int], Decimal]:
    """(plan, feature) → credits per unit: the plan's cost, else the feature's default."""
    features, plan_ids = list(features), list(plan_ids)
    return _costs_by_plan(plan_ids, features, rows.fetch_values(
        *_feature_costs_query(*rows.one_of("plan_id", plan_ids, "bigint"), features), _CREDITS_PER_UNIT))


def _decide_customer_events(customer: Customer, subscription: Subscription | None,
                            items: list[tuple[int, EventInput]], stamps: list[datetime],
                            periods: list[BillingPeriod], reservations: dict, ledger: CustomerLedger,
                            stored: dict, features: dict[str, Feature], per_unit: dict,
                            fingerprints: dict[int, str], now: datetime, results: list) -> list[UsageEvent]:
    """Decide one customer's events in order against its ledger; returns those recorded."""
    latest = now + timedelta(seconds=settings.OVERAGE_CLOCK_SKEW_SECONDS)
    grace = timedelta(seconds=settings.OVERAGE_PERIOD_GRACE_SECONDS)
    # Each period's "closed to events", worked out once (comparing aware datetimes is
    # a tenth of this loop's cost); events without a timestamp all share `now`'s object,
    # so the period found for the last one is reused for the next.
    closed = {p.id: p.status == BillingPeriod.Status.CLOSED or now >= p.end + grace for p in periods}
    last_stamp, last_period = None, None
    settled_here: set = set()
    customer_pk = customer.id  # (`.pk` is a property: this loop runs for every event)
    recorded = []
    for (index, item), timestamp in zip(items, stamps):
        fingerprint = fingerprints[index]
        prior = stored.get((customer_pk, item.event_id))
        if prior is not None:
            if prior.fingerprint != fingerprint:
                results[index] = BatchResult(error=Conflict(
                    f"Event id {item.event_id!r} was already used with a different body.",
                    code="idempotency_conflict", field="id"))
            else:
                results[index] = BatchResult(event=prior, created=False)
            continue
        try:
            if timestamp > latest:
                raise BillingError("The event's timestamp is in the future.", code="timestamp_in_future",
                                   field="timestamp")
            feature = features.get(item.feature)
            if feature is None:
                raise BillingError(f"Unknown feature {item.feature!r}.", code="unknown_feature", field="feature")
            if subscription is None:
                raise BillingError("The customer has no subscription.", code="no_subscription", field="customer")
            if timestamp is not last_stamp:
                last_stamp, last_period = timestamp, next((p for p in periods if p.start <= timestamp < p.end), None)
            period = last_period
            if period is None and timestamp > now:
                raise BillingError("The event's timestamp falls in a billing period that has not started yet.",
                                   code="timestamp_in_future", field="timestamp")
            if period is None:
                raise BillingError("No subscription covers the event's timestamp.", code="no_subscription",
                                   field="timestamp")
            if closed[period.id]:
                raise BillingError("The billing period of this event's timestamp is closed.", code="period_closed",
                                   field="timestamp")
            reservation = None
            if item.reservation_id:
                reservation = reservations.get((customer_pk, str(item.reservation_id)))
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

        credits = quantize_credits(item.quantity * per_unit[(period.plan_id, feature.id)])
        holding = reservation is not None and reservation.is_holding(now)
        charge = ledger.plan_charge(period=period, feature=feature, credits=credits, at=timestamp,
                                    reservation_id=reservation.pk if holding else None, estimate_amount=False)
        usage = new_row(
            UsageEvent, customer=customer, event_id=item.event_id, feature=feature, quantity=item.quantity, credits=credits,
            overage_credits=charge.overage_credits if charge.allowed else 0, timestamp=timestamp, received_at=now,
            properties=item.properties, period=period, reservation=reservation, fingerprint=fingerprint,
            status=UsageEvent.Status.ACCEPTED if charge.allowed else UsageEvent.Status.REJECTED,
            reject_reason="" if charge.allowed else charge.reason,
        )
        ledger.record(usage, charge)
        if reservation is not None:
            settled_here.add(reservation.pk)
        stored[(customer_pk, item.event_id)] = usage  # a repeat later in the same batch is a repeat
        results[index] = BatchResult(event=usage, created=True)
        recorded.append(usage)
    return recorded


def _enqueue_billing_follow_ups(customer_id: int, events: list[UsageEvent], *, auto_topup: bool) -> None:
    """After consumption: check the automatic top-up (customers who have it on), and
    progressive billing for periods whose plan has a threshold. No query here; the
    tasks decide."""
    from billing import tasks  # lazily: services never import celery tasks at import time

    accepted = [e for e in events if e.status == UsageEvent.Status.ACCEPTED]
    if not accepted:
        return
    if auto_topup:
        enqueue(tasks.run_auto_topup_task, customer_id)
    for period_id in sorted(pk for pk, period in periods_of(accepted).items()
                            if period.plan.progressive_billing_threshold is not None):
        enqueue(tasks.bill_progressively_task, period_id)
