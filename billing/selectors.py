"""Reads that the API and the portal show. Money is priced by plans.pricing only."""

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Count, Sum, prefetch_related_objects
from django.db.models.functions import TruncDate

from billing.models import (
    BillingPeriod, CreditGrant, Customer, InvoiceLine, LedgerEntry, ReservationHold, UsageRollup,
)
from billing.services.alerts import included_credits_used
from billing.services.customers import current_period, live_subscription
from billing.services.invoicing import overage_waived_amount
from billing.services.ledger import active_reservations, effective_overage_cap
from plans.money import ZERO, credits_total, quantize_credits
from plans.pricing import PeriodQuote, price_period

PURCHASED_SOURCES = {CreditGrant.Source.PURCHASE, CreditGrant.Source.AUTO_TOPUP}


@dataclass
class Balance:
    """Credits a customer can still draw at one instant, by kind (holds excluded)."""

    included: Decimal = ZERO
    purchased: Decimal = ZERO
    promotional: Decimal = ZERO  # promotional, rolled-over and manual credits
    held: Decimal = ZERO  # held by active reservations

    @property
    def total(self) -> Decimal:
        return self.included + self.purchased + self.promotional


def balance_at(customer: Customer, at: datetime, now: datetime, *, with_holds: bool = True) -> Balance:
    """Credits usable at `at`, by kind; `held` counts active holds on those grants
    (holds exist only now, so a past balance has none)."""
    balance = Balance()
    grants = CreditGrant.objects.filter(customer=customer, remaining__gt=0, effective_at__lte=at).exclude(
        expires_at__lte=at
    )
    for source, remaining in grants.values_list("source").annotate(total=Sum("remaining")):
        remaining = credits_total(remaining)
        if source == CreditGrant.Source.PLAN_ALLOCATION:
            balance.included += remaining
        elif source in PURCHASED_SOURCES:
            balance.purchased += remaining
        else:
            balance.promotional += remaining
    if with_holds:
        balance.held = credits_total(
            ReservationHold.objects.filter(reservation__in=active_reservations(customer, now), grant__in=grants)
            .aggregate(total=Sum("credits"))["total"]
        )
    return balance


@dataclass
class FeatureUsage:
    feature: str
    name: str
    unit: str
    events: int
    quantity: Decimal
    credits: Decimal
    overage_credits: Decimal


@dataclass
class PeriodUsage:
    period: BillingPeriod
    balance: Balance
    quote: PeriodQuote
    spend_cap: Decimal | None
    by_feature: list[FeatureUsage] = field(default_factory=list)

    @property
    def credits_remaining(self) -> Decimal:
        return self.balance.total - self.balance.held


def period_usage(*, customer: Customer, now: datetime, at: datetime | None = None) -> PeriodUsage | None:
    """Usage of the period containing `at` (default: the current period). Balances are
    as of now for the current period and as of the period's last instant otherwise."""
    current = current_period(customer=customer, now=now)  # opens periods up to now
    if at is None or at >= now:
        period = current
    else:
        period = (
            BillingPeriod.objects.select_related("plan")
            .filter(customer=customer, start__lte=at, end__gt=at).order_by("-start").first()
        )
    if period is None:
        return None
    plan = period.plan
    # The plan's tiers once: the estimate, the forecast and the upgrade suggestion all price it.
    prefetch_related_objects([plan], "overage_tiers")
    is_current = current is not None and period.pk == current.pk
    balance_instant = now if is_current else min(now, period.end - timedelta(microseconds=1))
    rollups = (
        UsageRollup.objects.filter(period=period)
        .values("feature__code", "feature__name", "feature__unit")
        .annotate(events=Sum("events"), quantity=Sum("quantity"), credits=Sum("credits"),
                  overage_credits=Sum("overage_credits"))
        .order_by("-credits", "feature__code")
    )
    return PeriodUsage(
        period=period,
        balance=balance_at(customer, balance_instant, now, with_holds=is_current),
        quote=price_period(plan, period.overage_credits, waived=overage_waived_amount(period)),
        spend_cap=effective_overage_cap(plan, customer, period),
        by_feature=[
            FeatureUsage(r["feature__code"], r["feature__name"], r["feature__unit"], r["events"],
                         credits_total(r["quantity"]), credits_total(r["credits"]),
                         credits_total(r["overage_credits"]))
            for r in rollups
        ],
    )



def scheduled_plan(customer: Customer):
    """The plan a downgrade has scheduled for the customer's next period, or None."""
    subscription = live_subscription(customer)
    return subscription.pending_plan if subscription is not None else None


@dataclass
class LineUsage:
    """The usage behind an overage line: its overage credits by feature and by UTC day."""

    by_feature: list[dict]
    by_day: list[dict]
    paid_down: Decimal  # overage credits of the band paid down by purchases (not billed)
    entries: object  # the band's metered overage ledger entries (a queryset) in time order
    event_count: int  # how many events those entries belong to


def overage_line_usage(line) -> LineUsage:
    """Drill down from an overage invoice line to the overage entries it billed: those
    of its period after the previous overage line's last entry, up to its own.

    The usual line bills all of its period's overage at close; its breakdown then comes
    from the period's rollups (kept on ingestion), so a period of millions of events is
    not re-scanned. A progressive-billing band (part of a period) is summed from the
    ledger, which only it can split at an entry."""
    period = line.period
    previous = (
        InvoiceLine.objects.filter(period=period, kind=InvoiceLine.Kind.OVERAGE, overage_to__lte=line.overage_from)
        .exclude(pk=line.pk).order_by("-overage_to").values_list("through_entry_id", flat=True).first()
    )
    # Bounded by customer, kind and time as well, so the (customer, kind, effective_at)
    # index serves the band's entries in time order.
    overage = LedgerEntry.objects.filter(customer_id=period.customer_id, kind=LedgerEntry.Kind.OVERAGE,
                                         effective_at__gte=period.start, effective_at__lt=period.end, period=period)
    band = overage.filter(id__lte=line.through_entry_id or 0)
    if previous:
        band = band.filter(id__gt=previous)
    # Overage paid down by a purchase is a positive overage entry with no event.
    paid_down = credits_total(band.filter(event__isnull=True).aggregate(total=Sum("credits"))["total"])
    whole_period = (not previous and line.through_entry_id is not None
                    and not overage.filter(event__isnull=False, id__gt=line.through_entry_id).exists())
    # For a whole period the id bound is redundant, and leaving it out lets the planner
    # walk the time index instead of the primary key.
    entries = ((overage if whole_period else band).filter(event__isnull=False).select_related("event", "feature")
               .order_by("effective_at", "id"))
    if whole_period:
        rollups = UsageRollup.objects.filter(period=period, overage_credits__gt=0).order_by()
        by_feature = [
            {"feature": row["feature__code"], "overage_credits": credits_total(row["credits"]),
             "events": row["events"]}
            for row in rollups.values("feature__code").annotate(credits=Sum("overage_credits"),
                                                                events=Sum("overage_events")).order_by("feature__code")
        ]
        by_day = [
            {"day": row["day"], "overage_credits": credits_total(row["credits"])}
            for row in rollups.values("day").annotate(credits=Sum("overage_credits")).order_by("day")
        ]
        # An event's overage lies on one day and feature, so the rollups count it once.
        event_count = sum(row["events"] for row in by_feature)
    else:
        metered = band.filter(event__isnull=False).order_by()
        by_feature = [
            {"feature": row["feature__code"], "overage_credits": -credits_total(row["credits"]),
             "events": row["events"]}
            for row in metered.values("feature__code").annotate(credits=Sum("credits"),
                                                                events=Count("event", distinct=True))
            .order_by("feature__code")
        ]
        by_day = [
            {"day": row["day"], "overage_credits": -credits_total(row["credits"])}
            for row in metered.annotate(day=TruncDate("effective_at")).values("day")
            .annotate(credits=Sum("credits")).order_by("day")
        ]
        event_count = sum(row["events"] for row in by_feature)
    return LineUsage(by_feature=by_feature, by_day=by_day, paid_down=paid_down, entries=entries,
                     event_count=event_count)


@dataclass
class Forecast:
    """Where the period is heading at the recent burn rate, as a range, and its middle
    (the burn halfway between the slowest and the fastest rate)."""

    credits_low: Decimal
    credits_high: Decimal
    bill_low: Decimal
    bill_high: Decimal
    days_left: Decimal
    credits_mid: Decimal
    bill_mid: Decimal
    # The credits used so far times this is the period's projected usage at the middle
    # rate (1 when nothing was used): the upgrade suggestion scales usage by it.
    growth_mid: Decimal = Decimal(1)


# How many full days of a period the burn rate looks back on.
FORECAST_WINDOW_DAYS = 7


def usage_forecast(usage: PeriodUsage, now: datetime) -> Forecast:
    """Project the period's credits and bill to its end. The low and high daily burn
    are the slowest and fastest of the average since the period began and the last 7
    full days' daily credits (from rollups); future usage beyond the credits left is
    priced as overage by the one pricing function."""
    period = usage.period
    elapsed = max((now - period.start).total_seconds(), 3600)
    days_left = Decimal(max((period.end - now).total_seconds(), 0)) / 86400
    average = period.credits_used * 86400 / Decimal(elapsed)
    today = now.date()
    # The last 7 full UTC days inside the period. A day with no usage has no rollup row
    # but is a day of zero credits: it must pull the slowest rate down, not be skipped.
    start = period.start.astimezone(UTC)
    first_full_day = start.date() if start.time() == time(0) else start.date() + timedelta(days=1)
    window_start = max(today - timedelta(days=FORECAST_WINDOW_DAYS), first_full_day)
    by_day = dict(
        UsageRollup.objects.filter(period=period, day__lt=today, day__gte=window_start)
        .values("day").annotate(credits=Sum("credits")).order_by().values_list("day", "credits")
    )
    recent = [credits_total(by_day.get(window_start + timedelta(days=n)))
              for n in range(max((today - window_start).days, 0))]
    low_rate = min([average, *recent]) if recent else average
    high_rate = max([average, *recent]) if recent else average

    def bill(rate: Decimal) -> tuple[Decimal, Decimal]:
        future = rate * days_left
        overage = period.overage_credits + max(future - max(usage.credits_remaining, ZERO), ZERO)
        quote = price_period(period.plan, credits_total(overage))
        overage_money = quote.overage.amount
        if usage.spend_cap is not None:  # usage stops at the cap: the bill cannot pass it
            overage_money = min(overage_money, max(usage.spend_cap, usage.quote.overage.amount))
        return period.credits_used + future, quote.base_amount + overage_money

    # A projection: whole credits are precise enough.
    def whole(credits: Decimal) -> Decimal:
        return credits.quantize(Decimal("1"), rounding=ROUND_HALF_UP)

    credits_low, bill_low = bill(low_rate)
    credits_high, bill_high = bill(high_rate)
    credits_mid, bill_mid = bill((low_rate + high_rate) / 2)
    growth = credits_mid / period.credits_used if period.credits_used else Decimal(1)
    return Forecast(whole(credits_low), whole(credits_high), bill_low, bill_high, days_left.quantize(Decimal("0.1")),
                    credits_mid=whole(credits_mid), bill_mid=bill_mid, growth_mid=growth)


@dataclass
class PlanSaving:
    """What `plan` would have billed for a period's usage, against what the current
    plan bills for it. `projected`: the current, unfinished period, both bills projected
    to its end at the forecast's middle burn rate."""

    plan: object
    period: BillingPeriod
    current_total: Decimal
    alternative_total: Decimal
    projected: bool = False

    @property
    def saving(self) -> Decimal:
        return self.current_total - self.alternative_total


def _quantities(period: BillingPeriod) -> list[tuple[int, Decimal, Decimal]]:
    """(feature, its default credits per unit, quantity) of `period`'s accepted usage."""
    return [
        (row["feature_id"], row["feature__default_credits_per_unit"], credits_total(row["quantity"]))
        for row in UsageRollup.objects.filter(period=period).values("feature_id", "feature__default_credits_per_unit")
        .annotate(quantity=Sum("quantity")).order_by()
    ]


def _credits_on(costs: dict, quantities: list, growth: Decimal = Decimal(1)) -> Decimal:
    """The credits those quantities (times `growth`) cost at a plan's credit costs
    (`costs`: feature id → credits per unit, where the plan sets one)."""
    return quantize_credits(sum(
        (quantity * growth * costs.get(feature_id, default) for feature_id, default, quantity in quantities), ZERO))


def _credits_drawn_beyond_included(period: BillingPeriod) -> Decimal:
    """Credits `period` drew from purchased, promotional and rolled-over grants
    (including purchases that paid its overage down): the customer has them whatever
    the plan, so another plan is credited with them too.

    That is the period's consume entries less those on its included grants, computed
    without reading a per-event entry (the dashboard asks on every poll, and a period
    may hold millions): everything the period consumed from grants is its credits used
    less its overage (cached totals of exactly those entries, see ledger_check), and
    what it consumed from its included grants is what they gave up other than by
    expiry or rollover. Included grants serve only their own period (they start and
    expire with it), so no other period's consumption is in either figure."""
    _, included_used = included_credits_used(period)
    return period.credits_used - period.overage_credits - included_used


def period_bill_on(plan, customer: Customer, credits: Decimal, other_credits: Decimal = ZERO) -> Decimal | None:
    """What `plan` bills for a period in which `credits` (at its own credit costs) were
    used and `other_credits` (bought, promotional) were at hand besides its included
    credits; None if the plan could not have served that usage: it would have refused
    it (overage off with a hard stop) or paused it at a spend cap."""
    overage = max(credits - plan.included_credits - other_credits, ZERO)
    if overage > ZERO and not plan.overage_enabled and plan.hard_limit_behaviour == plan.HardLimit.BLOCK:
        return None
    quote = price_period(plan, credits_total(overage))
    cap = effective_overage_cap(plan, customer)
    # As the entitlement check does: compared before rounding.
    if plan.overage_enabled and cap is not None and quote.overage.exact_amount > cap:
        return None
    return quote.total


def best_plan_saving(*, customer: Customer, usage: PeriodUsage, forecast: Forecast,
                     now: datetime) -> PlanSaving | None:
    """The other plan that would cost least, if it saves money; None if the current
    plan is already the cheapest. Two comparisons, each like for like:

    - the last closed period, if it was on the current plan: what it actually cost
      (base fee and overage, bought and promotional credits counted, as invoiced)
      against what the other plan would have billed for the same usage;
    - the current period projected to its end, once it has run for a week (a day or
      two of usage would make any plan without a base fee look cheaper): the forecast's
      middle bill (what the dashboard shows as likely) against the other plan's bill
      for the usage so far scaled to that same projection.
    """
    from plans.models import FeatureCost, Plan

    current = usage.period
    plan = current.plan
    comparisons = []  # (period, current bill, growth, other credits, projected)
    last = (BillingPeriod.objects.select_related("plan").filter(customer=customer, end__lte=current.start)
            .order_by("-start").first())
    if last is not None and last.plan_id == plan.pk:
        last.plan = plan  # the same plan, its tiers already loaded
        paid = price_period(last.plan, last.overage_credits, waived=overage_waived_amount(last)).total
        comparisons.append((last, paid, Decimal(1), _credits_drawn_beyond_included(last), False))
    if now - current.start >= timedelta(days=FORECAST_WINDOW_DAYS):
        balance = usage.balance
        at_hand = _credits_drawn_beyond_included(current) + max(balance.purchased + balance.promotional
                                                                - balance.held, ZERO)
        comparisons.append((current, forecast.bill_mid, forecast.growth_mid, at_hand, True))
    if not comparisons:
        return None
    candidates = list(Plan.objects.filter(is_active=True, currency=plan.currency, interval=plan.interval)
                      .exclude(pk=plan.pk).prefetch_related("overage_tiers"))
    costs = {candidate.pk: {} for candidate in candidates}
    for plan_id, feature_id, per_unit in FeatureCost.objects.filter(plan__in=candidates).values_list(
            "plan_id", "feature_id", "credits_per_unit"):
        costs[plan_id][feature_id] = per_unit
    best = None
    for period, spent, growth, other_credits, projected in comparisons:
        quantities = _quantities(period)
        for candidate in candidates:
            alternative = period_bill_on(candidate, customer, _credits_on(costs[candidate.pk], quantities, growth),
                                         other_credits)
            if alternative is None:
                continue
            option = PlanSaving(plan=candidate, period=period, current_total=spent, alternative_total=alternative,
                                projected=projected)
            if option.saving > ZERO and (best is None or option.saving > best.saving):
                best = option
    return best
