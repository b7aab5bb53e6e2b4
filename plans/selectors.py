from django.apps import apps

from .models import Plan


def plan_in_use(plan: Plan) -> bool:
    """Whether any subscription or billing period was ever on this plan. Such a plan's
    price terms are fixed: its open periods are estimated and invoiced from them, so
    editing them would change bills already shown to customers."""
    if plan.pk is None:
        return False
    BillingPeriod = apps.get_model("billing", "BillingPeriod")  # noqa: N806 - billing depends on plans, not back
    return plan.subscriptions.exists() or BillingPeriod.objects.filter(plan=plan).exists()
