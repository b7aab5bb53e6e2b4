"""Admin for the catalogue: features, plans (with their feature costs and overage
tiers) and credit packs.

Field rules come from the models' validators (no negative price, credit or rate can
be saved); tier rules come from `plans.services.validate_tiers`, the same function the
API uses; the pricing preview comes from `plans.pricing`. Nothing is computed here.
"""

from decimal import Decimal

from django.contrib import admin
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet
from django.utils.html import format_html, format_html_join

from .errors import DomainError
from .models import CreditPack, Feature, FeatureCost, OverageTier, Plan
from .money import ZERO, format_credits, format_money
from .pricing import price_credits_used
from .selectors import plan_in_use
from .services import TierInput, validate_tiers

# What a customer was sold: fixed once a plan has subscribers (see plan_in_use).
PRICE_TERMS = ("currency", "interval", "base_price", "included_credits", "overage_enabled", "overage_unit_price",
               "overage_cap", "cap_behaviour", "hard_limit_behaviour", "rollover_policy", "rollover_max_credits")


class PriceTermsInlineMixin:
    """Feature costs and tiers are price terms too: read-only on a plan in use."""

    @staticmethod
    def _terms_fixed(plan) -> bool:
        return plan is not None and plan_in_use(plan)

    def has_add_permission(self, request, obj=None):
        return not self._terms_fixed(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request, obj=None):
        return not self._terms_fixed(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return not self._terms_fixed(obj) and super().has_delete_permission(request, obj)


class CodeReadonlyOnChangeMixin:
    # Codes are what integrators send in API calls and events; renaming one would break
    # their integration silently, so a code is fixed once created.
    def get_readonly_fields(self, request, obj=None):
        readonly = tuple(super().get_readonly_fields(request, obj))
        return readonly + ("code",) if obj is not None else readonly


@admin.register(Feature)
class FeatureAdmin(CodeReadonlyOnChangeMixin, admin.ModelAdmin):
    list_display = ("code", "name", "unit", "default_credits_per_unit", "created_at")
    search_fields = ("code", "name")


class FeatureCostInline(PriceTermsInlineMixin, admin.TabularInline):
    model = FeatureCost
    extra = 0
    autocomplete_fields = ("feature",)


class OverageTierFormSet(BaseInlineFormSet):
    """Checks the tiers as a whole with the rule the API uses: bounds strictly
    ascending in the order entered, only the last tier open-ended, no negative price."""

    def clean(self):
        super().clean()
        if any(self.errors):
            return  # field errors are shown on their rows first
        tiers = []
        for form in self.forms:
            if not form.has_changed() and not form.instance.pk:
                continue  # an untouched extra row
            if self.can_delete and self._should_delete_form(form):
                continue
            if not form.cleaned_data:
                continue
            tiers.append(TierInput(up_to=form.cleaned_data.get("up_to"),
                                   unit_price=form.cleaned_data.get("unit_price")))
        try:
            validate_tiers(tiers)
        except DomainError as error:
            raise ValidationError(error.message) from None


class OverageTierInline(PriceTermsInlineMixin, admin.TabularInline):
    model = OverageTier
    formset = OverageTierFormSet
    extra = 0
    verbose_name = "overage tier"
    verbose_name_plural = ("Overage tiers (graduated; list them from the lowest bound up, the last row "
                           "with no bound. With no tiers, the flat overage unit price applies.)")


@admin.register(Plan)
class PlanAdmin(CodeReadonlyOnChangeMixin, admin.ModelAdmin):
    list_display = ("code", "name", "currency", "interval", "base_price", "included_credits", "overage_enabled",
                    "is_active")
    list_filter = ("currency", "interval", "overage_enabled", "rollover_policy", "is_active")
    search_fields = ("code", "name")
    inlines = (FeatureCostInline, OverageTierInline)
    readonly_fields = ("pricing_preview", "price_terms_status")
    fieldsets = (
        (None, {"fields": ("code", "name", "currency", "interval", "is_active", "price_terms_status")}),
        ("Price and credits", {"fields": ("base_price", "included_credits")}),
        ("Overage", {"fields": ("overage_enabled", "overage_unit_price", "overage_cap", "cap_behaviour",
                                "hard_limit_behaviour")}),
        ("Rollover", {"fields": ("rollover_policy", "rollover_max_credits")}),
        ("Pricing preview", {"fields": ("pricing_preview",)}),
    )

    def get_readonly_fields(self, request, obj=None):
        readonly = tuple(super().get_readonly_fields(request, obj))
        return readonly + PRICE_TERMS if obj is not None and plan_in_use(obj) else readonly

    @admin.display(description="Price terms")
    def price_terms_status(self, plan: Plan):
        if plan is None or not plan_in_use(plan):
            return "Editable: no customer has been on this plan yet."
        return ("Fixed: customers are or were on this plan, and their bills are computed from these terms. "
                "To change pricing, create a new plan and move customers to it.")

    # Usage levels shown in the preview, besides 0 and the plan's own included credits.
    PREVIEW_INCLUDED_MULTIPLIER = Decimal("1.5")
    PREVIEW_FIXED_CREDITS = (Decimal("15000"), Decimal("100000"))

    def preview_credit_amounts(self, plan: Plan) -> list[Decimal]:
        amounts = {ZERO, plan.included_credits, plan.included_credits * self.PREVIEW_INCLUDED_MULTIPLIER,
                   *self.PREVIEW_FIXED_CREDITS}
        # Decimals compare by value, so 10000 and 10000.000000 collapse into one.
        return sorted(amounts)

    @admin.display(description="Pricing preview")
    def pricing_preview(self, plan: Plan):
        if plan is None or plan.pk is None:
            return "Save the plan to see what it bills at a few usage levels."
        tiers = list(plan.overage_tiers.all())
        rows = []
        for credits in self.preview_credit_amounts(plan):
            quote = price_credits_used(plan, credits, tiers=tiers)
            rows.append((
                format_credits(credits), format_money(quote.total, quote.currency),
                format_money(quote.base_amount, quote.currency), format_money(quote.overage.amount, quote.currency),
            ))
        items = format_html_join(
            "", "<li>At {} credits this plan bills {} (base {} + overage {})</li>", rows,
        )
        note = ""
        if not plan.overage_enabled:
            note = format_html("<p>Overage is off: beyond the included credits, {}.</p>",
                               plan.get_hard_limit_behaviour_display().lower())
        return format_html('<ul class="pricing-preview">{}</ul>{}', items, note)


@admin.register(CreditPack)
class CreditPackAdmin(CodeReadonlyOnChangeMixin, admin.ModelAdmin):
    list_display = ("code", "name", "credits", "price", "currency", "expires_after_days", "is_active")
    list_filter = ("currency", "is_active")
    search_fields = ("code", "name")
