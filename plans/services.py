"""Write paths for the catalogue: features and plans (API and demo data use these;
the admin validates through the same model and formset rules)."""

from dataclasses import dataclass
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from .errors import DomainError
from .models import Feature, FeatureCost, OverageTier, Plan


class CatalogueError(DomainError):
    status = 400
    code = "invalid"


@dataclass(frozen=True)
class TierInput:
    up_to: Decimal | None
    unit_price: Decimal


def validate_tiers(tiers: list[TierInput]) -> None:
    """Tiers must ascend strictly, only the last may be open-ended, and there must be
    one open-ended tier so every overage credit has a price."""
    if not tiers:
        return
    bounds = [t.up_to for t in tiers]
    if bounds[-1] is not None:
        raise CatalogueError("The last overage tier must be open-ended (no up_to).", field="overage_tiers")
    if any(b is None for b in bounds[:-1]):
        raise CatalogueError("Only the last overage tier may be open-ended.", field="overage_tiers")
    finite = bounds[:-1]
    if any(b <= 0 for b in finite) or any(a >= b for a, b in zip(finite, finite[1:])):
        raise CatalogueError("Overage tier bounds must be positive and strictly ascending.", field="overage_tiers")
    if any(t.unit_price < 0 for t in tiers):
        raise CatalogueError("Overage tier prices cannot be negative.", field="overage_tiers")


def _raise_validation(error: ValidationError):
    field, messages = next(iter(error.message_dict.items()))
    raise CatalogueError(" ".join(messages), field=None if field == "__all__" else field) from None


@transaction.atomic
def feature_create(*, code: str, name: str, unit: str = "call",
                   default_credits_per_unit: Decimal = Decimal("1")) -> Feature:
    feature = Feature(code=code, name=name, unit=unit, default_credits_per_unit=default_credits_per_unit)
    try:
        feature.full_clean(validate_unique=False)
    except ValidationError as error:
        _raise_validation(error)
    try:
        with transaction.atomic():
            feature.save()
    except IntegrityError:
        raise CatalogueError(f"A feature with code {code!r} already exists.", code="feature_exists",
                             field="code", status=409) from None
    return feature


@transaction.atomic
def plan_create(*, code: str, name: str, currency: str = "USD", interval: str = "month",
                base_price: Decimal = Decimal("0"), included_credits: Decimal = Decimal("0"),
                overage_enabled: bool = False, overage_unit_price: Decimal = Decimal("0"),
                overage_tiers: list[TierInput] = (), overage_cap: Decimal | None = None,
                cap_behaviour: str = Plan.CapBehaviour.PAUSE, rollover_policy: str = Plan.Rollover.NONE,
                rollover_max_credits: Decimal | None = None, hard_limit_behaviour: str = Plan.HardLimit.BLOCK,
                feature_costs: dict[str, Decimal] | None = None) -> Plan:
    tiers = list(overage_tiers)
    validate_tiers(tiers)
    plan = Plan(
        code=code, name=name, currency=(currency or "").upper(), interval=interval, base_price=base_price,
        included_credits=included_credits, overage_enabled=overage_enabled, overage_unit_price=overage_unit_price,
        overage_cap=overage_cap, cap_behaviour=cap_behaviour, rollover_policy=rollover_policy,
        rollover_max_credits=rollover_max_credits, hard_limit_behaviour=hard_limit_behaviour,
    )
    try:
        plan.full_clean(validate_unique=False)
    except ValidationError as error:
        _raise_validation(error)
    try:
        with transaction.atomic():
            plan.save()
    except IntegrityError:
        raise CatalogueError(f"A plan with code {code!r} already exists.", code="plan_exists", field="code",
                             status=409) from None
    OverageTier.objects.bulk_create(OverageTier(plan=plan, up_to=t.up_to, unit_price=t.unit_price) for t in tiers)
    costs = feature_costs or {}
    features = {f.code: f for f in Feature.objects.filter(code__in=list(costs))}
    missing = sorted(set(costs) - set(features))
    if missing:
        raise CatalogueError(f"Unknown feature(s): {', '.join(missing)}.", code="unknown_feature",
                             field="feature_costs", status=422)
    for feature_code, credits_per_unit in costs.items():
        if credits_per_unit < 0:
            raise CatalogueError("Credits per unit cannot be negative.", field="feature_costs")
        FeatureCost.objects.create(plan=plan, feature=features[feature_code], credits_per_unit=credits_per_unit)
    return plan
