"""Customers, subscriptions, periods and the credit ledger.

The ledger is the heart of Overage. A `CreditGrant` is a bucket of credits; every change
to any bucket, and every credit of overage, is a `LedgerEntry`. Entries are never
updated or deleted: a correction is a new entry. `CreditGrant.remaining` and the
`BillingPeriod` usage totals are caches of sums over entries, written in the same
transaction as the entries and verified by `manage.py ledger_check`.
"""

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from plans.models import CreditPack, Feature, Plan
from plans.money import CreditField, MoneyField, RateField

ZERO = Decimal("0")


class Customer(models.Model):
    # The integrator's own id for the customer; what the API uses everywhere.
    external_id = models.CharField(max_length=255, unique=True)
    name = models.CharField(max_length=200)
    email = models.EmailField(blank=True)
    # Overage money cap for this customer set by the business, replacing the plan's.
    overage_cap_override = MoneyField(null=True, blank=True)
    # The customer's own monthly overage cap; it can only lower the business's cap.
    spend_cap = MoneyField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # With Stripe configured: the mirrored Stripe customer (dj-stripe's copy) and the card
    # saved in the portal, used for pack purchases and off-session automatic top-ups.
    stripe_customer = models.OneToOneField("djstripe.Customer", null=True, blank=True, on_delete=models.SET_NULL,
                                           related_name="overage_customer")
    stripe_payment_method_id = models.CharField(max_length=255, blank=True)
    card_summary = models.CharField(max_length=64, blank=True)  # "visa •••• 4242"

    class Meta:
        ordering = ["external_id"]

    def __str__(self):
        return f"{self.name} ({self.external_id})"


class CustomerMember(models.Model):
    """A portal login that belongs to exactly one customer account. Several users may
    share an account."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="customer_membership")
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="members")
    is_owner = models.BooleanField(default=False)

    def __str__(self):
        return f"{self.user} → {self.customer.external_id}"


class Subscription(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        PAUSED = "paused", "Paused"
        CANCELED = "canceled", "Canceled"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="subscriptions")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    # A plan change that waits for the next period boundary.
    pending_plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    started_at = models.DateTimeField()
    # Periods are counted from this instant (UTC); usually equal to started_at.
    billing_anchor = models.DateTimeField()
    canceled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    stripe_subscription_id = models.CharField(max_length=255, blank=True)  # the base fee's Stripe Subscription

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["customer"],
                condition=~Q(status="canceled"),
                name="one_live_subscription_per_customer",
            )
        ]

    def __str__(self):
        return f"{self.customer.external_id} on {self.plan.code}"


class BillingPeriod(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        CLOSED = "closed", "Closed"

    subscription = models.ForeignKey(Subscription, on_delete=models.PROTECT, related_name="periods")
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="periods")
    # The plan in force for this period: pricing of its overage uses this plan.
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    start = models.DateTimeField()
    end = models.DateTimeField()  # exclusive
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OPEN)
    # Included credits allocated for this period (its plan_allocation grants' amounts,
    # prorated upgrade credits included).
    included_credits = CreditField(default=ZERO)
    # The highest full-period allotment this period has been entitled to (the plan's
    # included credits, raised by upgrades). An upgrade grants only the prorated part
    # above this level, so no sequence of plan changes grants credits twice.
    included_credits_level = CreditField(default=ZERO)
    # Caches of ledger sums for this period (see ledger_check): credits consumed from
    # grants plus overage credits, and overage credits alone.
    credits_used = CreditField(default=ZERO)
    overage_credits = CreditField(default=ZERO)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["customer", "start"]
        constraints = [
            models.UniqueConstraint(fields=["subscription", "start"], name="one_period_per_subscription_start"),
            models.CheckConstraint(condition=Q(end__gt=models.F("start")), name="period_end_after_start"),
        ]
        indexes = [models.Index(fields=["customer", "start", "end"])]

    def __str__(self):
        return f"{self.customer.external_id} {self.start:%Y-%m-%d}–{self.end:%Y-%m-%d}"


class CreditGrant(models.Model):
    """A bucket of credits. Consumption draws from grants in order: soonest expiry
    first, then lower `priority` (included and promotional before purchased), then
    oldest."""

    class Source(models.TextChoices):
        PLAN_ALLOCATION = "plan_allocation", "Included in plan"
        PURCHASE = "purchase", "Purchased pack"
        AUTO_TOPUP = "auto_topup", "Automatic top-up"
        ROLLOVER = "rollover", "Rolled over"
        PROMOTIONAL = "promotional", "Promotional"
        MANUAL_ADJUSTMENT = "manual_adjustment", "Manual adjustment"

    # Included, rolled-over, promotional and manual credits are spent before paid ones.
    PRIORITY_BY_SOURCE = {
        Source.PLAN_ALLOCATION: 10,
        Source.ROLLOVER: 10,
        Source.PROMOTIONAL: 10,
        Source.MANUAL_ADJUSTMENT: 10,
        Source.PURCHASE: 20,
        Source.AUTO_TOPUP: 20,
    }

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="grants")
    source = models.CharField(max_length=32, choices=Source.choices)
    credits = CreditField()  # the amount originally granted
    # Cache of the sum of this grant's ledger entries; never written without an entry.
    remaining = CreditField()
    priority = models.PositiveSmallIntegerField()
    effective_at = models.DateTimeField()  # usage stamped before this cannot use it
    expires_at = models.DateTimeField(null=True, blank=True)  # usage at/after cannot use it
    # Empty = serves every feature; otherwise only these.
    features = models.ManyToManyField(Feature, blank=True, related_name="scoped_grants")
    period = models.ForeignKey(BillingPeriod, null=True, blank=True, on_delete=models.PROTECT, related_name="grants")
    pack = models.ForeignKey("plans.CreditPack", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # Cost basis for revenue recognition: the money paid for this grant's credits (the
    # period's base fee for included credits, the pack price for a purchase, 0 for
    # promotional credits), in `currency`. Revenue is recognised pro rata as credits
    # are consumed; whatever is left when they expire is breakage, so the two always
    # add up to exactly this amount.
    cost = MoneyField(default=ZERO)
    currency = models.CharField(max_length=3, blank=True)
    # Makes externally triggered grants (API, payments) idempotent per customer.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    description = models.CharField(max_length=255, blank=True)
    # A grant someone asked for (the admin's grant form, the API's grants endpoint) says
    # who and why: an operator, or the API key that sent it; the reason is for the
    # business's own audit, not shown to the customer. Both empty for the grants Overage
    # makes itself (included credits, rollover, paid packs). PROTECT: the audit trail
    # outlives a staff account, so deactivate staff users rather than delete them.
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="+")
    created_by_api_key = models.ForeignKey("ApiKey", null=True, blank=True, on_delete=models.PROTECT,
                                           related_name="+")
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["customer", "created_at"]
        constraints = [
            models.UniqueConstraint(fields=["customer", "idempotency_key"], name="unique_grant_idempotency_key"),
            models.CheckConstraint(condition=Q(remaining__gte=0), name="grant_remaining_never_negative"),
            models.CheckConstraint(condition=Q(remaining__lte=models.F("credits")), name="grant_remaining_at_most_granted"),
        ]
        indexes = [models.Index(fields=["customer", "expires_at"])]

    def __str__(self):
        return f"{self.get_source_display()}: {self.remaining}/{self.credits}"

    @property
    def granted_by(self) -> str:
        """Who made the grant, as the admin and the API show it."""
        if self.created_by_id:
            return self.created_by.get_username()
        if self.created_by_api_key_id:
            return f"API key {self.created_by_api_key}"
        return "Overage"


class UsageEvent(models.Model):
    """One metered usage report. Its `event_id` is the integrator's idempotency key,
    unique per customer forever. Events that could not be charged are kept with status
    `rejected` and the reason; they are never silently dropped and never billed."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"

    # No single-column indexes on customer and period: the unique (customer, event_id) and
    # the (period, …) indexes below lead with them, and every index costs ingestion a write.
    # No foreign-key constraints in the database either, here and on ledger entries (the two
    # tables written by the thousand per batch): PostgreSQL checked every reference of every
    # row at commit, 28 ms of a 1 000-event batch, more than writing the rows. These rows
    # are written only by the ledger services (ingestion's `CustomerLedger.flush_many`,
    # grants, expiry, purchases, the close), under the customer's lock, with references
    # they have just read; PROTECT still refuses deletes through the ORM, and
    # `manage.py ledger_check` (billing/ledger_audit.py) reports any reference that dangles.
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="events", db_index=False,
                                 db_constraint=False)
    event_id = models.CharField(max_length=255)
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="events", db_constraint=False)
    quantity = CreditField()
    credits = CreditField()  # quantity × credits per unit on the plan in force
    overage_credits = CreditField(default=ZERO)  # the part not covered by grants
    timestamp = models.DateTimeField()  # when the usage happened
    received_at = models.DateTimeField()
    properties = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices)
    reject_reason = models.CharField(max_length=32, blank=True)
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="events", db_index=False,
                               db_constraint=False)
    # Indexed only where set (usage_event_reservation): most events settle no reservation.
    reservation = models.ForeignKey("Reservation", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                    db_index=False, db_constraint=False)
    # SHA-256 of the request as sent, to tell a retry (same body) from a conflict.
    fingerprint = models.CharField(max_length=64)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "event_id"], name="unique_event_id_per_customer")]
        indexes = [
            # The portal's event list pages by (timestamp, id), newest first, from a
            # position (keyset), never by OFFSET: these serve it, unfiltered and by feature.
            # Led by the period, so the planner estimates a period's rows from its id alone
            # (with (customer, timestamp) it multiplied the period and its time range as if
            # unrelated, took a 20 000-event period for 40 rows, and sorted it whole).
            models.Index(fields=["period", "timestamp", "id"], name="usage_event_period_time"),
            models.Index(fields=["reservation"], condition=models.Q(reservation__isnull=False),
                         name="usage_event_reservation"),
            models.Index(fields=["period", "feature", "timestamp", "id"], name="usage_event_feature_time"),
            # Rejected events are few; the portal counts them without scanning accepted ones.
            models.Index(fields=["period", "timestamp"], condition=models.Q(status="rejected"),
                         name="usage_event_rejected"),
        ]

    def __str__(self):
        return f"{self.event_id} ({self.status})"


class UsageRollup(models.Model):
    """Per period, feature and UTC day totals of accepted usage, maintained in the same
    transaction as the event, so charts and summaries never scan raw events."""

    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="rollups")
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="+")
    day = models.DateField()
    events = models.PositiveIntegerField(default=0)
    quantity = CreditField(default=ZERO)
    credits = CreditField(default=ZERO)
    overage_credits = CreditField(default=ZERO)
    overage_events = models.PositiveIntegerField(default=0)  # events with some overage: an invoice line's drill-down

    class Meta:
        constraints = [models.UniqueConstraint(fields=["period", "feature", "day"], name="one_rollup_per_period_feature_day")]


class Reservation(models.Model):
    """A hold on credits from an entitlement check with `reserve: true`. While active
    and unexpired it counts against balance and caps for every other check and event,
    which is what keeps a cap exact when many requests race for the last credits.
    Expiry needs no job: an expired hold simply stops counting."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SETTLED = "settled", "Settled by an event"
        RELEASED = "released", "Released"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="reservations")
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="+")
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="reservations")
    quantity = CreditField()
    credits = CreditField()
    # The part of `credits` that will be overage (no grant could hold it).
    overage_credits = CreditField(default=ZERO)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["customer", "status", "expires_at"])]

    def is_holding(self, now) -> bool:
        return self.status == self.Status.ACTIVE and self.expires_at > now


class ReservationHold(models.Model):
    """The credits a reservation holds on one grant."""

    reservation = models.ForeignKey(Reservation, on_delete=models.CASCADE, related_name="holds")
    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, related_name="holds")
    credits = CreditField()


class LedgerEntry(models.Model):
    """An append-only record of one change of credits. Never updated, never deleted:
    the history of a balance is the evidence behind every invoice.

    Sign convention: `credits` is what the entry adds to the customer's credit
    position. Grants are positive; consumption, expiry and overage are negative.
    Entries with a grant move that grant's `remaining`; overage entries have no grant.
    """

    class Kind(models.TextChoices):
        GRANT = "grant", "Grant"
        CONSUME = "consume", "Consume"
        EXPIRE = "expire", "Expire"
        ROLLOVER = "rollover", "Rollover"
        ADJUST = "adjust", "Adjust"
        OVERAGE = "overage", "Overage"

    # No foreign-key constraints in the database (see UsageEvent), and no index of its own
    # on customer (the (customer, kind, effective_at) index leads with it) or on feature
    # (nothing looks entries up by feature; a feature's deletion is refused by its events).
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="ledger_entries", db_index=False,
                                 db_constraint=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    credits = CreditField()
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="entries",
                              db_constraint=False)
    period = models.ForeignKey(BillingPeriod, null=True, blank=True, on_delete=models.PROTECT,
                               related_name="ledger_entries", db_constraint=False)
    event = models.ForeignKey(UsageEvent, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries",
                              db_constraint=False)
    feature = models.ForeignKey(Feature, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                db_index=False, db_constraint=False)
    # When the change takes effect for billing (the event's timestamp for usage).
    effective_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    note = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "ledger entries"
        indexes = [models.Index(fields=["customer", "kind", "effective_at"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind="overage", grant__isnull=True) | (~Q(kind="overage") & Q(grant__isnull=False)),
                name="overage_entries_have_no_grant_others_do",
            )
        ]

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise RuntimeError("ledger entries are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise RuntimeError("ledger entries are append-only")


class ApiKey(models.Model):
    """An integrator's key. Only a SHA-256 of the secret is stored; the key is shown
    once at creation. Keys are random 256-bit secrets, so a fast hash is sufficient
    (there is no password to brute-force)."""

    class Scope(models.TextChoices):
        INGEST = "ingest", "Ingest events and check entitlements"
        READ = "read", "Read usage, customers, invoices"
        ADMIN = "admin", "Manage plans, features, customers, grants"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)  # public part, to find the row
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


# --- Invoices -------------------------------------------------------------------------------

class InvoiceNumberSequence(models.Model):
    """Gap-free invoice numbers: the row is locked while a number is taken, in the same
    transaction that writes the invoice, so a rolled-back invoice leaves no gap."""

    name = models.CharField(max_length=32, unique=True)
    last_value = models.PositiveBigIntegerField(default=0)


class Invoice(models.Model):
    class Kind(models.TextChoices):
        SUBSCRIPTION_START = "subscription_start", "Subscription start"
        PERIOD_CLOSE = "period_close", "Period close"
        PROGRESSIVE = "progressive", "Progressive (mid-period overage)"
        PLAN_CHANGE = "plan_change", "Plan change"
        PACK_PURCHASE = "pack_purchase", "Credit pack receipt"

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ISSUED = "issued", "Issued"
        PAID = "paid", "Paid"
        VOID = "void", "Void"

    number = models.CharField(max_length=32, unique=True)
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="invoices")
    subscription = models.ForeignKey(Subscription, null=True, blank=True, on_delete=models.PROTECT,
                                     related_name="invoices")
    # The usage period this invoice bills (overage); for a period close, the closed period.
    period = models.ForeignKey(BillingPeriod, null=True, blank=True, on_delete=models.PROTECT,
                               related_name="invoices")
    kind = models.CharField(max_length=24, choices=Kind.choices)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.ISSUED)
    currency = models.CharField(max_length=3)
    total = MoneyField()
    issued_at = models.DateTimeField()
    due_at = models.DateTimeField()
    paid_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    # Exactly-once key for invoices not tied to a period close (purchases, plan changes,
    # progressive invoices).
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Its Stripe counterpart (Stripe mode): id, status and total as Stripe last reported
    # them; a total that differs from ours is flagged in the admin.
    stripe_invoice_id = models.CharField(max_length=255, blank=True)
    stripe_status = models.CharField(max_length=32, blank=True)
    stripe_total = MoneyField(null=True, blank=True)
    stripe_synced_at = models.DateTimeField(null=True, blank=True)

    @property
    def stripe_disagrees(self) -> bool:
        return self.stripe_total is not None and self.stripe_total != self.total

    class Meta:
        ordering = ["-issued_at", "-id"]
        constraints = [
            # Closing a period twice, or from two workers at once, yields one invoice.
            models.UniqueConstraint(fields=["period"], condition=Q(kind="period_close"),
                                    name="one_close_invoice_per_period"),
            models.UniqueConstraint(fields=["customer", "idempotency_key"], name="unique_invoice_idempotency_key"),
        ]

    def __str__(self):
        return f"{self.number} ({self.get_kind_display()}, {self.total} {self.currency})"


class InvoiceLine(models.Model):
    class Kind(models.TextChoices):
        BASE_FEE = "base_fee", "Base fee"
        OVERAGE = "overage", "Overage"
        PACK = "pack", "Credit pack"
        PRORATION = "proration", "Proration"
        ADJUSTMENT = "adjustment", "Adjustment"

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    description = models.CharField(max_length=255)
    credits = CreditField(null=True, blank=True)
    unit_price = RateField(null=True, blank=True)
    amount = MoneyField()  # rounded once, to the currency's minor unit
    # The service this line pays for (a period for a base fee, the usage window for
    # overage).
    service_start = models.DateTimeField(null=True, blank=True)
    service_end = models.DateTimeField(null=True, blank=True)
    # Overage lines: the usage behind them. The period's overage credits from
    # `overage_from` to `overage_to` (cumulative, so progressive invoices and the close
    # invoice bill adjacent, non-overlapping bands), produced by the period's overage
    # ledger entries with ids up to `through_entry_id`.
    period = models.ForeignKey(BillingPeriod, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    overage_from = CreditField(null=True, blank=True)
    overage_to = CreditField(null=True, blank=True)
    through_entry_id = models.BigIntegerField(null=True, blank=True)
    # Graduated tiers applied to this line: [{lower, upper, credits, unit_price, amount}].
    tiers = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["invoice", "id"]


# --- Spend caps -----------------------------------------------------------------------------

class SpendCapApproval(models.Model):
    """A higher overage cap approved for one period (plans with cap behaviour
    `approval`), by the customer in the portal or by an admin."""

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="cap_approvals")
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="cap_approvals")
    cap = MoneyField()
    approved_at = models.DateTimeField()
    approved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    note = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["period", "-approved_at"]


# --- Alerts, notifications, outgoing webhooks ------------------------------------------------

def default_alert_thresholds() -> list[int]:
    return [50, 80, 100]


class AlertPreference(models.Model):
    """A customer's alert settings: usage thresholds (percent of included credits) and
    which kinds of alert are also emailed."""

    customer = models.OneToOneField(Customer, on_delete=models.CASCADE, related_name="alert_preference")
    thresholds = models.JSONField(default=default_alert_thresholds)
    # Alert kind → whether to email it; a kind not listed is emailed.
    email_enabled = models.JSONField(default=dict, blank=True)


class Alert(models.Model):
    """An alert that fired. Each (period, kind, threshold) fires once: the unique
    constraint makes that hold under concurrent events."""

    class Kind(models.TextChoices):
        USAGE_THRESHOLD = "usage_threshold", "Usage threshold reached"
        OVERAGE_STARTED = "overage_started", "Overage started"
        CAP_REACHED = "cap_reached", "Spend cap reached"
        RUNAWAY_USAGE = "runaway_usage", "Runaway usage"
        TOPUP_FAILED = "topup_failed", "Automatic top-up failed"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="alerts")
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="alerts")
    kind = models.CharField(max_length=24, choices=Kind.choices)
    threshold = models.PositiveIntegerField(default=0)  # percent, for usage thresholds
    fired_at = models.DateTimeField()
    details = models.JSONField(default=dict, blank=True)
    # Set in the transaction that sent the email, so a redelivered task does not send it again.
    emailed_customer_at = models.DateTimeField(null=True, blank=True)
    emailed_business_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-fired_at"]
        constraints = [models.UniqueConstraint(fields=["period", "kind", "threshold"], name="alert_fires_once")]


class Notification(models.Model):
    """An in-app message shown in the customer portal."""

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="notifications")
    alert = models.ForeignKey(Alert, null=True, blank=True, on_delete=models.SET_NULL, related_name="notifications")
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    created_at = models.DateTimeField()
    read_at = models.DateTimeField(null=True, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)  # as Alert.emailed_customer_at

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["customer", "read_at"])]


class WebhookEndpoint(models.Model):
    """Where the business wants alerts delivered: the body is signed with HMAC-SHA256
    of `secret`."""

    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=100)
    description = models.CharField(max_length=200, blank=True)
    # Event types to send; empty = all.
    event_types = models.JSONField(default=list, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.url


class WebhookDelivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed (gave up)"

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    alert = models.ForeignKey(Alert, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    event_type = models.CharField(max_length=64)
    payload = models.JSONField()
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        verbose_name_plural = "webhook deliveries"
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], condition=Q(status="pending"),
                                name="webhook_deliveries_due")]
        constraints = [models.UniqueConstraint(fields=["endpoint", "alert"], name="one_delivery_per_alert_and_endpoint")]


# --- Purchases and automatic top-up -----------------------------------------------------------

class CreditPurchase(models.Model):
    """A credit pack bought by the customer or by automatic top-up. Credits are granted
    once, when the purchase is paid (at once in local mode; on the payment webhook with
    Stripe)."""

    class Source(models.TextChoices):
        MANUAL = "manual", "Bought by the customer"
        AUTO_TOPUP = "auto_topup", "Automatic top-up"

    class Status(models.TextChoices):
        PENDING = "pending", "Awaiting payment"
        PAID = "paid", "Paid"
        FAILED = "failed", "Payment failed"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="purchases")
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, related_name="purchases")
    source = models.CharField(max_length=16, choices=Source.choices)
    credits = CreditField()
    price = MoneyField()
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    idempotency_key = models.CharField(max_length=255)
    # The payment provider's reference (a Stripe PaymentIntent id), unique when present.
    payment_reference = models.CharField(max_length=255, null=True, blank=True, unique=True)
    grant = models.OneToOneField(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="purchase")
    invoice = models.OneToOneField(Invoice, null=True, blank=True, on_delete=models.PROTECT, related_name="purchase")
    created_at = models.DateTimeField()
    paid_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["customer", "idempotency_key"],
                                               name="unique_purchase_idempotency_key")]


class AutoTopUp(models.Model):
    """Automatic top-up settings: when credits remaining fall below `threshold`, buy
    `pack` (or enough packs to refill to `target_balance`), at most `max_per_month`
    times and `max_amount_per_month` money per calendar month (UTC)."""

    class Mode(models.TextChoices):
        PACK = "pack", "Buy one pack"
        REFILL = "refill", "Refill to a target balance"

    customer = models.OneToOneField(Customer, on_delete=models.CASCADE, related_name="auto_topup")
    enabled = models.BooleanField(default=False)
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.PACK)
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, related_name="+")
    threshold = CreditField()
    target_balance = CreditField(null=True, blank=True)
    max_per_month = models.PositiveIntegerField(null=True, blank=True)
    max_amount_per_month = MoneyField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    disabled_reason = models.CharField(max_length=255, blank=True)
    updated_at = models.DateTimeField(auto_now=True)


# --- Revenue recognition (ASC 606) -------------------------------------------------------------

class RevenueEntry(models.Model):
    """A revenue journal row. Money received for credits is deferred when billed or paid,
    recognised as the credits are consumed, and recognised as breakage when they expire;
    overage is recognised in the period of use. Amounts are exact (sub-cent); reports
    round per line."""

    class Kind(models.TextChoices):
        DEFERRED = "deferred", "Billed or paid, deferred"
        RECOGNISED = "recognised", "Recognised on consumption"
        BREAKAGE = "breakage", "Recognised at expiry (breakage)"
        OVERAGE = "overage", "Overage recognised in the period of use"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="revenue_entries")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    amount = models.DecimalField(max_digits=30, decimal_places=10)
    currency = models.CharField(max_length=3)
    recognised_at = models.DateTimeField()  # the instant it belongs to (month of the report)
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    ledger_entry = models.ForeignKey(LedgerEntry, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    invoice_line = models.ForeignKey(InvoiceLine, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "revenue entries"
        ordering = ["recognised_at", "id"]
        constraints = [
            # Each source is journaled once per kind: re-running recognition is harmless.
            models.UniqueConstraint(fields=["kind", "ledger_entry"], name="revenue_once_per_ledger_entry"),
            models.UniqueConstraint(fields=["kind", "invoice_line"], name="revenue_once_per_invoice_line"),
            models.UniqueConstraint(fields=["kind", "grant"], condition=Q(kind="deferred"),
                                    name="deferred_once_per_grant"),
        ]


class StripeEventReceipt(models.Model):
    """A Stripe event Overage has acted on, by its id: a webhook delivered again, or
    late after a newer one, changes nothing twice. dj-stripe keeps every delivery
    itself (WebhookEventTrigger), valid or not."""

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=128)
    processed_at = models.DateTimeField()
    outcome = models.CharField(max_length=255, blank=True)

    def __str__(self):
        return f"{self.type} {self.event_id}"


class DeferredTask(models.Model):
    """A Celery task that could not be sent because the broker was unreachable, kept
    here until `requeue_deferred_tasks_task` sends it (billing.services.commit_hooks)."""

    task = models.CharField(max_length=200)  # the task's registered name
    args = models.JSONField(default=list)
    options = models.JSONField(default=dict, blank=True)  # apply_async options (e.g. countdown)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.task}{tuple(self.args)}"
