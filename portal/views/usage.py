"""Usage history: credits by day (this period against the previous one), by feature,
and the event list with filters, pages and a CSV export of exactly what is filtered.

Nothing here reads more raw events than it shows: charts, totals and the event count
come from rollups, and the list pages by keyset (`?after=` / `?before=` an event's
position), so a period of ten million events costs what a small one does."""

import csv
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal

from django import forms
from django.http import Http404, StreamingHttpResponse
from django.urls import path
from django.utils import timezone
from django.utils.http import urlencode

from billing.models import BillingPeriod, Customer
from billing.selectors_usage import (
    EventCursor,
    customer_period,
    customer_periods,
    daily_credits,
    event_page,
    feature_totals,
    period_event_chunks,
    period_event_count,
    previous_period,
)
from billing.services.customers import current_period
from plans.models import Feature
from portal.access import customer_of, portal_login_required
from portal.views.dashboard import render_page, wants_partial

# Chart geometry (SVG user units; the SVG scales to its box).
CHART_WIDTH, CHART_HEIGHT, FEATURE_BAR_WIDTH = 600, 160, 200


class EventFilters(forms.Form):
    """Validates the GET filters; the template writes the inputs itself (plain names)."""

    feature = forms.ModelChoiceField(queryset=Feature.objects.all(), to_field_name="code", required=False,
                                     empty_label="All features")
    from_ = forms.DateField(required=False)
    to = forms.DateField(required=False)

    def __init__(self, data, **kwargs):
        # "from" is a Python keyword; the form field is `from_` but the GET parameter is `from`.
        data = data.copy()
        if "from" in data:
            data["from_"] = data["from"]
        super().__init__(data, **kwargs)

    def filters(self) -> dict:
        """The valid filters only: a malformed date or unknown feature is ignored, not an error."""
        self.is_valid()
        cleaned = getattr(self, "cleaned_data", {})
        return {"feature": cleaned.get("feature"), "since": cleaned.get("from_"), "until": cleaned.get("to")}


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


def selected_period(request, customer: Customer, current: BillingPeriod | None) -> BillingPeriod | None:
    """The period in `?period=` (404 unless it is this customer's), else the current one
    (else, with no live subscription, the latest)."""
    period_id = request.GET.get("period")
    if period_id:
        period = customer_period(customer, period_id)
        if period is None:
            raise Http404("No such period.")
        return period
    return current or customer_periods(customer).filter(start__lte=timezone.now()).select_related("plan").first()


def daily_chart(current: list, previous: list) -> dict:
    """Bars for credits per day; the previous period's days sit behind, aligned by day
    number, as a lighter series."""
    slots = max(len(current), len(previous), 1)
    top = max([d.credits for d in current + previous] + [Decimal(0)])
    slot = CHART_WIDTH / slots

    def bars(days, width, offset, label):
        out = []
        for n, day in enumerate(days):
            height = float(day.credits / top) * CHART_HEIGHT if top else 0.0
            out.append(Bar(x=round(n * slot + offset, 2), y=round(CHART_HEIGHT - height, 2), width=round(width, 2),
                           height=round(height, 2), title=f"{label} {day.day:%b %-d}: {day.credits.normalize():,f} credits"))
        return out

    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "top": top,
            "previous": bars(previous, slot * 0.8, slot * 0.1, "Previous period"),
            "current": bars(current, slot * 0.5, slot * 0.25, "This period"),
            # A date under every seventh day of this period.
            "labels": [{"x": round(n * slot, 2), "text": f"{d.day:%b %-d}"} for n, d in enumerate(current) if n % 7 == 0]}


def feature_chart(totals: list) -> list:
    top = max([t.credits for t in totals] + [Decimal(0)])
    return [
        {"totals": t, "y": n * 22, "width": round(float(t.credits / top) * FEATURE_BAR_WIDTH, 2) if top else 0}
        for n, t in enumerate(totals)
    ]


def filter_query(period: BillingPeriod, filters: dict) -> str:
    """The filters as a query string, for pagination and the export link."""
    params = {"period": period.pk}
    if filters["feature"]:
        params["feature"] = filters["feature"].code
    if filters["since"]:
        params["from"] = filters["since"].isoformat()
    if filters["until"]:
        params["to"] = filters["until"].isoformat()
    return urlencode(params)


@portal_login_required
def usage(request):
    customer = customer_of(request)
    # As on the dashboard: opens the period now in force if its row does not exist yet
    # (just after a period ends), so the one that ended is never taken for the current one.
    current = current_period(customer=customer, now=timezone.now())
    period = selected_period(request, customer, current)
    context = {"customer": customer, "period": period, "periods": customer_periods(customer), "current": current}
    if period is None:
        return render_page(request, "portal/usage.html", "events", context)
    form = EventFilters(request.GET)
    filters = form.filters()
    # A malformed cursor is ignored like a malformed filter: the list starts at the newest.
    page = event_page(customer, period, **filters, after=EventCursor.parse(request.GET.get("after")),
                      before=EventCursor.parse(request.GET.get("before")))
    context.update(form=form, page=page, event_count=period_event_count(customer, period, **filters),
                   query=filter_query(period, filters), filters=filters)
    if not wants_partial(request):
        # The charts read rollups only; the htmx partial (the event list) skips them.
        previous = previous_period(period)
        days = daily_credits(period)
        totals = feature_totals(period)
        context.update(
            previous=previous, days=days, chart=daily_chart(days, daily_credits(previous) if previous else []),
            totals=totals, feature_bars=feature_chart(totals), feature_chart_height=max(len(totals), 1) * 22,
            # Features with usage this period, plus the one filtered on (it may have only rejected events).
            feature_options=sorted({t.feature for t in totals} | ({filters["feature"]} if filters["feature"] else set()),
                                   key=lambda f: f.code),
            period_credits=sum((d.credits for d in days), Decimal(0)),
        )
    return render_page(request, "portal/usage.html", "events", context)


class _Echo:
    """A file-like object whose write() returns the line, for streaming csv rows."""

    def write(self, value):
        return value


def plain(amount: Decimal) -> str:
    """A decimal as a plain string, exact, without exponent or trailing zeros."""
    return f"{amount.normalize():f}"


@portal_login_required
def usage_csv(request):
    customer = customer_of(request)
    period = selected_period(request, customer, current_period(customer=customer, now=timezone.now()))
    if period is None:
        raise Http404("No billing period yet.")
    chunks = period_event_chunks(customer, period, **EventFilters(request.GET).filters())
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(["event_id", "timestamp", "feature", "quantity", "credits", "overage_credits",
                               "status", "reason"])
        for chunk in chunks:  # one string per chunk of rows: fewer, larger writes
            yield "".join(
                writer.writerow([event_id, timestamp.astimezone(UTC).isoformat().replace("+00:00", "Z"), feature,
                                 plain(quantity), plain(credits), plain(overage), status, reason])
                for event_id, timestamp, feature, quantity, credits, overage, status, reason in chunk
            )

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{customer.external_id}-{period.start:%Y-%m-%d}.csv"'
    return response


urlpatterns = [
    path("usage/", usage, name="usage"),
    path("usage/events.csv", usage_csv, name="usage-csv"),
]
