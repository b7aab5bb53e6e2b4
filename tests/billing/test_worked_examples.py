"""The worked examples from the foundation issue, with exact money."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import CreditGrant
from billing.selectors import period_usage
from billing.services.customers import customer_get
from billing.services.entitlements import check_entitlement
from billing.services.ledger import grant_credits
from billing.services.locks import lock_customer
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, free_plan, make_customer, payg_plan, pro_plan, utc

pytestmark = pytest.mark.django_db
START = utc(2026, 3, 1)
NOW = utc(2026, 3, 15, 12)


def use(customer, credits, *, event_id, feature="api-call", at=NOW):
    FeatureFactory(code=feature)
    return record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature=feature,
                                         quantity=Decimal(credits), timestamp=at), now=NOW)[0]


@time_machine.travel(NOW, tick=False)
def test_hybrid_plan_bills_overage_beyond_included_credits():
    customer = make_customer(pro_plan(), started_at=START)
    use(customer, "9000", event_id="e1")
    use(customer, "4500", event_id="e2")

    usage = period_usage(customer=customer, now=NOW)
    assert usage.period.credits_used == Decimal("13500")
    assert usage.period.overage_credits == Decimal("3500")
    assert usage.quote.overage.amount == Decimal("7.00")
    assert usage.quote.base_amount == Decimal("49.00")
    assert usage.quote.total == Decimal("56.00")
    assert usage.balance.included == Decimal("0")


@time_machine.travel(NOW, tick=False)
def test_pay_as_you_go_bills_every_credit_rounded_half_up_once():
    customer = make_customer(payg_plan(), started_at=START)
    use(customer, "1234567", event_id="e1")

    usage = period_usage(customer=customer, now=NOW)
    assert usage.period.overage_credits == Decimal("1234567")
    # 1 234 567 × $0.001 = $1 234.567 → $1 234.57
    assert usage.quote.overage.amount == Decimal("1234.57")
    assert usage.quote.total == Decimal("1234.57")


@time_machine.travel(NOW, tick=False)
def test_free_plan_denies_at_its_limit_and_records_the_refused_event():
    customer = make_customer(free_plan(), started_at=START)
    use(customer, "1000", event_id="e1")

    decision = check_entitlement(customer_external_id=customer.external_id, feature_code="api-call",
                                 quantity=Decimal("1"), now=NOW)
    assert (decision.allowed, decision.reason) == (False, "insufficient_credits")
    assert decision.credits_remaining == Decimal("0")

    refused = use(customer, "1", event_id="e2")
    assert (refused.status, refused.reject_reason) == ("rejected", "insufficient_credits")
    usage = period_usage(customer=customer, now=NOW)
    assert usage.period.credits_used == Decimal("1000")
    assert usage.period.overage_credits == Decimal("0")


@time_machine.travel(NOW, tick=False)
def test_promotional_grant_expiring_sooner_is_consumed_before_included_credits():
    customer = make_customer(pro_plan(), started_at=START)
    from django.db import transaction

    with transaction.atomic():
        lock_customer(customer.pk)
        promo = grant_credits(customer=customer, credits=Decimal("500"), source=CreditGrant.Source.PROMOTIONAL,
                              effective_at=NOW, expires_at=utc(2026, 3, 20), now=NOW)
    use(customer, "300", event_id="e1")

    promo.refresh_from_db()
    included = CreditGrant.objects.get(customer=customer, source="plan_allocation")
    assert promo.remaining == Decimal("200")
    assert included.remaining == Decimal("10000")
    assert customer_get(customer.external_id).pk == customer.pk
