"""What a business sells: plans, metered features, their credit costs, overage rates
and prepaid credit packs. Nothing here touches a customer's balance."""

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from .money import CURRENCY_CHOICES, CreditField, MoneyField, RateField

code_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
    "Use letters, digits, '_', '-', '.', or ':' (must start with a letter or digit).",
)
non_negative = MinValueValidator(Decimal("0"))
# Bounded so that quantity × credits per unit always fits the credit columns.
credits_per_unit_bound = MaxValueValidator(Decimal("1000000"))


class Feature(models.Model):
    """A metered action a customer can take, e.g. one `gpt-4o` call."""

    code = models.CharField(max_length=64, unique=True, validators=[code_validator])
    name = models.CharField(max_length=200)
    unit = models.CharField(max_length=50, default="call", help_text='e.g. "call", "1k tokens"')
    # Used on plans that do not list the feature in their own feature costs.
    default_credits_per_unit = CreditField(default=Decimal("1"), validators=[non_negative, credits_per_unit_bound])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["code"]

    def __str__(self):
        return self.code


class Plan(models.Model):
    class Interval(models.TextChoices):
        MONTH = "month", "Monthly"
        YEAR = "year", "Yearly"

    class Rollover(models.TextChoices):
        NONE = "none", "Unused included credits expire at period end"
        ALL = "all", "Roll over all unused included credits"
        CAPPED = "capped", "Roll over up to a maximum"

    class HardLimit(models.TextChoices):
        # What happens when the credits run out on a plan with overage off.
        BLOCK = "block", "Deny usage (classic hard stop at zero)"
        ALLOW_UNBILLED = "allow_unbilled", "Allow usage, record it, never bill it"

    class CapBehaviour(models.TextChoices):
        PAUSE = "pause", "Pause usage until the next period or a higher cap"
        APPROVAL = "approval", "Pause until the customer or an admin approves a higher cap"

    code = models.CharField(max_length=64, unique=True, validators=[code_validator])
    name = models.CharField(max_length=200)
    currency = models.CharField(max_length=3, choices=CURRENCY_CHOICES, default="USD")
    interval = models.CharField(max_length=8, choices=Interval.choices, default=Interval.MONTH)
    # Charged in advance for each period; 0 for pure usage-based plans.
    base_price = MoneyField(default=Decimal("0"), validators=[non_negative])
    # Credits granted at the start of every period; they expire at period end unless
    # the rollover policy keeps them.
    included_credits = CreditField(default=Decimal("0"), validators=[non_negative])
    overage_enabled = models.BooleanField(default=False)
    # Flat price per overage credit; used when the plan has no overage tiers.
    overage_unit_price = RateField(default=Decimal("0"), validators=[non_negative])
    # Maximum overage money per period; null = no cap.
    overage_cap = MoneyField(null=True, blank=True, validators=[non_negative])
    cap_behaviour = models.CharField(max_length=16, choices=CapBehaviour.choices, default=CapBehaviour.PAUSE)
    rollover_policy = models.CharField(max_length=8, choices=Rollover.choices, default=Rollover.NONE)
    rollover_max_credits = CreditField(null=True, blank=True, validators=[non_negative])
    hard_limit_behaviour = models.CharField(max_length=16, choices=HardLimit.choices, default=HardLimit.BLOCK)
    # Progressive billing: when a period's unbilled overage reaches this amount, it is
    # invoiced at once; the period-close invoice bills only the rest. Null = off.
    progressive_billing_threshold = MoneyField(null=True, blank=True, validators=[non_negative])
    # Credits bought (packs, top-ups) while the customer is in overage first pay down
    # this period's overage credits, so those are not billed again.
    purchases_pay_down_overage = models.BooleanField(default=True)
    # Runaway-usage guard: alert when the last hour's burn exceeds this multiple of the
    # trailing daily average hourly burn (null = off), and optionally pause usage.
    runaway_multiplier = models.DecimalField(max_digits=8, decimal_places=2, null=True, blank=True,
                                             validators=[MinValueValidator(Decimal("1"))])
    runaway_pauses_usage = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True, help_text="Inactive plans cannot be given to new customers.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["base_price", "code"]

    def __str__(self):
        return f"{self.name} ({self.code})"

    def clean(self):
        errors = {}
        if self.currency:
            self.currency = self.currency.upper()
        if self.rollover_policy == self.Rollover.CAPPED and self.rollover_max_credits is None:
            errors["rollover_max_credits"] = "A capped rollover needs a maximum."
        if self.rollover_policy != self.Rollover.CAPPED and self.rollover_max_credits is not None:
            errors["rollover_max_credits"] = "Only a capped rollover takes a maximum."
        if errors:
            raise ValidationError(errors)


class OverageTier(models.Model):
    """A graduated band of overage pricing: the overage credits of a period from the
    previous tier's `up_to` to this `up_to` are charged at `unit_price`. The last tier
    has no `up_to` (open-ended)."""

    plan = models.ForeignKey(Plan, on_delete=models.CASCADE, related_name="overage_tiers")
    up_to = CreditField(null=True, blank=True, help_text="Upper bound in overage credits; empty = no limit.")
    unit_price = RateField(validators=[non_negative])

    class Meta:
        ordering = ["plan", models.F("up_to").asc(nulls_last=True)]
        constraints = [
            models.UniqueConstraint(fields=["plan", "up_to"], name="unique_tier_bound_per_plan"),
            models.UniqueConstraint(
                fields=["plan"], condition=models.Q(up_to__isnull=True), name="one_open_tier_per_plan"
            ),
        ]

    def __str__(self):
        bound = f"up to {self.up_to}" if self.up_to is not None else "above"
        return f"{bound} @ {self.unit_price}"


class FeatureCost(models.Model):
    """Credits charged per unit of a feature on one plan (overrides the feature's
    default)."""

    plan = models.ForeignKey(Plan, on_delete=models.CASCADE, related_name="feature_costs")
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="plan_costs")
    credits_per_unit = CreditField(validators=[non_negative, credits_per_unit_bound])

    class Meta:
        constraints = [models.UniqueConstraint(fields=["plan", "feature"], name="unique_feature_cost_per_plan")]

    def __str__(self):
        return f"{self.feature.code}: {self.credits_per_unit} credits/unit"


class CreditPack(models.Model):
    """A prepaid bundle of credits on sale. Purchased credits never expire unless the
    pack says so."""

    code = models.CharField(max_length=64, unique=True, validators=[code_validator])
    name = models.CharField(max_length=200)
    credits = CreditField(validators=[MinValueValidator(Decimal("0.000001"))])
    price = MoneyField(validators=[non_negative])
    currency = models.CharField(max_length=3, choices=CURRENCY_CHOICES, default="USD")
    expires_after_days = models.PositiveIntegerField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["price"]

    def __str__(self):
        return f"{self.name} ({self.credits} credits for {self.price} {self.currency})"
