"""Buy credits: the packs on sale in the customer's currency, buying one, and the
automatic top-up settings. Purchases go through billing.services.purchases, which
grants at once in local mode and waits for the payment webhook with Stripe."""

import uuid

from django.conf import settings
from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_POST
from stripe import StripeError

from billing.models import AutoTopUp, CreditPurchase
from billing.services.customers import live_subscription
from billing.services.purchases import auto_topup_configure, credits_remaining, payments_through_stripe, purchase_pack
from billing.services.stripe_sync import card_save, card_setup_intent, purchase_charge
from plans.errors import DomainError
from plans.models import CreditPack
from plans.money import format_credits
from portal.access import customer_of, portal_login_required
from portal.forms import AutoTopUpForm, PackPurchaseForm


def packs_for(customer):
    """Active packs the customer can buy: those in the currency they are billed in."""
    packs = CreditPack.objects.filter(is_active=True)
    subscription = live_subscription(customer)
    return packs.filter(currency=subscription.plan.currency) if subscription else packs


def topup_initial(customer) -> dict:
    topup = AutoTopUp.objects.select_related("pack").filter(customer=customer).first()
    if topup is None:
        return {}
    plain = lambda amount: None if amount is None else f"{amount.normalize():f}"  # 8000, not 8E+3
    return dict(enabled=topup.enabled, mode=topup.mode, pack=topup.pack.code, threshold=plain(topup.threshold),
                target_balance=plain(topup.target_balance),
                max_per_month=topup.max_per_month, max_amount_per_month=topup.max_amount_per_month)


def render_credits(request, customer, *, topup_form=None, purchase_error=None, status=200):
    packs = packs_for(customer)
    topup = AutoTopUp.objects.filter(customer=customer).first()
    stripe = payments_through_stripe()
    context = {
        "stripe": stripe,
        # Saving a card: a SetupIntent the page confirms with Stripe Elements.
        "setup_intent": card_setup_intent(customer=customer) if stripe and not customer.stripe_payment_method_id
        else None,
        "stripe_js_url": settings.STRIPE_JS_URL, "stripe_publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "customer": customer,
        # One fresh key per form per render: resubmitting this page's form reuses it.
        "packs": [(pack, str(uuid.uuid4())) for pack in packs],
        "balance": credits_remaining(customer, timezone.now()),
        "topup": topup,
        "topup_form": topup_form or AutoTopUpForm(initial=topup_initial(customer), packs=packs),
        "purchase_error": purchase_error,
        "pending": CreditPurchase.objects.filter(customer=customer, status=CreditPurchase.Status.PENDING)
        .select_related("pack")[:5],
    }
    return render(request, "portal/credits.html", context, status=status)


@portal_login_required
def credits(request):
    return render_credits(request, customer_of(request))


@portal_login_required
@require_POST
def buy_pack(request):
    customer = customer_of(request)
    form = PackPurchaseForm(request.POST)
    if not form.is_valid():
        return render_credits(request, customer, purchase_error="That purchase form was incomplete; please try again.",
                              status=400)
    pack_code = form.cleaned_data["pack"]
    if not packs_for(customer).filter(code=pack_code).exists():
        return render_credits(request, customer, purchase_error="That pack is not on sale.", status=400)
    now = timezone.now()
    if payments_through_stripe() and not customer.stripe_payment_method_id:
        return render_credits(request, customer, purchase_error="Save a card first.", status=400)
    try:
        purchase, created = purchase_pack(customer=customer, pack_code=pack_code, now=now,
                                          idempotency_key=f"portal:{form.cleaned_data['idempotency_key']}")
        if payments_through_stripe():
            purchase_charge(purchase_id=purchase.pk, off_session=False)  # credits come with the webhook
            purchase.refresh_from_db()
    except DomainError as error:
        return render_credits(request, customer, purchase_error=error.message, status=400)
    if purchase.status == CreditPurchase.Status.PAID:
        balance = format_credits(credits_remaining(customer, timezone.now()))
        verb = "Bought" if created else "Already bought"
        messages.success(request, f"{verb} {purchase.pack.name}: {format_credits(purchase.credits)} credits. "
                                  f"You now have {balance} credits.")
    else:
        messages.info(request, f"{purchase.pack.name} is awaiting payment; its credits are added when the "
                               f"payment goes through.")
    return redirect("portal:credits")


@portal_login_required
@require_POST
def auto_topup(request):
    customer = customer_of(request)
    packs = packs_for(customer)
    form = AutoTopUpForm(request.POST, packs=packs)
    if form.is_valid():
        data = form.cleaned_data
        try:
            auto_topup_configure(
                customer=customer, enabled=data["enabled"], pack_code=data["pack"].code, threshold=data["threshold"],
                mode=data["mode"], target_balance=data["target_balance"], max_per_month=data["max_per_month"],
                max_amount_per_month=data["max_amount_per_month"],
            )
        except DomainError as error:
            form.add_error(error.field if error.field in form.fields else None, error.message)
        else:
            messages.success(request, "Automatic top-up " + ("is on." if data["enabled"] else "is off.")
                             + " Settings saved.")
            return redirect("portal:credits")
    return render_credits(request, customer, topup_form=form, status=400)


@portal_login_required
@require_POST
def save_card(request):
    """After Stripe Elements confirmed the SetupIntent in the browser: keep the card."""
    customer = customer_of(request)
    try:
        card_save(customer_id=customer.pk, setup_intent_id=request.POST.get("setup_intent", "")[:255])
    except (DomainError, StripeError):
        return render_credits(request, customer, purchase_error="That card could not be saved; please try again.",
                              status=400)
    customer.refresh_from_db()
    messages.success(request, f"Card saved: {customer.card_summary}.")
    return redirect("portal:credits")


urlpatterns = [
    path("credits/", credits, name="credits"),
    path("credits/card/", save_card, name="credits-card"),
    path("credits/buy/", buy_pack, name="credits-buy"),
    path("credits/auto-top-up/", auto_topup, name="credits-auto-topup"),
]
