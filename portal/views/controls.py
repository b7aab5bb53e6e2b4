"""Controls: the customer's own spend cap, approving a higher cap, alert settings."""

from decimal import Decimal

from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone

from billing.models import Alert
from billing.selectors import period_usage
from billing.services.caps import approve_higher_cap, business_cap, customer_set_spend_cap
from billing.services.preferences import alert_preference, alert_preferences_set
from plans.errors import DomainError
from plans.models import Plan
from portal.access import customer_of, portal_login_required


class SpendCapForm(forms.Form):
    spend_cap = forms.DecimalField(required=False, min_value=Decimal("0"), decimal_places=2, max_digits=14,
                                   help_text="Leave empty for no cap of your own.")


class ApproveCapForm(forms.Form):
    cap = forms.DecimalField(min_value=Decimal("0"), decimal_places=2, max_digits=14, label="New cap for this period")


class AlertSettingsForm(forms.Form):
    thresholds = forms.CharField(max_length=100, help_text="Percents of your included credits, e.g. 50, 80, 100")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for kind, label in Alert.Kind.choices:
            self.fields[f"email_{kind}"] = forms.BooleanField(required=False, label=f"Email me: {label}")

    def clean_thresholds(self):
        try:
            values = [int(part) for part in self.cleaned_data["thresholds"].replace(" ", "").split(",") if part]
        except ValueError:
            raise forms.ValidationError("Use whole numbers separated by commas.") from None
        if not values:
            raise forms.ValidationError("Give at least one threshold.")
        return values


def _apply(form, service, **kwargs) -> bool:
    """Run a service; show its refusal on the form instead of failing."""
    try:
        service(**kwargs)
        return True
    except DomainError as error:
        form.add_error(error.field if error.field in form.fields else None, error.message)
        return False


@portal_login_required
def controls(request):
    customer = customer_of(request)
    now = timezone.now()
    usage = period_usage(customer=customer, now=now)
    preference = alert_preference(customer)
    cap_form = SpendCapForm(initial={"spend_cap": customer.spend_cap})
    approve_form = ApproveCapForm()
    alert_form = AlertSettingsForm(initial={
        "thresholds": ", ".join(str(t) for t in preference.thresholds),
        **{f"email_{kind}": preference.email_enabled.get(kind, True) for kind in Alert.Kind.values},
    })
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "spend_cap":
            cap_form = SpendCapForm(request.POST)
            if cap_form.is_valid() and _apply(cap_form, customer_set_spend_cap, customer=customer,
                                              spend_cap=cap_form.cleaned_data["spend_cap"], now=now):
                messages.success(request, "Your spend cap is saved.")
                return redirect("portal:controls")
        elif action == "approve_cap":
            approve_form = ApproveCapForm(request.POST)
            if approve_form.is_valid() and _apply(approve_form, approve_higher_cap, customer=customer,
                                                  cap=approve_form.cleaned_data["cap"], now=now,
                                                  approved_by=request.user, note="approved in the portal"):
                messages.success(request, "The higher cap is approved for this period.")
                return redirect("portal:controls")
        elif action == "alerts":
            alert_form = AlertSettingsForm(request.POST)
            if alert_form.is_valid() and _apply(
                    alert_form, alert_preferences_set, customer=customer,
                    thresholds=alert_form.cleaned_data["thresholds"],
                    email_enabled={kind: alert_form.cleaned_data[f"email_{kind}"] for kind in Alert.Kind.values}):
                messages.success(request, "Your alert settings are saved.")
                return redirect("portal:controls")
    context = {"customer": customer, "usage": usage, "cap_form": cap_form, "approve_form": approve_form,
               "alert_form": alert_form}
    if usage is not None:
        plan = usage.period.plan
        context.update(currency=plan.currency, business_cap=business_cap(plan, customer),
                       can_approve=plan.cap_behaviour == Plan.CapBehaviour.APPROVAL,
                       at_cap=usage.spend_cap is not None and usage.quote.overage.amount >= usage.spend_cap)
    return render(request, "portal/controls.html", context)


urlpatterns = [
    path("controls/", controls, name="controls"),
]
