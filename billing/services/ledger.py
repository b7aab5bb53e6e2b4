"""The only code that writes ledger entries: granting, charging usage, expiring.

Consumption order, holds and overage are decided by `CustomerLedger.plan_charge`, so
the entitlement check, a single event and a batch take exactly the same decision.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from operator import itemgetter
from types import MappingProxyType
from typing import Mapping

from django.conf import settings
from django.db import transaction
from django.db.models import DateTimeField, JSONField
from django.db.models.base import ModelState
from django.utils import timezone

from billing.errors import BillingError, Conflict
from billing.models import (
    BillingPeriod, CreditGrant, Customer, LedgerEntry, Reservation, ReservationHold, Subscription,
    UsageEvent, UsageRollup,
)
from billing.services import rows
from billing.services.json_text import compact_encoder
from billing.services.caps import effective_overage_cap  # noqa: F401 - also imported from here
from billing.services.locks import lock_customer
from plans.models import Feature, Plan
from plans.money import ZERO
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
                  pack=None, cost: Decimal = ZERO, currency: str = "", now: datetime,
                  entry_kind: str = LedgerEntry.Kind.GRANT, created_by=None, created_by_api_key=None,
                  reason: str = "", new: bool = False) -> CreditGrant:
    """Add a bucket of credits and its entry (`grant`, or `rollover` for credits carried
    into a new period). The caller holds the customer's lock. With an idempotency key,
    a repeat returns the first grant unchanged. `created_by` (a user) or
    `created_by_api_key` and `reason` record who asked for a manual grant and why.
    `new=True` skips the lookup for a key that cannot exist yet (it names something the
    caller just created); the unique (customer, key) constraint still refuses a repeat."""
    if credits <= ZERO:
        raise ValueError("a grant must add a positive number of credits")
    if idempotency_key and not new:
        existing = CreditGrant.objects.filter(customer=customer, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    grant = CreditGrant.objects.create(
        customer=customer, source=source, credits=credits, remaining=credits,
        priority=CreditGrant.PRIORITY_BY_SOURCE[source], effective_at=effective_at, expires_at=expires_at,
        period=period, pack=pack, idempotency_key=idempotency_key, description=description,
        cost=cost, currency=currency, created_by=created_by, created_by_api_key=created_by_api_key, reason=reason,
    )
    if features:
        grant.features.set(features)
    LedgerEntry.objects.create(
        customer=customer, kind=entry_kind, credits=credits, grant=grant, period=period,
        effective_at=effective_at, note=description[:255],
    )
    return grant


@transaction.atomic
def grant_credits_once(*, customer: Customer, idempotency_key: str, credits: Decimal, source: str,
                       now: datetime, expires_at: datetime | None = None, features=(),
                       description: str = "", created_by=None, api_key=None,
                       reason: str | None = None) -> tuple[CreditGrant, bool]:
    """A grant requested from outside (API, admin), effective now: idempotent by key,
    and a repeat of a key with different terms is a conflict rather than a silent
    no-op. Returns (grant, created).

    Who asked is recorded: `created_by` (the admin's user) or `api_key`, with `reason`,
    which must not be empty. A caller that passes no reason at all (None) records the
    description as the reason."""
    features = list(features)
    terms = grant_terms(credits=credits, source=source, expires_at=expires_at, feature_codes=[f.code for f in features])
    lock_customer(customer.pk)
    existing = CreditGrant.objects.filter(customer=customer, idempotency_key=idempotency_key).first()
    if existing is not None:
        # A retry is answered before validation: "expires_at must be in the future" was
        # true when the grant was made, and a retry must get the same answer.
        existing_terms = grant_terms(credits=existing.credits, source=existing.source, expires_at=existing.expires_at,
                                     feature_codes=[f.code for f in existing.features.all()])
        if existing_terms != terms:
            raise Conflict("This idempotency_key was used for a different grant.", code="idempotency_conflict",
                           field="idempotency_key")
        return existing, False
    check_grant_request(credits=credits, expires_at=expires_at, now=now)
    if reason is None:
        reason = description
    elif not reason.strip():
        raise BillingError("Say why these credits are granted (reason).", code="missing_field", field="reason",
                           status=400)
    grant = grant_credits(customer=customer, credits=credits, source=source, effective_at=now,
                          expires_at=expires_at, features=features, idempotency_key=idempotency_key,
                          description=description, now=now, created_by=created_by, created_by_api_key=api_key,
                          reason=reason.strip())
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


# --- Charging usage ---------------------------------------------------------------------

CONSUME, OVERAGE = LedgerEntry.Kind.CONSUME, LedgerEntry.Kind.OVERAGE
_NOTHING_HELD = (MappingProxyType({}), MappingProxyType({}))  # by grant, by period
# A usage entry, recorded and not yet written, is a tuple (customer id, kind, credits,
# grant or None, period id, event, feature id, effective at).
# The columns `flush_many` writes a usage entry's row to, in its order.
_USAGE_ENTRY_FIELDS = ("customer_id", "kind", "credits", "grant_id", "period_id", "event_id", "feature_id",
                       "effective_at", "created_at", "note")


@dataclass
class Draw:
    grant: CreditGrant
    credits: Decimal


@dataclass
class ChargePlan:
    """What charging `credits` for a feature at an instant would do."""

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


def active_reservations(customer: Customer, now: datetime):
    """Reservations whose holds count right now."""
    return Reservation.objects.filter(customer=customer, status=Reservation.Status.ACTIVE, expires_at__gt=now)


class CustomerLedger:
    """One customer's credit position, loaded once, and the charges decided and written
    against it.

    Every way of using credits goes through here: a single event, a batch (one load and
    one flush for all of a customer's events), and the entitlement check (decide only).
    Decisions are taken in memory in the order charges are made, each seeing the ones
    before it, and written by `flush()` in a handful of bulk statements. Whoever
    decides and writes must hold the customer's lock from load to flush.

    Consumption order: soonest expiry first, then priority (included and promotional
    before purchased), then oldest. Credits held by other active reservations are not
    available, so a reserved request can always settle what it reserved.
    """

    def __init__(self, customer: Customer, subscription: Subscription | None, *, now: datetime,
                 since: datetime | None = None, _loaded: tuple | None = None):
        """`since`: the earliest instant a charge will be made at (default: now);
        grants that expired before it cannot pay and are not loaded."""
        self.customer, self.subscription, self.now = customer, subscription, now
        grants, self._scopes, self._holds = _loaded or self._load([customer.pk], now, since or now)[customer.pk]
        self._grants: list[CreditGrant] = grants
        self._entries: list[tuple] = []  # usage entries not yet written (see _USAGE_ENTRY_FIELDS)
        self._events: list[UsageEvent] = []
        self._periods: dict[int, BillingPeriod] = {}
        self._dirty_grants: dict[int, CreditGrant] = {}
        self._settled: list = []
        self._rollups: dict[tuple, list] = {}
        self._caps: dict[int, Decimal | None] = {}

    @classmethod
    def load_many(cls, customers: dict[int, Customer], subscriptions: dict[int, Subscription | None], *,
                  now: datetime, since: datetime, loaded: dict[int, tuple] | None = None) -> dict[int, "CustomerLedger"]:
        """One ledger per customer, loaded in three queries for all of them (a batch), or
        from what `_load(…, reads=…)` read already (`loaded`)."""
        loaded = loaded if loaded is not None else cls._load(list(customers), now, since)
        return {pk: cls(customer, subscriptions.get(pk), now=now, _loaded=loaded[pk])
                for pk, customer in customers.items()}

    @staticmethod
    def _load(customer_ids: list[int], now: datetime, since: datetime,
              reads: rows.Together | None = None) -> dict[int, tuple]:
        """customer id → (usable grants in consumption order, grant scopes, active holds).
        Hand-written SQL (`rows`): this runs for every group of single events. With
        `reads`, the queries are queued there and the answer is filled when they run."""
        loaded = {pk: ([], {}, {}) for pk in customer_ids}
        of_customers, customer_params = rows.one_of("customer_id", customer_ids, "bigint")
        usable = f"{of_customers} AND remaining > 0 AND (expires_at IS NULL OR expires_at > %s)"
        usable_params = [*customer_params, rows.db_value(CreditGrant, "expires_at", since)]

        def assemble(reservations):
            owner = {}
            for grant in grants:
                loaded[grant.customer_id][0].append(grant)
                owner[grant.pk] = grant.customer_id
            for grant_id, feature_id in scopes:
                if grant_id in owner:
                    loaded[owner[grant_id]][1].setdefault(grant_id, set()).add(feature_id)
            # Active holds: reservation → ({grant: credits}, overage credits, period id, expiry).
            if reservations:
                holds: dict = {r.pk: {} for r in reservations}
                for hold in ReservationHold.objects.filter(reservation__in=reservations):
                    holds[hold.reservation_id][hold.grant_id] = hold.credits
                for reservation in reservations:
                    loaded[reservation.customer_id][2][reservation.pk] = (
                        holds[reservation.pk], reservation.overage_credits, reservation.period_id,
                        reservation.expires_at)

        with rows.queued(reads) as queue:
            grants = queue.fetch(CreditGrant, usable, usable_params,
                                 order_by="expires_at IS NULL, expires_at, priority, created_at, id")
            # The scopes of those same grants (a subquery: their ids are not known yet).
            scopes = queue.values(
                f"SELECT creditgrant_id, feature_id FROM {CreditGrant.features.through._meta.db_table} "
                f"WHERE creditgrant_id IN (SELECT id FROM {CreditGrant._meta.db_table} WHERE {usable})",
                usable_params, [None, None])
            queue.fetch(Reservation, f"{of_customers} AND status = %s AND expires_at > %s",
                        [*customer_params, Reservation.Status.ACTIVE, rows.db_value(Reservation, "expires_at", now)],
                        then=assemble)
        return loaded

    # -- deciding --

    def _held(self, exclude) -> tuple[Mapping[int, Decimal], Mapping[int, Decimal]]:
        if not self._holds:
            return _NOTHING_HELD  # (every charge asks; most customers hold nothing)
        by_grant: dict[int, Decimal] = {}
        overage_by_period: dict[int, Decimal] = {}
        for reservation_id, (grants, overage, period_id, expires_at) in self._holds.items():
            if reservation_id == exclude or expires_at <= self.now:
                continue  # (a cached position may hold reservations that have expired since)
            for grant_id, credits in grants.items():
                by_grant[grant_id] = by_grant.get(grant_id, ZERO) + credits
            overage_by_period[period_id] = overage_by_period.get(period_id, ZERO) + overage
        return by_grant, overage_by_period

    def _usable(self, grant: CreditGrant, feature: Feature, at: datetime) -> bool:
        scope = self._scopes.get(grant.id)
        return (grant.remaining > ZERO and grant.effective_at <= at
                and (grant.expires_at is None or grant.expires_at > at)
                and (scope is None or feature.id in scope))

    def plan_charge(self, *, period: BillingPeriod, feature: Feature, credits: Decimal, at: datetime,
                    reservation_id=None, estimate_amount: bool = True) -> ChargePlan:
        """Decide how `credits` would be paid: from which grants, how much overage, or
        why not. `reservation_id` is the caller's own active reservation, whose holds
        are available to it. `estimate_amount=False` leaves `estimated_overage_amount`
        at zero (an event needs the decision, not the estimate an answer shows)."""
        period = self._periods.setdefault(period.id, period)
        plan = period.plan
        held_by_grant, held_overage = self._held(reservation_id)
        draws, need, available = [], credits, ZERO
        for grant in self._grants:
            if not self._usable(grant, feature, at):
                continue
            free = grant.remaining - held_by_grant.get(grant.id, ZERO)
            if free <= ZERO:
                continue
            available += free
            take = min(free, need)
            if take > ZERO:
                draws.append(Draw(grant, take))
                need -= take

        committed_overage = period.overage_credits + held_overage.get(period.id, ZERO)
        result = ChargePlan(period=period, plan=plan, credits=credits, allowed=True, reason=Reason.OK,
                            draws=draws, overage_credits=need, available_credits=available)

        def estimate(overage: Decimal) -> Decimal:
            return price_overage(plan, overage).amount if estimate_amount else ZERO

        if self.subscription is not None and self.subscription.status == Subscription.Status.PAUSED:
            return self._refused(result, Reason.PAUSED, estimate(committed_overage))
        if need > ZERO:
            if not plan.overage_enabled and plan.hard_limit_behaviour == Plan.HardLimit.BLOCK:
                return self._refused(result, Reason.INSUFFICIENT_CREDITS, estimate(committed_overage))
            cap = self._cap(period) if plan.overage_enabled else None
            quote_after = (price_overage(plan, committed_overage + need)
                           if estimate_amount or cap is not None else None)
            # Compared before rounding: a $0 cap admits no overage at all, not the
            # fraction of a cent that rounds to $0.00.
            if cap is not None and quote_after.exact_amount > cap:
                return self._refused(result, Reason.SPEND_CAP_REACHED, estimate(committed_overage))
            result.reason = Reason.OVERAGE
            result.estimated_overage_amount = quote_after.amount if estimate_amount else ZERO
        else:
            result.estimated_overage_amount = estimate(committed_overage)
        return result

    def overage_cap_known(self, period: BillingPeriod, cap: Decimal | None) -> None:
        """The period's cap, already read (a cached position carries it)."""
        self._caps[period.pk] = cap

    def _cap(self, period: BillingPeriod) -> Decimal | None:
        if period.pk not in self._caps:
            self._caps[period.pk] = effective_overage_cap(period.plan, self.customer, period)
        return self._caps[period.pk]

    @staticmethod
    def _refused(result: ChargePlan, reason: str, estimate: Decimal) -> ChargePlan:
        result.allowed = False
        result.reason = reason
        result.draws = []
        result.estimated_overage_amount = estimate
        return result

    # -- recording --

    def record(self, event: UsageEvent, charge: ChargePlan) -> None:
        """Queue an event (accepted or rejected as `charge` decided) and, if accepted,
        its consumption. The in-memory position moves at once, so the next decision
        sees it; nothing reaches the database before `flush()`."""
        self._events.append(event)
        if event.reservation_id and event.reservation_id in self._holds:
            # Settling ends the hold whatever the outcome: unused held credits return.
            del self._holds[event.reservation_id]
            self._settled.append(event.reservation_id)
        if not charge.allowed:
            return
        # Entries as tuples, not model instances: a batch writes one or two
        # per event and nothing reads them back before they are written.
        customer_id = self.customer.id
        for draw in charge.draws:
            self._entries.append((customer_id, CONSUME, -draw.credits, draw.grant, charge.period.id, event,
                                  event.feature_id, event.timestamp))
            draw.grant.remaining -= draw.credits
            self._dirty_grants[draw.grant.id] = draw.grant
        if charge.overage_credits > ZERO:
            self._entries.append((customer_id, OVERAGE, -charge.overage_credits, None, charge.period.id, event,
                                  event.feature_id, event.timestamp))
        charge.period.credits_used += charge.credits
        charge.period.overage_credits += charge.overage_credits
        rollup = self._rollups.setdefault((charge.period.id, event.feature_id, event.timestamp.date()),
                                          [0, ZERO, ZERO, ZERO, 0])
        rollup[0] += 1
        rollup[1] += event.quantity
        rollup[2] += event.credits
        rollup[3] += event.overage_credits
        rollup[4] += 1 if event.overage_credits > ZERO else 0

    def included_drawn(self) -> dict[int, Decimal]:
        """Period → credits drawn from its plan allocation by the charges not yet flushed."""
        drawn: dict[int, Decimal] = {}
        for _, _, credits, grant, *_ in self._entries:
            if grant is not None and grant.source == CreditGrant.Source.PLAN_ALLOCATION and grant.period_id:
                drawn[grant.period_id] = drawn.get(grant.period_id, ZERO) - credits
        return drawn

    def flush(self) -> None:
        self.flush_many([self])

    @staticmethod
    def flush_many(ledgers: list["CustomerLedger"], keys: list[list[int]] | None = None) -> None:
        """Write everything the ledgers recorded since their last flush, all customers
        together in a handful of bulk statements. New balances are computed here in
        Decimal rather than with F() in SQL, because SQLite does decimal arithmetic in
        floating point; the customers' locks keep them current. (Rollups, which several
        flushes may add to, are added by PostgreSQL in numeric there, in Python on SQLite.)
        `keys`: [event keys, entry keys] drawn beforehand (`draw_keys`) to use first."""
        connection = transaction.get_connection()
        assert connection.in_atomic_block, "flush needs the customers' transaction"
        events = [e for ledger in ledgers for e in ledger._events]
        entries = [entry for ledger in ledgers for entry in ledger._entries]
        keys = _enough_keys([(UsageEvent, events), (LedgerEntry, entries)], keys)
        bulk_insert(UsageEvent, events, keys=keys and keys[0])
        if events and events[-1].id is None:  # (bulk_create on a database that returns no keys)
            raise RuntimeError("the events were written without getting their keys back")
        now = timezone.now()  # entries' created_at, as auto_now_add would set it
        # The events have their keys now.
        insert_rows(LedgerEntry, _USAGE_ENTRY_FIELDS, [
            (customer_id, kind, credits, grant.id if grant is not None else None, period_id, event.id, feature_id,
             effective_at, now, "")
            for customer_id, kind, credits, grant, period_id, event, feature_id, effective_at in entries],
            keys=keys and keys[1])
        grants = [g for ledger in ledgers for g in ledger._dirty_grants.values()]
        periods = [p for ledger in ledgers for p in ledger._periods.values()]
        rollups = {key: totals for ledger in ledgers for key, totals in ledger._rollups.items()}
        if connection.vendor == "postgresql":
            # Balances, period totals and rollups in one statement (a group of single
            # events pays for every statement, whatever its size).
            execute_together([bulk_set_sql(CreditGrant, grants, ["remaining"]),
                              bulk_set_sql(BillingPeriod, periods, ["credits_used", "overage_credits"]),
                              _rollups_upsert_sql(rollups)])
        else:
            bulk_set(CreditGrant, grants, ["remaining"])
            bulk_set(BillingPeriod, periods, ["credits_used", "overage_credits"])
            CustomerLedger._flush_rollups(rollups)
        settled = [pk for ledger in ledgers for pk in ledger._settled]
        if settled:
            Reservation.objects.filter(pk__in=settled, status=Reservation.Status.ACTIVE).update(
                status=Reservation.Status.SETTLED, ended_at=ledgers[0].now)
        for ledger in ledgers:
            ledger._events, ledger._entries, ledger._dirty_grants, ledger._settled, ledger._rollups = [], [], {}, [], {}

    @staticmethod
    def _flush_rollups(rollups: dict[tuple, list]) -> None:
        """Add to the rollups in Python (SQLite adds decimals in floating point); on
        PostgreSQL `_rollups_upsert_sql` lets the database add them in exact numeric."""
        if not rollups:
            return
        keys = list(rollups)
        period_ids, feature_ids = list({k[0] for k in keys}), list({k[1] for k in keys})
        days = [rows.db_value(UsageRollup, "day", day) for day in {k[2] for k in keys}]
        existing = {
            (r.period_id, r.feature_id, r.day): r
            for r in rows.fetch(UsageRollup, f"period_id IN ({rows.in_list(period_ids)}) "
                                f"AND feature_id IN ({rows.in_list(feature_ids)}) AND day IN ({rows.in_list(days)})",
                                [*period_ids, *feature_ids, *days])
        }
        new, changed = [], []
        for key, (events, quantity, credits, overage, overage_events) in rollups.items():
            rollup = existing.get(key)
            if rollup is None:
                new.append(UsageRollup(period_id=key[0], feature_id=key[1], day=key[2], events=events,
                                       quantity=quantity, credits=credits, overage_credits=overage,
                                       overage_events=overage_events))
            else:
                rollup.events += events
                rollup.quantity += quantity
                rollup.credits += credits
                rollup.overage_credits += overage
                rollup.overage_events += overage_events
                changed.append(rollup)
        UsageRollup.objects.bulk_create(new)
        bulk_set(UsageRollup, changed, ["events", "quantity", "credits", "overage_credits", "overage_events"])


def _rollups_upsert_sql(rollups: dict[tuple, list]) -> tuple[str, list] | None:
    """PostgreSQL: add each (period, feature, day)'s totals to its rollup row, created if
    missing, in exact numeric."""
    if not rollups:
        return None
    table = UsageRollup._meta.db_table
    columns = ["events", "quantity", "credits", "overage_credits", "overage_events"]
    row = "(%s::bigint, %s::bigint, %s::date, %s::integer, %s::numeric, %s::numeric, %s::numeric, %s::integer)"
    return (f"INSERT INTO {table} (period_id, feature_id, day, {', '.join(columns)}) "
            f"VALUES {', '.join([row] * len(rollups))} "
            "ON CONFLICT (period_id, feature_id, day) DO UPDATE SET "
            + ", ".join(f"{column} = {table}.{column} + EXCLUDED.{column}" for column in columns),
            [value for key, totals in sorted(rollups.items()) for value in (*key, *totals)])


def execute_together(statements: list[tuple[str, list] | None]) -> None:
    """PostgreSQL: run data-modifying statements (none reading what another writes) as
    one, all but the last as `WITH` clauses, which PostgreSQL runs to completion whether
    or not they are read."""
    statements = [statement for statement in statements if statement is not None]
    if not statements:
        return
    *before, (last_sql, last_params) = statements
    sql = (("WITH " + ", ".join(f"w{index} AS ({text})" for index, (text, _) in enumerate(before)) + " ")
           if before else "") + last_sql
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(sql, [value for _, params in statements for value in params])


def _enough_keys(tables: list[tuple], drawn: list[list[int]] | None) -> list[list[int]] | None:
    """One key per object for each (model, objects): those `drawn` beforehand first, the
    rest drawn now (they come after, so each table's keys still ascend)."""
    drawn = drawn or [[] for _ in tables]
    more = draw_keys([(model, max(0, len(objects) - len(have))) for (model, objects), have in zip(tables, drawn)])
    if more is None:
        return None
    return [have[:len(objects)] + extra for (_, objects), have, extra in zip(tables, drawn, more)]


def draw_keys(counts: list[tuple], reads: rows.Together | None = None) -> list[list[int]] | None:
    """PostgreSQL: primary keys for (model, how many) from each model's sequence, in one
    query, ascending per model; None elsewhere (bulk_create gets them). Each sequence is
    named once (a MATERIALIZED CTE, or PostgreSQL inlines it and looks the sequence up
    for every key: 3 of every 3.5 ms of 1 000 keys). With `reads`, the query is queued
    there and the lists are filled when it runs (keys drawn and not used leave gaps, as
    a rolled-back insert does)."""
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return None
    wanted = [(index, model, count) for index, (model, count) in enumerate(counts) if count]
    keys: list[list[int]] = [[] for _ in counts]
    if not wanted:
        return keys
    sequences = ", ".join(f"s{index} AS MATERIALIZED (SELECT pg_get_serial_sequence(%s, %s)::regclass AS seq)"
                          for index, _, _ in wanted)
    # One row, one array of keys per model: 2 000 rows of one key each cost a
    # millisecond of Python to receive.
    draws = ", ".join(f"(SELECT array_agg(k ORDER BY k) FROM (SELECT nextval(s{index}.seq) AS k "
                      f"FROM s{index}, generate_series(1, %s)) AS d{index})" for index, _, _ in wanted)
    params = [value for _, model, _ in wanted for value in (model._meta.db_table, model._meta.pk.column)]

    def deal(drawn):
        for (index, _, _), model_keys in zip(wanted, drawn[0]):
            keys[index].extend(model_keys)

    with rows.queued(reads) as queue:
        queue.values(f"WITH {sequences} SELECT {draws}", params + [count for _, _, count in wanted],
                     [None] * len(wanted), then=deal)
    return keys


def bulk_insert(model, objects: list, *, keys: list[int] | None = None) -> None:
    """Insert new objects and give them their primary keys. On PostgreSQL the keys are
    drawn from the table's sequence in one query and the rows sent by `COPY`: Django's
    `bulk_create` prepares every value of every row in Python and psycopg quotes them
    again, which was half a 1 000-event batch's time; elsewhere `bulk_create`. Like
    `bulk_create`, no signals and no `save()`. Keys drawn in one call ascend, so the
    rows keep the objects' order; `keys` passes keys drawn beforehand (`draw_keys`,
    several tables' in one query)."""
    if not objects:
        return
    assert not model._meta.parents, "a child model's key is its parent's: not for bulk_insert"
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        model.objects.bulk_create(objects)
        return
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    # What `Field.pre_save(obj, add=True)` does, decided once per field rather than per
    # value: auto_now_add takes the flush's instant; everything else is the attribute.
    now = timezone.now()
    stamped = [f.attname for f in fields if getattr(f, "auto_now_add", False) or getattr(f, "auto_now", False)]
    relations = [(i, f) for i, f in enumerate(fields) if f.is_relation]
    attnames = [f.attname for f in fields]
    values_of = itemgetter(*attnames) if len(attnames) > 1 else (lambda values: (values[attnames[0]],))

    def row_of(obj) -> list:
        values = obj.__dict__
        for attname in stamped:
            values[attname] = now
        row = list(values_of(values))
        for i, f in relations:
            if row[i] is None and f.is_cached(obj):
                # An object saved earlier (the caller's to have saved first).
                related = f.get_cached_value(obj)
                if related is not None:
                    if related.pk is None:
                        raise ValueError(f"{model.__name__}.{f.name}: the related object is unsaved")
                    row[i] = values[f.attname] = related.pk
        return row

    keys = _copy_rows(model, attnames, map(row_of, objects), len(objects), keys)
    pk_attname, alias = model._meta.pk.attname, connection.alias
    for key, obj in zip(keys, objects):
        obj.__dict__[pk_attname] = key  # what `.pk = key` sets, without the property's walk over parents
        state = obj._state
        state.adding, state.db = False, alias


def insert_rows(model, attnames: tuple[str, ...], values: list[tuple], *, keys: list[int] | None = None) -> None:
    """Insert rows given as tuples of `attnames` values (every concrete field but the
    primary key, by attribute name), for rows written by the thousand with no model
    instance to build: on PostgreSQL by `COPY` with keys from the sequence (or `keys`),
    elsewhere `bulk_create`. No signals, no `save()`, no defaults: every value is given."""
    if not values:
        return
    assert set(attnames) == {f.attname for f in model._meta.concrete_fields if not f.primary_key}, \
        f"{model.__name__}: a value for every field"
    if transaction.get_connection().vendor != "postgresql":
        model.objects.bulk_create([model(**dict(zip(attnames, row))) for row in values])
        return
    _copy_rows(model, attnames, values, len(values), keys)


def _copy_rows(model, attnames, values, count: int, keys: list[int] | None) -> list[int]:
    """PostgreSQL: `COPY` rows (in `attnames` order) into `model`'s table, each with its
    key; the keys, drawn from the table's sequence unless given."""
    connection = transaction.get_connection()
    assert connection.in_atomic_block, "COPY outside a transaction would commit on its own"
    meta, quote = model._meta, connection.ops.quote_name
    by_attname = {f.attname: f for f in meta.concrete_fields}
    fields = [by_attname[attname] for attname in attnames]
    # Some values go as text, which COPY parses: JSON, and instants, whose dumper cost
    # ten times an integer's (0.9 µs; four per event in a batch, most of them the same
    # object: the batch's `now`).
    as_text = [(i, _json_text if f.encoder is None else partial(json.dumps, cls=f.encoder))
               for i, f in enumerate(fields) if isinstance(f, JSONField)]
    as_text += [(i, _InstantText().text) for i, f in enumerate(fields) if isinstance(f, DateTimeField)]
    if keys is None:
        keys = draw_keys([(model, count)])[0]
    assert len(keys) == count, "one key per row"
    with connection.cursor() as cursor:
        columns = ", ".join(quote(f.column) for f in [meta.pk, *fields])
        with cursor.cursor.copy(f"COPY {quote(meta.db_table)} ({columns}) FROM STDIN") as copy:
            for key, row in zip(keys, values):
                row = [key, *row]
                for i, text in as_text:
                    if row[i + 1] is not None:
                        row[i + 1] = text(row[i + 1])
                copy.write_row(row)
    return keys


_json_text = compact_encoder()  # JSON for jsonb columns (PostgreSQL keeps its own form of it)


class _InstantText:
    """An aware datetime as PostgreSQL reads a timestamptz (ISO 8601 with its offset),
    the text of the last object kept: a batch's rows share a handful of instants."""

    def __init__(self):
        self._last, self._text = None, ""

    def text(self, value):
        if value is self._last:
            return self._text
        if value.tzinfo is None:
            return value  # naive: as psycopg sends it
        self._last, self._text = value, value.isoformat()
        return self._text


def new_row(model, **values):
    """`model(**values)`, for the objects a batch builds by the thousand (events and their
    entries): `Model.__init__` runs every field through its descriptor, a fifth of
    recording an event. Attributes are set directly and related objects cached as their
    descriptors cache them, by a plan made once per model and set of names. A test holds
    the result equal to `model(**values)`; models with init signals must not use it."""
    key = (model, *values)
    plan = _ROW_PLANS.get(key)
    if plan is None:
        plan = _ROW_PLANS[key] = _row_plan(model, list(values))
    defaults, factories, plain, relations = plan
    obj = model.__new__(model)
    obj._state = state = ModelState()
    attributes = obj.__dict__
    attributes.update(defaults)
    for attname, factory in factories:
        attributes[attname] = factory()
    for name in plain:
        attributes[name] = values[name]
    cache = state.fields_cache
    for name, attname, pk_attname in relations:
        value = cache[name] = values[name]
        if value is None:
            attributes[attname] = None
        else:
            attributes[attname] = getattr(value, pk_attname)
            if state.db is None:
                state.db = value._state.db  # as the descriptor does (the default router's answer)
    return obj


_ROW_PLANS: dict = {}


def _row_plan(model, names: list[str]) -> tuple:
    """(defaults, default factories, plain names, relations as (name, attname, related
    pk attname)) for building `model` from `names`."""
    fields = model._meta.concrete_fields
    defaults = {f.attname: f.get_default() for f in fields if not (f.has_default() and callable(f.default))}
    factories = [(f.attname, f.default) for f in fields if f.has_default() and callable(f.default)]
    by_name = {f.name: f for f in fields if f.is_relation}
    attnames = {f.attname for f in fields}
    plain, relations = [], []
    for name in names:
        if name in by_name:
            field = by_name[name]
            relations.append((name, field.attname, field.related_model._meta.pk.attname))
        elif name in attnames:
            plain.append(name)
        else:
            raise TypeError(f"{model.__name__}() got an unexpected keyword argument {name!r}")
    # Factories for fields given explicitly would only be overwritten.
    given = set(plain) | {attname for _, attname, _ in relations}
    return defaults, [(a, f) for a, f in factories if a not in given], plain, relations


def bulk_set(model, objects: list, fields: list[str]) -> None:
    """Write `fields` of each object (by primary key) in one statement. On PostgreSQL an
    `UPDATE … FROM (VALUES …)`: Django's `bulk_update` builds a CASE per field and row,
    which cost more Python than the rest of a batch's flush; elsewhere `bulk_update`."""
    if not objects:
        return
    if transaction.get_connection().vendor != "postgresql":
        model.objects.bulk_update(objects, fields)
        return
    execute_together([bulk_set_sql(model, objects, fields)])


def bulk_set_sql(model, objects: list, fields: list[str]) -> tuple[str, list] | None:
    """PostgreSQL: the `UPDATE … FROM (VALUES …)` of `bulk_set`."""
    if not objects:
        return None
    connection = transaction.get_connection()
    meta, quote = model._meta, connection.ops.quote_name
    columns = [meta.get_field(name).column for name in fields]
    types = [meta.pk.db_type(connection)] + [meta.get_field(name).db_type(connection) for name in fields]
    row = "(" + ", ".join(f"%s::{db_type}" for db_type in types) + ")"
    assignments = ", ".join(f"{quote(column)} = v.{quote(column)}" for column in columns)
    sql = (f"UPDATE {quote(meta.db_table)} AS t SET {assignments} "
           f"FROM (VALUES {', '.join([row] * len(objects))}) AS v(pk, {', '.join(quote(c) for c in columns)}) "
           f"WHERE t.{quote(meta.pk.column)} = v.pk")
    return sql, [value for obj in objects for value in (obj.pk, *(getattr(obj, name) for name in fields))]


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
            for grant in grants:  # read under the lock just now
                expire_grant(grant=grant, customer=customer, at=grant.expires_at, current=True)
                expired += 1
    return expired


def expire_grant(*, grant: CreditGrant, customer: Customer, at: datetime, note: str = "Expired",
                 credits: Decimal | None = None, kind: str = LedgerEntry.Kind.EXPIRE,
                 current: bool = False) -> Decimal:
    """Take `credits` (default: all remaining) out of a grant with an `expire` entry, or
    a `rollover` entry when they are carried into a new grant. Caller holds the lock;
    `current=True` when the grant was read under it in this transaction (its `remaining`
    is then up to date: this function keeps it so). Returns the credits taken."""
    if not current:
        grant.refresh_from_db(fields=["remaining"])
    taken = grant.remaining if credits is None else min(credits, grant.remaining)
    if taken <= ZERO:
        return ZERO
    LedgerEntry.objects.create(customer=customer, kind=kind, credits=-taken, grant=grant, period=grant.period,
                               effective_at=at, note=note)
    grant.remaining -= taken
    CreditGrant.objects.filter(pk=grant.pk).update(remaining=grant.remaining)
    return taken
