"""Reads for the portal's usage history: daily and per-feature credits come from
UsageRollup (kept in the event's own transaction), never from a scan of raw events;
only the event list itself reads UsageEvent, one page (by keyset, see `event_page`) or
one export at a time."""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import Q, QuerySet, Sum

from billing.models import BillingPeriod, Customer, UsageEvent, UsageRollup
from plans.models import Feature
from plans.money import ZERO, credits_total


@dataclass(frozen=True)
class DayCredits:
    day: date  # a UTC calendar day
    credits: Decimal


@dataclass(frozen=True)
class FeatureTotals:
    feature: Feature
    events: int
    quantity: Decimal
    credits: Decimal
    overage_credits: Decimal


def customer_periods(customer: Customer) -> QuerySet[BillingPeriod]:
    """The customer's billing periods, newest (the current one) first."""
    return BillingPeriod.objects.filter(customer=customer).order_by("-start")


def customer_period(customer: Customer, period_id) -> BillingPeriod | None:
    """One of the customer's own periods; None for another customer's id, so a guessed
    id reveals nothing."""
    try:
        return BillingPeriod.objects.select_related("plan").get(customer=customer, pk=int(period_id))
    except (BillingPeriod.DoesNotExist, TypeError, ValueError):
        return None


def previous_period(period: BillingPeriod) -> BillingPeriod | None:
    return (BillingPeriod.objects.filter(customer_id=period.customer_id, start__lt=period.start)
            .order_by("-start").first())


def period_days(period: BillingPeriod) -> list[date]:
    """The UTC days the period touches (its end is exclusive)."""
    first = period.start.astimezone(UTC).date()
    last = (period.end - timedelta(microseconds=1)).astimezone(UTC).date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def daily_credits(period: BillingPeriod) -> list[DayCredits]:
    """Credits of accepted usage per UTC day of the period, every day listed (0 if idle)."""
    sums = {
        row["day"]: credits_total(row["total"])
        for row in UsageRollup.objects.filter(period=period).values("day").annotate(total=Sum("credits"))
    }
    return [DayCredits(day, sums.get(day, ZERO)) for day in period_days(period)]


def feature_totals(period: BillingPeriod) -> list[FeatureTotals]:
    """Accepted usage per feature over the period, most credits first."""
    rows = (UsageRollup.objects.filter(period=period).values("feature")
            .annotate(n=Sum("events"), q=Sum("quantity"), c=Sum("credits"), o=Sum("overage_credits")))
    features = Feature.objects.in_bulk([row["feature"] for row in rows])
    totals = [
        FeatureTotals(feature=features[row["feature"]], events=row["n"] or 0, quantity=credits_total(row["q"]),
                      credits=credits_total(row["c"]), overage_credits=credits_total(row["o"]))
        for row in rows
    ]
    return sorted(totals, key=lambda t: (-t.credits, t.feature.code))


def utc_day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def clamp_days(period: BillingPeriod, since: date | None, until: date | None) -> tuple[date | None, date | None]:
    """The day filters clamped to the days the period touches: events never lie outside
    it, and a far bound (`to=9999-12-31`, `from=0001-01-01`) must not overflow the day
    arithmetic below."""
    days = period_days(period)
    if since is not None:
        since = max(since, days[0])
    if until is not None:
        until = min(until, days[-1])
    return since, until


def period_event_count(customer: Customer, period: BillingPeriod, *, feature: Feature | None = None,
                       since: date | None = None, until: date | None = None) -> int:
    """How many events `period_events` lists for the same filters, without counting raw
    events: accepted ones from the day rollups (the filters are whole UTC days), plus
    the rejected ones, which are rare and reached through their own partial index."""
    since, until = clamp_days(period, since, until)
    rollups = UsageRollup.objects.filter(period=period)
    rejected = UsageEvent.objects.filter(period=period, status=UsageEvent.Status.REJECTED)
    if feature is not None:
        rollups, rejected = rollups.filter(feature=feature), rejected.filter(feature=feature)
    if since is not None:
        rollups = rollups.filter(day__gte=since)
        rejected = rejected.filter(timestamp__gte=utc_day_start(since))
    if until is not None:
        rollups = rollups.filter(day__lte=until)
        rejected = rejected.filter(timestamp__lt=utc_day_start(until + timedelta(days=1)))
    accepted = rollups.aggregate(total=Sum("events"))["total"] or 0
    return accepted + rejected.filter(customer=customer).count()


def period_events(customer: Customer, period: BillingPeriod, *, feature: Feature | None = None,
                  since: date | None = None, until: date | None = None) -> QuerySet[UsageEvent]:
    """The customer's events in the period (accepted and rejected), newest first;
    `since` and `until` are UTC days, both included."""
    # The period leads the (period, timestamp, id) and (period, feature, timestamp, id)
    # indexes, which give this order. No time bounds of the period itself: the planner
    # would multiply their selectivity by the period's and, taking a small period for a
    # handful of rows, sort it whole rather than read 51 rows off the index.
    since, until = clamp_days(period, since, until)
    events = UsageEvent.objects.filter(period=period, customer=customer).select_related("feature")
    if feature is not None:
        events = events.filter(feature=feature)
    if since is not None:
        events = events.filter(timestamp__gte=utc_day_start(since))
    if until is not None:
        events = events.filter(timestamp__lt=utc_day_start(until + timedelta(days=1)))
    return events.order_by("-timestamp", "-id")


EVENTS_PER_PAGE = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_ID = 2**63 - 1  # a bigint: a larger id in a hand-made cursor must not reach the query


@dataclass(frozen=True)
class EventCursor:
    """A position in the event list: an event's (timestamp, id), the list's order. A
    page is "the next 50 after (or before) this position", read straight off the
    (customer, timestamp, id) index: the same cost at any depth, where OFFSET reads
    and drops every row above the page, and rows that arrive meanwhile neither repeat
    nor skip a row on the next page."""

    timestamp: datetime
    id: int

    @classmethod
    def of(cls, event: UsageEvent) -> "EventCursor":
        return cls(event.timestamp, event.pk)

    def token(self) -> str:
        """For a URL: microseconds since the epoch (exact, unlike a float) and the id."""
        return f"{(self.timestamp - _EPOCH) // timedelta(microseconds=1)}_{self.id}"

    @classmethod
    def parse(cls, token: str | None) -> "EventCursor | None":
        """None for a missing or malformed token (the list then starts at the newest)."""
        try:
            micros, pk = (token or "").split("_")
            cursor = cls(_EPOCH + timedelta(microseconds=int(micros)), int(pk))
        except (ValueError, OverflowError):
            return None
        return cursor if 0 <= cursor.id <= _MAX_ID else None


@dataclass
class EventPage:
    """One page of the event list, newest first. `newer` / `older`: where the
    neighbouring pages start (before the first row / after the last), None at an end."""

    events: list[UsageEvent]
    newer: EventCursor | None
    older: EventCursor | None


def _older_than(events: QuerySet[UsageEvent], cursor: EventCursor) -> QuerySet[UsageEvent]:
    # (timestamp, id) < cursor. The plain `timestamp <=` bound is what the index range
    # scan uses; the OR only drops the cursor's own instant's later ids.
    return events.filter(timestamp__lte=cursor.timestamp).filter(
        Q(timestamp__lt=cursor.timestamp) | Q(id__lt=cursor.id))


def _newer_than(events: QuerySet[UsageEvent], cursor: EventCursor) -> QuerySet[UsageEvent]:
    return events.filter(timestamp__gte=cursor.timestamp).filter(
        Q(timestamp__gt=cursor.timestamp) | Q(id__gt=cursor.id)).order_by("timestamp", "id")


def _any(events: QuerySet[UsageEvent]) -> bool:
    """Whether the (ordered) queryset has a row, read as its first row in index order.
    Not .exists(): that drops the ORDER BY, and PostgreSQL then expects a sequential
    scan to meet a match at once, where it reads millions of rows first."""
    return bool(list(events.values_list("pk", flat=True)[:1]))


def event_page(customer: Customer, period: BillingPeriod, *, feature: Feature | None = None,
               since: date | None = None, until: date | None = None, after: EventCursor | None = None,
               before: EventCursor | None = None, size: int = EVENTS_PER_PAGE) -> EventPage:
    """The page of `period_events` (same filters) just older than `after`, or just
    newer than `before`, or else the newest page. Two short index reads: the page (one
    row more, to know whether the list goes on that way) and an EXISTS the other way.

    Going newer from near the top, with less than a page left above `before`, gives
    the newest page rather than a short one, so "Newer" always lands on full pages."""
    events = period_events(customer, period, feature=feature, since=since, until=until)
    if before is not None:
        rows = list(_newer_than(events, before)[:size + 1])
        if len(rows) >= size:
            more = len(rows) > size
            rows = rows[:size][::-1]
            last = EventCursor.of(rows[-1])
            return EventPage(rows, newer=EventCursor.of(rows[0]) if more else None,
                             older=last if _any(_older_than(events, last)) else None)
        after = None  # less than a page above: the newest page
    if after is not None:
        rows = list(_older_than(events, after)[:size + 1])
        anchor = EventCursor.of(rows[0]) if rows else after
        return EventPage(rows[:size], newer=anchor if _any(_newer_than(events, anchor)) else None,
                         older=EventCursor.of(rows[size - 1]) if len(rows) > size else None)
    rows = list(events[:size + 1])
    return EventPage(rows[:size], newer=None, older=EventCursor.of(rows[size - 1]) if len(rows) > size else None)


EXPORT_CHUNK = 2000
EXPORT_FIELDS = ("event_id", "timestamp", "feature__code", "quantity", "credits", "overage_credits", "status",
                 "reject_reason")


def period_event_chunks(customer: Customer, period: BillingPeriod, *, feature: Feature | None = None,
                        since: date | None = None, until: date | None = None, size: int = EXPORT_CHUNK):
    """Every event `period_events` lists (same filters, same order) as tuples of
    EXPORT_FIELDS, a list of up to `size` at a time, for an export of millions of rows.
    Each chunk is its own short read by keyset after the previous chunk's last row:
    the first rows come at once (a server-side cursor over the whole period let the
    planner choose to sort it first), and no cursor or transaction stays open while
    the client downloads."""
    events = period_events(customer, period, feature=feature, since=since, until=until)
    after = None
    while True:
        page = events if after is None else _older_than(events, after)
        rows = list(page.values_list(*EXPORT_FIELDS, "id")[:size])
        if rows:
            yield [row[:-1] for row in rows]
        if len(rows) < size:
            return
        after = EventCursor(rows[-1][1], rows[-1][-1])
