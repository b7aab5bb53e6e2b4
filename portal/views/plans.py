"""Upgrade suggestions and changing plan, with a confirmation step."""

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone

from billing.selectors import period_usage, scheduled_plan
from billing.services.plan_changes import is_upgrade, remaining_fraction, subscription_change_plan
from plans.errors import DomainError
from plans.models import Plan
from portal.access import customer_of, portal_login_required


@portal_login_required
def change_plan(request, code: str):
    """GET: what changing to `code` means, to confirm; POST: change. Choosing the plan
    in force is allowed only while a downgrade is scheduled: it cancels that change."""
    customer = customer_of(request)
    now = timezone.now()
    usage = period_usage(customer=customer, now=now)
    if usage is None:
        raise Http404("No subscription.")
    current = usage.period.plan
    pending = scheduled_plan(customer)
    # The plan in force may be retired (off sale) and still be kept.
    plan = current if code == current.code else Plan.objects.filter(
        code=code, is_active=True, currency=current.currency, interval=current.interval).first()
    keep = plan is not None and plan.pk == current.pk
    if plan is None or (keep and pending is None):
        raise Http404("No such plan to change to.")
    if request.method == "POST":
        try:
            subscription_change_plan(customer=customer, plan_code=plan.code, now=now)
        except DomainError as error:
            messages.error(request, error.message)
            return redirect("portal:dashboard")
        if keep:
            messages.success(request, f"You stay on {current.name}: the move to {pending.name} is cancelled.")
        elif is_upgrade(current, plan):
            messages.success(request, f"You are now on {plan.name}.")
        else:
            messages.success(request, f"You will move to {plan.name} at the start of your next period.")
        return redirect("portal:dashboard")
    return render(request, "portal/change_plan.html", {
        "customer": customer, "current": current, "plan": plan, "upgrade": is_upgrade(current, plan),
        "keep": keep, "pending": pending,
        "period": usage.period, "percent_left": remaining_fraction(usage.period, now) * 100,
    })


urlpatterns = [
    path("plan/change/<str:code>/", change_plan, name="change-plan"),
]
