"""factory_boy factories. Customers are created through the real service so that
subscriptions, periods and included-credit grants exist exactly as in production."""

from datetime import datetime, timezone
from decimal import Decimal

import factory

from billing.services.customers import customer_create
from plans.models import Feature, FeatureCost, OverageTier, Plan


class FeatureFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Feature
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"feature-{n}")
    name = factory.LazyAttribute(lambda o: o.code)
    unit = "call"
    default_credits_per_unit = Decimal("1")


class PlanFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Plan
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"plan-{n}")
    name = factory.LazyAttribute(lambda o: o.code.title())
    currency = "USD"
    base_price = Decimal("0")
    included_credits = Decimal("0")


def pro_plan(**overrides) -> Plan:
    """Pro: $49/month, 10 000 included credits, overage $0.002/credit."""
    fields = dict(code="pro", name="Pro", base_price=Decimal("49"), included_credits=Decimal("10000"),
                  overage_enabled=True, overage_unit_price=Decimal("0.002"))
    fields.update(overrides)
    return PlanFactory(**fields)


def payg_plan(**overrides) -> Plan:
    """Pay-as-you-go: no base fee, every credit at $0.001."""
    fields = dict(code="payg", name="Pay as you go", overage_enabled=True, overage_unit_price=Decimal("0.001"))
    fields.update(overrides)
    return PlanFactory(**fields)


def free_plan(**overrides) -> Plan:
    """Free: 1 000 included credits, hard stop at zero."""
    fields = dict(code="free", name="Free", included_credits=Decimal("1000"), overage_enabled=False)
    fields.update(overrides)
    return PlanFactory(**fields)


def set_tiers(plan: Plan, *tiers: tuple) -> Plan:
    OverageTier.objects.filter(plan=plan).delete()
    for up_to, unit_price in tiers:
        OverageTier.objects.create(plan=plan, up_to=None if up_to is None else Decimal(up_to),
                                   unit_price=Decimal(unit_price))
    return plan


def set_cost(plan: Plan, feature: Feature, credits_per_unit) -> FeatureCost:
    return FeatureCost.objects.update_or_create(plan=plan, feature=feature,
                                                defaults={"credits_per_unit": Decimal(credits_per_unit)})[0]


_customer_seq = iter(range(1, 10**9))


def make_customer(plan: Plan, *, started_at: datetime, now: datetime | None = None, external_id: str | None = None):
    return customer_create(
        external_id=external_id or f"cus-{next(_customer_seq)}", name="Acme Inc.", email="billing@acme.test",
        plan_code=plan.code, started_at=started_at, now=now or started_at,
    )


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)
