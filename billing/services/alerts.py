"""Usage alerts: thresholds of included credits, overage started, spend cap reached and
runaway usage, each fired once per billing period and delivered as an in-app
notification, an email and outgoing webhooks.

Once only: every alert is an `Alert` row, unique on (period, kind, threshold), inserted
under the customer's row lock inside a savepoint; an IntegrityError means another
worker fired it first. The `Notification` and the `WebhookDelivery` rows are written in
the same transaction as the alert; only side effects (the email, the HTTP attempts) are
enqueued with `transaction.on_commit`, so an alert that rolls back sends nothing.

Ingestion calls `enqueue_alert_checks` after writing a batch; it queues a check only
where the batch may have earned an alert (a whole percent of included usage crossed,
overage started, a refusal at the cap), and the checks run in celery tasks after the
commit, never on the event's own transaction.
Rules and channels are described in docs/alerts.md.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal

from django.conf import settings
from django.core.cache import cache
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from billing.models import (
    Alert, AlertPreference, BillingPeriod, CreditGrant, Customer, LedgerEntry, Notification, Subscription,
    UsageEvent, default_alert_thresholds,
)
from billing.services import rows
from billing.services.customers import current_period, live_subscription
from billing.services.caps import effective_overage_cap
from billing.services.invoicing import overage_waived_amount
from billing.services.ledger import Reason
from billing.services.locks import lock_customer
from billing.services.webhooks import queue_deliveries
from billing.services.commit_hooks import after_commit, enqueue, send_task
from plans.money import ZERO, credits_total, format_credits, format_money
from plans.pricing import price_period

Kind = Alert.Kind

# Runaway guard defaults; settings of the same name override them (see docs/alerts.md).
# A last hour below this many credits never counts as runaway, whatever the baseline.
DEFAULT_RUNAWAY_MIN_CREDITS = Decimal("100")
# With a broker, at most one runaway check per customer per this many seconds.
DEFAULT_RUNAWAY_CHECK_INTERVAL_SECONDS = 60
RUNAWAY_WINDOW = timedelta(hours=1)
RUNAWAY_BASELINE = timedelta(hours=24)


# --- Hook for ingestion ---------------------------------------------------------------

def enqueue_alert_checks(*, customer_id: int, events: list[UsageEvent], thresholds_crossed: set[int]) -> None:
    """Queue the alert checks that `events` (just recorded for one customer) may have
    earned: a usage check for a period whose included usage crossed one of the
    customer's thresholds in this batch (`thresholds_crossed`, from
    `periods_crossing_a_threshold`), whose overage started with these events, or where
    an event was refused at the spend cap; and a runaway check if the period's plan has
    the guard on. A batch that can have earned nothing queues nothing: at thousands of
    events a second, a check per batch per customer would cost more than the ingestion.
    Failing to enqueue is logged, never raised into ingestion (robust=True)."""
    from billing import tasks  # lazily: services never import celery tasks at import time

    accepted = [e for e in events if e.status == UsageEvent.Status.ACCEPTED]
    cap_event_by_period: dict[int, str] = {}
    for event in events:
        if event.status == UsageEvent.Status.REJECTED and event.reject_reason == Reason.SPEND_CAP_REACHED:
            cap_event_by_period.setdefault(event.period_id, event.event_id)
    overage_here: dict[int, Decimal] = {}
    for event in accepted:
        overage_here[event.period_id] = overage_here.get(event.period_id, ZERO) + event.overage_credits
    periods = periods_of(accepted)
    # The period objects carry the totals after these events.
    overage_started = {pk for pk, added in overage_here.items()
                       if added > ZERO and periods[pk].overage_credits == added}
    due = (set(periods) & thresholds_crossed) | overage_started | set(cap_event_by_period)
    for period_id in sorted(due):
        enqueue(tasks.check_alerts_task, customer_id, period_id, cap_event_by_period.get(period_id))
    if any(period.plan.runaway_multiplier is not None for period in periods.values()):
        after_commit(schedule_runaway_check, customer_id)


def periods_of(events: list[UsageEvent]) -> dict:
    """Period id → the period of these events, each looked at once (an event's `period`
    goes through a descriptor; a batch's events share a handful of period objects)."""
    periods = {}
    for event in events:
        if event.period_id not in periods:
            periods[event.period_id] = event.period
    return periods


def periods_crossing_a_threshold(drawn: dict[int, Decimal]) -> set[int]:
    """Periods whose included usage crossed one of their customer's alert thresholds
    while `drawn` (period → included credits just drawn, already written) was drawn.
    Two queries for the whole batch. (A threshold a customer adds below their usage is
    checked when they save it: `alert_preferences_set`.)"""
    if not drawn:
        return set()
    # Hand-written SQL (`rows`): this runs for every group of single events.
    grant, preference = CreditGrant._meta, AlertPreference._meta
    of_periods, period_params = rows.one_of("period_id", drawn, "bigint")
    totals = rows.fetch_values(
        f"SELECT period_id, customer_id, SUM(credits), SUM(remaining) FROM {grant.db_table} "
        f"WHERE {of_periods} AND source = %s GROUP BY period_id, customer_id",
        [*period_params, CreditGrant.Source.PLAN_ALLOCATION], [None, None, grant.get_field("credits"),
                                                                grant.get_field("remaining")])
    of_customers, customer_params = rows.one_of("customer_id", {customer_id for _, customer_id, _, _ in totals},
                                                "bigint")
    chosen = dict(rows.fetch_values(f"SELECT customer_id, thresholds FROM {preference.db_table} WHERE {of_customers}",
                                    customer_params, [None, preference.get_field("thresholds")]))
    crossed = set()
    for period_id, customer_id, credits, remaining in totals:
        included = credits_total(credits)
        if included <= ZERO:
            continue
        # Open periods: nothing but usage has lowered `remaining` yet (expiry and
        # rollover happen at close, after which no check fires).
        after = included - credits_total(remaining)
        before = after - drawn[period_id]
        thresholds = _valid_thresholds(chosen.get(customer_id, default_alert_thresholds()))
        if any(threshold_reached(after, included, t) and not threshold_reached(before, included, t)
               for t in thresholds):
            crossed.add(period_id)
    return crossed


def schedule_runaway_check(customer_id: int) -> None:
    """Throttle the runaway check, which sums a day of ledger entries: with a broker,
    the first batch of an interval schedules one check at the interval's end (seeing
    every batch of the interval) and later batches of that interval add nothing. In the
    embedded mode (tasks run in-process, no delay possible) every batch checks at once."""
    from billing import tasks

    task = tasks.check_runaway_usage_task
    if task.app.conf.task_always_eager:
        send_task(task, (customer_id,), {})
        return
    interval = getattr(settings, "OVERAGE_RUNAWAY_CHECK_INTERVAL_SECONDS", DEFAULT_RUNAWAY_CHECK_INTERVAL_SECONDS)
    if cache.add(f"overage:runaway-check:{customer_id}", 1, timeout=interval):
        send_task(task, (customer_id,), {"countdown": interval})


# --- Usage thresholds, overage started, cap reached -----------------------------------

def alert_thresholds(customer_id: int) -> list[int]:
    """The customer's percent thresholds, default 50/80/100."""
    preference = AlertPreference.objects.filter(customer_id=customer_id).first()
    return _valid_thresholds(preference.thresholds if preference is not None else default_alert_thresholds())


def threshold_reached(used: Decimal, included: Decimal, threshold: int) -> bool:
    """used / included ≥ threshold %, compared exactly in Decimal (no threshold without
    included credits). Ingestion's filter and the check share it, so they cannot drift."""
    return included > ZERO and used * 100 >= included * threshold


def _valid_thresholds(raw) -> list[int]:
    """Values that are not whole numbers from 1 to 100 are ignored (included usage
    cannot pass 100 %)."""
    thresholds = set()
    for value in raw if isinstance(raw, list) else []:
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if float(value).is_integer() and 1 <= value <= 100:
            thresholds.add(int(value))
    return sorted(thresholds)


def included_credits_used(period: BillingPeriod) -> tuple[Decimal, Decimal]:
    """(included credits, how many of them usage has drawn) for a period, from its
    plan_allocation grant: credits − remaining, minus what expiry or rollover took at
    close (those lower `remaining` but are not usage)."""
    grants = CreditGrant.objects.filter(period=period, source=CreditGrant.Source.PLAN_ALLOCATION)
    totals = grants.aggregate(credits=Sum("credits"), remaining=Sum("remaining"))
    included, remaining = credits_total(totals["credits"]), credits_total(totals["remaining"])
    if included <= ZERO:
        return ZERO, ZERO
    not_usage = -credits_total(
        LedgerEntry.objects.filter(customer_id=period.customer_id, kind__in=[LedgerEntry.Kind.EXPIRE,
                                                                              LedgerEntry.Kind.ROLLOVER],
                                   grant__in=grants).aggregate(total=Sum("credits"))["total"]
    )
    return included, max(included - remaining - not_usage, ZERO)


def _due_usage_alerts(period: BillingPeriod, cap_event_id: str | None) -> list[tuple[str, int]]:
    """(kind, threshold) of the alerts this period has earned and not fired yet."""
    if period.status != BillingPeriod.Status.OPEN:
        return []  # closed and invoiced: the invoice tells the story now
    fired = set(Alert.objects.filter(period=period).values_list("kind", "threshold"))
    due = []
    thresholds = [t for t in alert_thresholds(period.customer_id) if (Kind.USAGE_THRESHOLD, t) not in fired]
    if thresholds:
        included, used = included_credits_used(period)
        due += [(Kind.USAGE_THRESHOLD, t) for t in thresholds if threshold_reached(used, included, t)]
    if period.overage_credits > ZERO and (Kind.OVERAGE_STARTED, 0) not in fired:
        due.append((Kind.OVERAGE_STARTED, 0))
    if cap_event_id and (Kind.CAP_REACHED, 0) not in fired and UsageEvent.objects.filter(
        customer_id=period.customer_id, event_id=cap_event_id, period=period, status=UsageEvent.Status.REJECTED,
        reject_reason=Reason.SPEND_CAP_REACHED,
    ).exists():
        due.append((Kind.CAP_REACHED, 0))
    return due


def check_usage_alerts(*, customer_id: int, period_id: int, now: datetime, cap_event_id: str | None = None
                       ) -> list[Alert]:
    """Fire the usage alerts a period has earned and not yet fired; returns the alerts
    this call fired (usually none).

    - `usage_threshold` for each of the customer's thresholds (percent of the period's
      included credits drawn by usage; none on a period without included credits);
    - `overage_started` once the period has any overage credits;
    - `cap_reached` when `cap_event_id` names an event of this period that was refused
      with reason `spend_cap_reached` (ingestion passes it; the check does not scan the
      period's events looking for one).

    Lock-free and a few indexed reads when nothing is due; otherwise the customer's
    lock is taken and everything is decided again under it.
    """
    period = BillingPeriod.objects.get(pk=period_id, customer_id=customer_id)
    if not _due_usage_alerts(period, cap_event_id):
        return []
    with transaction.atomic():
        customer = lock_customer(customer_id)
        period = BillingPeriod.objects.select_related("plan").get(pk=period_id)
        fired = []
        for kind, threshold in _due_usage_alerts(period, cap_event_id):
            details = usage_figures(period, customer)
            if kind == Kind.USAGE_THRESHOLD:
                details["threshold"] = threshold
            if kind == Kind.CAP_REACHED:
                details["event_id"] = cap_event_id
            alert = fire_alert(customer=customer, period=period, kind=kind, threshold=threshold, details=details,
                               now=now)
            if alert is not None:
                fired.append(alert)
        return fired


def usage_figures(period: BillingPeriod, customer: Customer) -> dict:
    """The period's numbers as alerts show them (JSON-ready strings). Money comes from
    the one pricing function, as on the usage page and the invoice."""
    plan = period.plan
    included, used = included_credits_used(period)
    quote = price_period(plan, period.overage_credits, waived=overage_waived_amount(period))
    cap = effective_overage_cap(plan, customer, period)
    return {
        "included_credits": _plain(included),
        "included_credits_used": _plain(used),
        "percent_used": _plain((used * 100 / included).quantize(Decimal("0.1"), ROUND_DOWN)) if included else None,
        "credits_used": _plain(period.credits_used),
        "overage_credits": _plain(period.overage_credits),
        "estimated_overage_amount": str(quote.overage.amount),
        "currency": quote.currency,
        "spend_cap": None if cap is None else str(cap),
        "plan": plan.code,
    }


# --- Runaway usage --------------------------------------------------------------------

@dataclass(frozen=True)
class Burn:
    last_hour: Decimal
    baseline_per_hour: Decimal


def credits_burned(*, customer_id: int, after: datetime, until: datetime | None = None) -> Decimal:
    """Credits drawn from grants plus overage credits, for usage stamped in
    (after, until] (until = no upper bound). Uses the ledger index
    (customer, kind, effective_at)."""
    entries = LedgerEntry.objects.filter(customer_id=customer_id,
                                         kind__in=[LedgerEntry.Kind.CONSUME, LedgerEntry.Kind.OVERAGE],
                                         effective_at__gt=after)
    if until is not None:
        entries = entries.filter(effective_at__lte=until)
    return -credits_total(entries.aggregate(total=Sum("credits"))["total"])


def runaway_burn(*, customer_id: int, now: datetime) -> Burn:
    last_hour = credits_burned(customer_id=customer_id, after=now - RUNAWAY_WINDOW)
    before = credits_burned(customer_id=customer_id, after=now - RUNAWAY_WINDOW - RUNAWAY_BASELINE,
                            until=now - RUNAWAY_WINDOW)
    return Burn(last_hour=last_hour, baseline_per_hour=before / 24)


def is_runaway(burn: Burn, multiplier: Decimal) -> bool:
    floor = Decimal(getattr(settings, "OVERAGE_RUNAWAY_MIN_CREDITS", DEFAULT_RUNAWAY_MIN_CREDITS))
    return burn.last_hour >= floor and burn.last_hour > multiplier * burn.baseline_per_hour


def check_runaway_usage(*, customer_id: int, now: datetime) -> Alert | None:
    """The runaway-usage guard. Returns the alert if this call fired it.

    Rule, evaluated at `now` for a customer whose current period's plan has
    `runaway_multiplier` M set (null = guard off):

        last_hour = credits burned by usage stamped after now − 1 h
        baseline  = credits burned by usage stamped in (now − 25 h, now − 1 h] ÷ 24
        runaway  ⇔ last_hour ≥ OVERAGE_RUNAWAY_MIN_CREDITS  and  last_hour > M × baseline

    "Burned" is consume + overage ledger entries (what usage drew from grants plus its
    overage credits), by `effective_at`, the usage's own timestamp. The floor keeps tiny
    numbers (3 credits against a baseline of 0.1) quiet. A subscription younger than
    25 h is not judged: it has no baseline yet, and pausing a customer in its first
    hours of integration would be the guard's worst false alarm. A paused subscription
    is not judged either (its usage is refused anyway).

    Fires at most once per billing period (an `Alert` of kind `runaway_usage`,
    threshold 0, on the current period): the customer and the business are told once,
    and after an operator resumes a paused subscription the guard stays quiet for the
    rest of the period; the spend cap remains the hard money limit. If the plan has
    `runaway_pauses_usage`, firing also sets the subscription to `paused`, which every
    entitlement check and event then answers with reason `paused`.
    """
    customer = Customer.objects.get(pk=customer_id)
    subscription = live_subscription(customer)
    if subscription is None or subscription.status != Subscription.Status.ACTIVE:
        return None
    if subscription.started_at > now - RUNAWAY_WINDOW - RUNAWAY_BASELINE:
        return None
    period = current_period(customer=customer, now=now)
    if period is None or period.plan.runaway_multiplier is None:
        return None
    if Alert.objects.filter(period=period, kind=Kind.RUNAWAY_USAGE, threshold=0).exists():
        return None
    multiplier = period.plan.runaway_multiplier
    if not is_runaway(runaway_burn(customer_id=customer_id, now=now), multiplier):
        return None

    with transaction.atomic():
        customer = lock_customer(customer_id)
        subscription = live_subscription(customer)
        if subscription is None or subscription.status != Subscription.Status.ACTIVE:
            return None
        if Alert.objects.filter(period=period, kind=Kind.RUNAWAY_USAGE, threshold=0).exists():
            return None
        burn = runaway_burn(customer_id=customer_id, now=now)
        if not is_runaway(burn, multiplier):
            return None
        pauses = period.plan.runaway_pauses_usage
        details = usage_figures(period, customer) | {
            "last_hour_credits": _plain(burn.last_hour),
            "baseline_credits_per_hour": _plain(burn.baseline_per_hour.quantize(Decimal("0.000001"))),
            "multiplier": _plain(multiplier),
            "window_end": now.isoformat(),
            "paused": pauses,
        }
        alert = fire_alert(customer=customer, period=period, kind=Kind.RUNAWAY_USAGE, threshold=0, details=details,
                           now=now, email_business=True)
        if alert is not None and pauses:
            Subscription.objects.filter(pk=subscription.pk).update(status=Subscription.Status.PAUSED)
        return alert


# --- Firing and delivery --------------------------------------------------------------

def fire_alert(*, customer: Customer, period: BillingPeriod, kind: str, threshold: int, details: dict,
               now: datetime, email_business: bool = False) -> Alert | None:
    """Insert the alert once and write its notification and webhook deliveries in the
    same transaction; email and first webhook attempts go on commit. Returns None if
    the alert had already fired. The caller holds the customer's lock."""
    try:
        with transaction.atomic():  # a savepoint: a duplicate leaves the outer work intact
            alert = Alert.objects.create(customer=customer, period=period, kind=kind, threshold=threshold,
                                         fired_at=now, details=details)
    except IntegrityError:
        return None
    title, body = alert_message(alert)
    Notification.objects.create(customer=customer, alert=alert, title=title, body=body, created_at=now)
    deliveries = queue_deliveries(alert=alert, payload=webhook_payload(alert), now=now)

    from billing import tasks  # lazily: services never import celery tasks at import time

    email_customer = bool(customer.email) and _email_enabled(customer.pk, kind)
    if email_customer or email_business:
        enqueue(tasks.send_alert_email_task, alert.pk, email_customer, email_business)
    for delivery in deliveries:
        # If this enqueue is lost, the every-minute sweep sends the delivery anyway.
        enqueue(tasks.deliver_webhook_task, delivery.pk)
    return alert


def _email_enabled(customer_id: int, kind: str) -> bool:
    """A kind is emailed unless the customer's preference sets it to false."""
    preference = AlertPreference.objects.filter(customer_id=customer_id).first()
    if preference is None or not isinstance(preference.email_enabled, dict):
        return True
    return preference.email_enabled.get(kind, True) is not False


def send_alert_email(*, alert_id: int, to_customer: bool = True, to_business: bool = False) -> int:
    """Email an alert to the customer's address and/or the business (the addresses in
    settings.ADMINS; none configured = no business email), each at most once: the alert
    is locked while sending and the send recorded in the same transaction, so a
    redelivered or retried task sends only what was not sent. (A worker that dies
    between the SMTP hand-off and the commit sends again: at least once, never lost.)
    Returns the number of messages sent."""
    with transaction.atomic():
        alert = Alert.objects.select_for_update().select_related("customer", "period").get(pk=alert_id)
        subject, body = alert_message(alert)
        footer = ("\n\nYou receive this message because usage alerts are on for your account. Thresholds and "
                  "which alerts are emailed can be changed in the portal.")
        sent, now = 0, timezone.now()
        if to_customer and alert.customer.email and alert.emailed_customer_at is None:
            sent += send_mail(subject, body + footer, settings.DEFAULT_FROM_EMAIL, [alert.customer.email])
            alert.emailed_customer_at = now
            alert.save(update_fields=["emailed_customer_at"])
        # ADMINS entries are (name, address) pairs (plain addresses from Django 6.0 on).
        business = [entry if isinstance(entry, str) else entry[1] for entry in settings.ADMINS]
        if to_business and business and alert.emailed_business_at is None:
            sent += send_mail(f"{alert.customer.name} ({alert.customer.external_id}): {subject}", body,
                              settings.DEFAULT_FROM_EMAIL, business)
            alert.emailed_business_at = now
            alert.save(update_fields=["emailed_business_at"])
        return sent


def alert_message(alert: Alert) -> tuple[str, str]:
    """Title and body of an alert, for the notification and the email, from the
    figures frozen in the alert when it fired (so a resent email says the same)."""
    d = alert.details
    period = alert.period
    lines = [f"Billing period: {period.start:%Y-%m-%d %H:%M} to {period.end:%Y-%m-%d %H:%M} UTC"]
    if "credits_used" in d:  # the usage figures (every kind fired by this module has them)
        money = format_money(Decimal(d["estimated_overage_amount"]), d["currency"])
        lines += [
            f"Included credits used: {_credits(d['included_credits_used'])} of {_credits(d['included_credits'])}",
            f"Credits used this period: {_credits(d['credits_used'])}",
            f"Overage credits: {_credits(d['overage_credits'])}",
            f"Estimated overage charges so far: {money}",
        ]
        if d.get("spend_cap") is not None:
            lines.append(f"Spend cap for this period: {format_money(Decimal(d['spend_cap']), d['currency'])}")
    figures = "\n".join(lines)

    if alert.kind == Kind.USAGE_THRESHOLD:
        title = f"You have used {alert.threshold}% of your included credits"
        intro = (f"Usage has drawn {_credits(d['included_credits_used'])} of the {_credits(d['included_credits'])} "
                 f"credits included in your plan for this billing period ({d['percent_used']}%).")
    elif alert.kind == Kind.OVERAGE_STARTED:
        title = "Your usage is now in overage"
        intro = ("The credits available to you for this billing period are used up. Further usage is "
                 + ("billed as overage at your plan's rates." if period.plan.overage_enabled
                    else "recorded as overage but not billed."))
    elif alert.kind == Kind.CAP_REACHED:
        title = "Your spend cap has been reached"
        intro = ("Usage was refused because its overage charges would have exceeded your spend cap for this "
                 "billing period. Further usage that needs overage is refused "
                 + ("until a higher cap is approved in the portal." if period.plan.cap_behaviour == "approval"
                    else "until the next period or until the cap is raised."))
    elif alert.kind == Kind.RUNAWAY_USAGE:
        title = f"Unusual usage: {_credits(d['last_hour_credits'])} credits in the last hour"
        intro = (f"In the hour to {alert.fired_at:%Y-%m-%d %H:%M} UTC your account used "
                 f"{_credits(d['last_hour_credits'])} credits, more than {d['multiplier']} times its average of "
                 f"{_credits(d['baseline_credits_per_hour'])} credits per hour over the previous 24 hours. "
                 + ("To protect you from unexpected charges, usage has been paused; contact us to resume it."
                    if d.get("paused") else "Usage continues; please check that your integration behaves as "
                                            "intended."))
    else:  # kinds fired elsewhere (automatic top-up) describe themselves in details["message"]
        title, intro = alert.get_kind_display(), d.get("message", "")
    return title, f"{intro}\n\n{figures}".strip()


def webhook_payload(alert: Alert) -> dict:
    """The JSON body of an alert's webhook (example in docs/alerts.md)."""
    return {
        "type": alert.kind,
        "alert": {"id": alert.pk, "kind": alert.kind, "threshold": alert.threshold,
                  "fired_at": alert.fired_at.isoformat()},
        "customer": {"external_id": alert.customer.external_id, "name": alert.customer.name},
        "period": {"id": alert.period_id, "start": alert.period.start.isoformat(),
                   "end": alert.period.end.isoformat()},
        "details": alert.details,
    }


def _plain(value: Decimal) -> str:
    """A Decimal as a plain string without trailing zeros: 8000, 0.5."""
    return format(value.normalize(), "f") if value else "0"


def _credits(value: str) -> str:
    return format_credits(Decimal(value))
