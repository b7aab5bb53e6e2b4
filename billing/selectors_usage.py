"""Reads for the portal's usage history: daily and per-feature credits come from
UsageRollup (kept in the event's own transaction), never from a scan of raw events;
only the event list itself reads UsageEvent, one page or one export at a time."""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import QuerySet, Sum

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
    # An event lies in the period its timestamp falls in: the time bounds let the
    # (customer, timestamp) index start at the period's end instead of the newest event.
    since, until = clamp_days(period, since, until)
    events = UsageEvent.objects.filter(customer=customer, period=period, timestamp__gte=period.start,
                                       timestamp__lt=period.end).select_related("feature")
    if feature is not None:
        events = events.filter(feature=feature)
    if since is not None:
        events = events.filter(timestamp__gte=utc_day_start(since))
    if until is not None:
        events = events.filter(timestamp__lt=utc_day_start(until + timedelta(days=1)))
    return events.order_by("-timestamp", "-id")
