"""Admin for customers and the credit ledger.

The admin is a window, not a second write path: ledger rows (grants, entries, events,
reservations, periods) are read-only here, and the few things an operator may create
(a customer, a promotional or manual grant, an API key) are created by the same
services the API calls. Nothing here computes credits or money.
"""

import uuid

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import widgets as admin_widgets
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from billing.models import (
    Alert, ApiKey, BillingPeriod, CreditGrant, Customer, CustomerMember, DeferredTask, Invoice, LedgerEntry,
    Notification,
    Reservation, Subscription,
    UsageEvent,
)
from billing.selectors import balance_at, period_usage
from billing.services.api_keys import api_key_create, api_key_revoke
from billing.services.customers import customer_create, live_subscription, subscription_set_paused
from billing.services.invoicing import close_period
from billing.services.ledger import check_grant_request, grant_credits_once
from plans.money import format_credits, format_money
from plans.errors import DomainError
from plans.models import Feature, Plan
from plans.money import CREDIT_DIGITS, CREDIT_PLACES
from plans.pricing import price_period


def adopt(obj, created) -> None:
    """Make the admin's unsaved `obj` stand for the row a service created, so the
    admin's history entry, inlines and redirect refer to the real row."""
    for field in obj._meta.concrete_fields:
        setattr(obj, field.attname, getattr(created, field.attname))
    obj._state.adding = False
    obj._state.db = created._state.db


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only: rows are written by services (and ledger entries never change)."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# --- Customers --------------------------------------------------------------------------

class CustomerMemberInline(admin.TabularInline):
    model = CustomerMember
    extra = 0
    autocomplete_fields = ("user",)
    verbose_name = "portal login"
    verbose_name_plural = "portal logins"


class CustomerAddForm(forms.ModelForm):
    """A new customer with its subscription; `customer_create` opens its periods and
    grants the included credits, exactly as the API does."""

    plan = forms.ModelChoiceField(queryset=Plan.objects.filter(is_active=True), help_text="Active plans only.")
    started_at = forms.SplitDateTimeField(
        required=False, widget=admin_widgets.AdminSplitDateTime,
        help_text="UTC. Empty = now. A past start opens every period since, each with its included credits.",
    )

    class Meta:
        model = Customer
        fields = ("external_id", "name", "email")

    def clean_started_at(self):
        started_at = self.cleaned_data["started_at"]
        # Refused by customer_create too; checked here so it shows on the form.
        if started_at is not None and started_at > timezone.now():
            raise forms.ValidationError("The start cannot be in the future.")
        return started_at


class _CustomerHistoryInline(admin.TabularInline):
    """Read-only history shown on the customer page (newest first, bounded)."""

    extra = 0
    can_delete = False
    show_change_link = True
    max_rows = 50

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        ids = list(queryset.order_by(*self.ordering).values_list("pk", flat=True)[: self.max_rows])
        return queryset.filter(pk__in=ids).order_by(*self.ordering)


class LiveGrantInline(_CustomerHistoryInline):
    model = CreditGrant
    verbose_name_plural = "Credit grants with credits left"
    fields = readonly_fields = ("source", "credits", "remaining", "effective_at", "expires_at", "description")
    ordering = ("expires_at", "priority", "created_at")

    def get_queryset(self, request):
        return super().get_queryset(request).filter(remaining__gt=0)


def granted_by(entry: LedgerEntry) -> str:
    """Who made the grant behind a grant entry (an operator, an API key, or Overage)."""
    return entry.grant.granted_by if entry.kind == LedgerEntry.Kind.GRANT and entry.grant_id else ""


def grant_reason(entry: LedgerEntry) -> str:
    return entry.grant.reason if entry.kind == LedgerEntry.Kind.GRANT and entry.grant_id else ""


class GrantAuditColumns:
    """'By' and 'Reason' columns of ledger entries: who made the grant an entry moves, and why."""

    @admin.display(description="By")
    def by(self, entry):
        return granted_by(entry)

    @admin.display(description="Reason")
    def reason(self, entry):
        return grant_reason(entry)


class LedgerEntryInline(GrantAuditColumns, _CustomerHistoryInline):
    model = LedgerEntry
    verbose_name_plural = "Latest ledger entries"
    fields = readonly_fields = ("kind", "credits", "grant", "feature", "effective_at", "note", "by", "reason")
    ordering = ("-id",)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("grant__created_by", "grant__created_by_api_key")



class InvoiceInline(_CustomerHistoryInline):
    model = Invoice
    verbose_name_plural = "Invoices"
    fields = readonly_fields = ("number", "kind", "status", "total", "currency", "issued_at")
    ordering = ("-issued_at", "-id")


class AlertInline(_CustomerHistoryInline):
    model = Alert
    verbose_name_plural = "Alerts sent"
    fields = readonly_fields = ("kind", "threshold", "period", "fired_at")
    ordering = ("-fired_at",)


class NotificationInline(_CustomerHistoryInline):
    model = Notification
    verbose_name_plural = "In-app notifications"
    fields = readonly_fields = ("title", "created_at", "read_at")
    ordering = ("-created_at",)


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    list_display = ("external_id", "name", "email", "created_at")
    search_fields = ("external_id", "name", "email")
    inlines = (CustomerMemberInline, LiveGrantInline, InvoiceInline, AlertInline, NotificationInline,
               LedgerEntryInline)
    actions = ("pause_usage", "resume_usage", "close_ended_periods_now")

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else (CustomerMemberInline,)

    @admin.action(description="Pause usage (checks and events refused as 'paused')")
    def pause_usage(self, request, queryset):
        self._set_paused(request, queryset, True)

    @admin.action(description="Resume usage")
    def resume_usage(self, request, queryset):
        self._set_paused(request, queryset, False)

    def _set_paused(self, request, queryset, paused: bool):
        for customer in queryset:
            try:
                subscription_set_paused(customer=customer, paused=paused, now=timezone.now())
                messages.success(request, f"{customer.external_id}: usage {'paused' if paused else 'resumed'}.")
            except DomainError as error:
                messages.error(request, f"{customer.external_id}: {error.message}")

    @admin.action(description="Close every ended period now (skips the grace window)")
    def close_ended_periods_now(self, request, queryset):
        now = timezone.now()
        for customer in queryset:
            for period in BillingPeriod.objects.filter(customer=customer, status="open", end__lte=now).order_by("end"):
                invoice = close_period(period_id=period.pk, now=now, skip_grace=True)
                messages.success(request, f"{period}: invoice {invoice.number} ({invoice.total} {invoice.currency}).")

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = CustomerAddForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("external_id", "name", "email", "plan", "started_at")
        return ("external_id", "name", "email", "subscription", "current_period", "current_balance",
                "overage_cap_override", "spend_cap", "grant_credits", "created_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        # external_id is the integrator's key for the customer in every API call.
        return ("external_id", "subscription", "current_period", "current_balance", "grant_credits", "created_at")

    @admin.display(description="Current period")
    def current_period(self, customer):
        usage = period_usage(customer=customer, now=timezone.now())
        if usage is None:
            return "—"
        period, quote = usage.period, usage.quote
        return (f"{period.start:%Y-%m-%d} – {period.end:%Y-%m-%d} on {period.plan.name}: "
                f"{format_credits(period.credits_used)} credits used of {format_credits(period.included_credits)} "
                f"included; overage {format_credits(period.overage_credits)} credits = "
                f"{format_money(quote.overage.amount, quote.currency)}; estimated total "
                f"{format_money(quote.total, quote.currency)}")

    @admin.display(description="Grant credits")
    def grant_credits(self, customer):
        url = reverse("admin:billing_creditgrant_add")
        return format_html('<a href="{}?customer={}">Grant promotional or manual credits…</a>', url, customer.pk)

    def has_delete_permission(self, request, obj=None):
        return False  # billing history hangs off the customer (and is protected anyway)

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        now = timezone.now()
        customer = customer_create(
            external_id=obj.external_id, name=obj.name, email=obj.email,
            plan_code=form.cleaned_data["plan"].code, started_at=form.cleaned_data["started_at"], now=now,
        )
        adopt(obj, customer)

    @admin.display(description="Subscription")
    def subscription(self, customer):
        subscription = live_subscription(customer)
        if subscription is None:
            return "No live subscription"
        url = reverse("admin:billing_subscription_change", args=[subscription.pk])
        pending = f", changing to {subscription.pending_plan.code} next period" if subscription.pending_plan else ""
        return format_html('<a href="{}">{} ({}){}</a>', url, subscription.plan.name, subscription.get_status_display(),
                           pending)

    @admin.display(description="Current balance")
    def current_balance(self, customer):
        now = timezone.now()
        balance = balance_at(customer, now, now)
        return (f"{format_credits(balance.total)} credits: {format_credits(balance.included)} included, "
                f"{format_credits(balance.purchased)} purchased, {format_credits(balance.promotional)} "
                f"promotional/rolled over/manual; {format_credits(balance.held)} held by reservations")


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    list_display = ("customer", "plan", "pending_plan", "status", "started_at", "billing_anchor", "canceled_at")
    list_filter = ("status", "plan")
    search_fields = ("customer__external_id", "customer__name")
    list_select_related = ("customer", "plan", "pending_plan")


@admin.register(BillingPeriod)
class BillingPeriodAdmin(ReadOnlyAdmin):
    list_display = ("customer", "plan", "start", "end", "status", "included_credits", "credits_used",
                    "overage_credits", "overage_amount")
    list_filter = ("status", "plan")
    search_fields = ("customer__external_id",)
    date_hierarchy = "start"
    list_select_related = ("customer", "plan")
    readonly_fields = ("overage_amount",)
    actions = ("close_now",)

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("plan__overage_tiers")

    @admin.action(description="Close selected ended periods now (skips the late-event grace window)")
    def close_now(self, request, queryset):
        now = timezone.now()
        for period in queryset.order_by("end"):
            try:
                invoice = close_period(period_id=period.pk, now=now, skip_grace=True)
                messages.success(request, f"{period}: closed, invoice {invoice.number} ({invoice.total} "
                                          f"{invoice.currency}).")
            except DomainError as error:
                messages.error(request, f"{period}: {error.message}")

    @admin.display(description="Overage amount")
    def overage_amount(self, period):
        # The period's cached overage credits through the one pricing function; for a
        # closed period the invoice is the record.
        quote = price_period(period.plan, period.overage_credits)
        return format_money(quote.overage.amount, quote.currency)


# --- Grants -----------------------------------------------------------------------------

class GrantAddForm(forms.ModelForm):
    """A promotional or manual grant through `grant_credits_once`. The idempotency key
    is minted when the form is rendered, so submitting the same form twice (a double
    click, a browser retry) grants once."""

    source = forms.ChoiceField(
        choices=[(s.value, s.label) for s in (CreditGrant.Source.PROMOTIONAL, CreditGrant.Source.MANUAL_ADJUSTMENT)],
        initial=CreditGrant.Source.PROMOTIONAL,
    )
    credits = forms.DecimalField(max_digits=CREDIT_DIGITS, decimal_places=CREDIT_PLACES, min_value=0,
                                 help_text="Credits to add (positive).")
    expires_at = forms.SplitDateTimeField(required=False, widget=admin_widgets.AdminSplitDateTime,
                                          help_text="UTC. Empty = never expires.")
    features = forms.ModelMultipleChoiceField(
        queryset=Feature.objects.all(), required=False,
        widget=admin_widgets.FilteredSelectMultiple("features", is_stacked=False),
        help_text="Only these features may use the grant; none selected = every feature.",
    )
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 2}),
                             help_text="Why these credits are granted: kept with the grant and shown on the "
                                       "customer's ledger, with your name. Not shown to the customer.")
    request_key = forms.CharField(widget=forms.HiddenInput, initial=lambda: uuid.uuid4().hex)

    class Meta:
        model = CreditGrant
        fields = ("customer", "source", "credits", "expires_at", "features", "description", "reason")

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("credits") is not None:
            try:  # the service's own rules, shown inline on the form
                check_grant_request(credits=cleaned["credits"], expires_at=cleaned.get("expires_at"),
                                    now=timezone.now())
            except DomainError as error:
                self.add_error(error.field, error.message)
        return cleaned


@admin.register(CreditGrant)
class CreditGrantAdmin(admin.ModelAdmin):
    list_display = ("id", "customer", "source", "credits", "remaining", "effective_at", "expires_at", "granted_by",
                    "created_at")
    list_filter = ("source",)
    search_fields = ("customer__external_id",)
    list_select_related = ("customer", "created_by", "created_by_api_key")
    autocomplete_fields = ("customer",)

    ADD_FIELDS = ("customer", "source", "credits", "expires_at", "features", "description", "reason", "request_key")
    VIEW_FIELDS = ("customer", "source", "credits", "remaining", "priority", "effective_at", "expires_at",
                   "features", "period", "pack", "idempotency_key", "description", "granted_by", "reason",
                   "created_at")
    readonly_fields = ("granted_by",)

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = GrantAddForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        return self.ADD_FIELDS if obj is None else self.VIEW_FIELDS

    def has_change_permission(self, request, obj=None):
        return False  # a grant changes only through ledger entries

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        now = timezone.now()
        features = list(data["features"])
        try:
            grant, created = grant_credits_once(
                customer=data["customer"], idempotency_key=f"admin:{data['request_key']}",
                credits=data["credits"], source=data["source"], expires_at=data["expires_at"],
                features=features, description=data["description"], now=now,
                created_by=request.user, reason=data["reason"],
            )
        except DomainError as error:
            obj._service_outcome = "refused"
            messages.error(request, f"Nothing was granted: {error.message} Open a fresh add form to make a new grant.")
            return
        adopt(obj, grant)
        obj._service_outcome = "created" if created else "repeat"
        if not created:
            messages.info(request, "This form was already submitted; the grant below was made then. Nothing new "
                                   "was granted.")

    def save_related(self, request, form, formsets, change):
        pass  # grant_credits_once already set the grant's features

    def log_addition(self, request, obj, message):
        if getattr(obj, "_service_outcome", None) == "created":
            return super().log_addition(request, obj, message)
        return None

    def response_add(self, request, obj, post_url_continue=None):
        outcome = getattr(obj, "_service_outcome", None)
        if outcome == "created":
            return super().response_add(request, obj, post_url_continue)
        if outcome == "repeat":
            return HttpResponseRedirect(reverse("admin:billing_creditgrant_change", args=[obj.pk]))
        return HttpResponseRedirect(reverse("admin:billing_creditgrant_changelist"))


# --- The ledger and usage (append-only) --------------------------------------------------

@admin.register(LedgerEntry)
class LedgerEntryAdmin(GrantAuditColumns, ReadOnlyAdmin):
    list_display = ("id", "customer", "kind", "credits", "grant", "feature", "effective_at", "created_at", "note",
                    "by", "reason")
    list_filter = ("kind",)
    search_fields = ("customer__external_id",)
    list_select_related = ("customer", "grant__created_by", "grant__created_by_api_key", "feature")


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyAdmin):
    # An invoice's overage line links here, filtered to the period's overage events.
    DRILL_DOWN_LOOKUPS = {"period__id__exact", "overage_credits__gt"}

    def lookup_allowed(self, lookup, value, request=None):
        return lookup in self.DRILL_DOWN_LOOKUPS or super().lookup_allowed(lookup, value, request)

    list_display = ("event_id", "customer", "feature", "quantity", "credits", "overage_credits", "status",
                    "reject_reason", "timestamp")
    list_filter = ("status", "feature")
    search_fields = ("event_id", "customer__external_id")
    date_hierarchy = "timestamp"
    list_select_related = ("customer", "feature")


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = ("id", "customer", "feature", "quantity", "credits", "overage_credits", "status", "created_at",
                    "expires_at", "ended_at")
    list_filter = ("status",)
    search_fields = ("customer__external_id",)
    list_select_related = ("customer", "feature")


# --- API keys ---------------------------------------------------------------------------

class ApiKeyAddForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices, required=False, widget=forms.CheckboxSelectMultiple,
        help_text="None selected = every scope.",
    )

    class Meta:
        model = ApiKey
        fields = ("name",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    # key_hash is never shown: the plaintext key is shown once, at creation.
    list_display = ("name", "prefix", "scopes", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "prefix")
    actions = ("revoke_keys",)

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("name", "scopes")
        return ("name", "prefix", "scopes", "created_at", "last_used_at", "revoked_at")

    def has_change_permission(self, request, obj=None):
        return False  # keys are immutable; revoke one and create another

    def has_delete_permission(self, request, obj=None):
        return False  # revoked keys stay, so their use remains traceable

    def has_revoke_permission(self, request):
        return request.user.has_perm("billing.change_apikey")

    def save_model(self, request, obj, form, change):
        api_key, key = api_key_create(name=form.cleaned_data["name"], scopes=form.cleaned_data["scopes"] or None)
        adopt(obj, api_key)
        messages.success(request, f"API key {api_key.name!r} created with scopes {', '.join(api_key.scopes)}. "
                                  f"Copy it now; it cannot be shown again: {key}")

    @admin.action(description="Revoke selected keys", permissions=["revoke"])
    def revoke_keys(self, request, queryset):
        now = timezone.now()
        revoked = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            api_key_revoke(api_key=api_key, now=now)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)


@admin.register(DeferredTask)
class DeferredTaskAdmin(ReadOnlyAdmin):
    """Follow-up tasks waiting for the broker (Redis) to come back; the beat sends them
    within a minute of its return. A growing list here means the broker is still down."""

    list_display = ("id", "task", "args", "created_at")
    list_filter = ("task",)
