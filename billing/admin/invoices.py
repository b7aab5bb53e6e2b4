"""Admin for invoices, purchases and automatic top-up."""

from django.contrib import admin, messages
from django.db.models import F
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from billing.models import AutoTopUp, CreditPurchase, Invoice, InvoiceLine
from billing.services.invoicing import invoice_mark_paid, invoice_void
from plans.errors import DomainError
from plans.money import format_money

from .core import ReadOnlyAdmin


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    can_delete = False
    fields = ("kind", "description", "credits", "unit_price", "amount", "service_start", "service_end", "usage")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="Usage behind it")
    def usage(self, line):
        if line.kind != InvoiceLine.Kind.OVERAGE or line.period_id is None:
            return "—"
        url = reverse("admin:billing_usageevent_changelist")
        return format_html('<a href="{}?period__id__exact={}&overage_credits__gt=0">overage events of the period</a>'
                           " · band {}–{} credits", url, line.period_id, line.overage_from, line.overage_to)


def _each(request, queryset, service, done: str):
    now = timezone.now()
    changed = 0
    for invoice in queryset:
        try:
            service(invoice=invoice, now=now)
            changed += 1
        except DomainError as error:
            messages.error(request, f"{invoice.number}: {error.message}")
    if changed:
        messages.success(request, f"{changed} invoice(s) {done}.")


class StripeAgreementFilter(admin.SimpleListFilter):
    title = "Stripe"
    parameter_name = "stripe"

    def lookups(self, request, model_admin):
        return [("disagrees", "Total differs from Stripe's"), ("mirrored", "In Stripe"), ("local", "Local only")]

    def queryset(self, request, queryset):
        if self.value() == "disagrees":
            return queryset.filter(stripe_total__isnull=False).exclude(stripe_total=F("total"))
        if self.value() == "mirrored":
            return queryset.exclude(stripe_invoice_id="")
        if self.value() == "local":
            return queryset.filter(stripe_invoice_id="")
        return queryset


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = ("number", "customer", "kind", "status", "total", "currency", "stripe", "issued_at", "due_at",
                    "paid_at")
    list_filter = ("status", StripeAgreementFilter, "stripe_status", "kind", "currency")
    search_fields = ("number", "customer__external_id", "customer__name")
    date_hierarchy = "issued_at"
    list_select_related = ("customer",)
    inlines = (InvoiceLineInline,)
    actions = ("mark_paid", "void")

    @admin.display(description="Stripe")
    def stripe(self, invoice):
        """Stripe's status and, when its total is not ours, a warning with both totals."""
        if not invoice.stripe_invoice_id:
            return "—"
        if invoice.stripe_disagrees:
            return format_html('<strong style="color:#b00">⚠ Stripe {} ≠ ours {}</strong> ({})',
                               format_money(invoice.stripe_total, invoice.currency),
                               format_money(invoice.total, invoice.currency), invoice.stripe_status)
        return f"{invoice.stripe_status} ✓"

    @admin.action(description="Mark selected invoices paid (local invoicing)")
    def mark_paid(self, request, queryset):
        _each(request, queryset, invoice_mark_paid, "marked paid")

    @admin.action(description="Void selected unpaid invoices")
    def void(self, request, queryset):
        _each(request, queryset, invoice_void, "voided")


@admin.register(CreditPurchase)
class CreditPurchaseAdmin(ReadOnlyAdmin):
    list_display = ("id", "customer", "pack", "source", "credits", "price", "currency", "status", "created_at",
                    "paid_at")
    list_filter = ("status", "source")
    search_fields = ("customer__external_id", "payment_reference", "idempotency_key")
    list_select_related = ("customer", "pack")


@admin.register(AutoTopUp)
class AutoTopUpAdmin(admin.ModelAdmin):
    list_display = ("customer", "enabled", "mode", "pack", "threshold", "target_balance", "max_per_month",
                    "max_amount_per_month", "consecutive_failures")
    list_filter = ("enabled", "mode")
    search_fields = ("customer__external_id",)
    autocomplete_fields = ("customer",)
    readonly_fields = ("consecutive_failures", "disabled_reason")
