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

from plans.models import Feature, Plan
from plans.money import CreditField

ZERO = Decimal("0")


class Customer(models.Model):
    # The integrator's own id for the customer; what the API uses everywhere.
    external_id = models.CharField(max_length=255, unique=True)
    name = models.CharField(max_length=200)
    email = models.EmailField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

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
    # Included credits allocated for this period (the plan_allocation grant's amount).
    included_credits = CreditField(default=ZERO)
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
    # Makes externally triggered grants (API, payments) idempotent per customer.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    description = models.CharField(max_length=255, blank=True)
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


class UsageEvent(models.Model):
    """One metered usage report. Its `event_id` is the integrator's idempotency key,
    unique per customer forever. Events that could not be charged are kept with status
    `rejected` and the reason; they are never silently dropped and never billed."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="events")
    event_id = models.CharField(max_length=255)
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="events")
    quantity = CreditField()
    credits = CreditField()  # quantity × credits per unit on the plan in force
    overage_credits = CreditField(default=ZERO)  # the part not covered by grants
    timestamp = models.DateTimeField()  # when the usage happened
    received_at = models.DateTimeField()
    properties = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices)
    reject_reason = models.CharField(max_length=32, blank=True)
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="events")
    reservation = models.ForeignKey("Reservation", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    # SHA-256 of the request as sent, to tell a retry (same body) from a conflict.
    fingerprint = models.CharField(max_length=64)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "event_id"], name="unique_event_id_per_customer")]
        indexes = [
            models.Index(fields=["customer", "timestamp"]),
            models.Index(fields=["period", "feature", "timestamp"]),
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

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="ledger_entries")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    credits = CreditField()
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="entries")
    period = models.ForeignKey(BillingPeriod, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries")
    event = models.ForeignKey(UsageEvent, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries")
    feature = models.ForeignKey(Feature, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
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
