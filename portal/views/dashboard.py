"""Customer portal views: thin — scope to the logged-in customer, call billing
selectors, render a page or (for htmx) one of its partials."""

from decimal import Decimal

from django.shortcuts import render
from django.utils.cache import patch_vary_headers
from django.utils import timezone

from billing.models import CreditGrant, Notification
from billing.selectors import best_plan_saving, period_usage, scheduled_plan, usage_forecast

from django.urls import path

from portal.access import customer_of, portal_login_required

# Progress bar colours change here (percent of included credits used).
WARN_AT, FULL_AT = Decimal("80"), Decimal("100")


def wants_partial(request) -> bool:
    """An htmx request for a fragment. A history restore (Back after the page was
    evicted from htmx's history cache) is an htmx request that needs the whole page."""
    return bool(request.htmx) and not request.htmx.history_restore_request


def render_page(request, template: str, partial: str, context: dict):
    """Full page normally; just the named partial for htmx requests (`wants_partial`).
    `Vary: HX-Request` keeps the browser from serving a cached partial as the page."""
    response = render(request, f"{template}#{partial}" if wants_partial(request) else template, context)
    patch_vary_headers(response, ["HX-Request"])
    return response


@portal_login_required
def dashboard(request):
    customer = customer_of(request)
    now = timezone.now()
    usage = period_usage(customer=customer, now=now)
    context = {"customer": customer, "usage": usage, "now": now}
    if usage is not None:
        period, balance = usage.period, usage.balance
        included_used = max(period.included_credits - balance.included, Decimal("0"))
        percent = (included_used * 100 / period.included_credits) if period.included_credits else None
        cap = usage.spend_cap
        forecast = usage_forecast(usage, now)
        context.update(
            period=period, plan=period.plan, currency=usage.quote.currency, balance=balance,
            included_used=included_used, percent=percent,
            percent_bar=min(percent, Decimal("100")) if percent is not None else None,
            level="full" if percent is not None and percent >= FULL_AT else
                  "warn" if percent is not None and percent >= WARN_AT else "ok",
            forecast=forecast,
            cap_percent=(usage.quote.overage.amount * 100 / cap) if cap else None,
            grants=CreditGrant.objects.filter(customer=customer, remaining__gt=0).exclude(expires_at__lte=now)
            .order_by("expires_at", "priority", "created_at"),
        )
        context["pending_plan"] = scheduled_plan(customer)
        context["saving"] = best_plan_saving(customer=customer, usage=usage, forecast=forecast, now=now)
    context["alerts"] = Notification.objects.filter(customer=customer, read_at__isnull=True)[:5]
    return render_page(request, "portal/dashboard.html", "figures", context)


urlpatterns = [
    path("", dashboard, name="dashboard"),
]
