"""The close opens the next period from the subscription and latest period it read under
the customer's lock (`open_periods(last=…)`): the same period, plan, credits and fee as
reading them again, and a wrong `last` fails instead of opening a period twice."""

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from billing.models import BillingPeriod, CreditGrant, Subscription
from billing.services.customers import open_periods
from billing.services.invoicing import close_period
from billing.services.locks import lock_customer
from billing.services.plan_changes import subscription_change_plan
from tests.factories import FeatureFactory, PlanFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY, JUNE, JULY = utc(2026, 5, 1), utc(2026, 6, 1), utc(2026, 7, 1)


@pytest.fixture(autouse=True)
def feature():
    return FeatureFactory(code="api")


def test_the_close_opens_the_next_period_on_the_scheduled_plan_with_its_credits_and_fee():
    pro = pro_plan()
    PlanFactory(code="lite", name="Lite", base_price=Decimal("19"), included_credits=Decimal("3000"))
    customer = make_customer(pro, started_at=MAY)
    subscription_change_plan(customer=customer, plan_code="lite", now=utc(2026, 5, 10))

    invoice = close_period(period_id=BillingPeriod.objects.get(customer=customer, start=MAY).pk, now=JUNE,
                           skip_grace=True)

    june = BillingPeriod.objects.get(customer=customer, start=JUNE)
    assert (june.plan.code, june.end, june.included_credits) == ("lite", JULY, Decimal("3000"))
    grant = CreditGrant.objects.get(period=june, source="plan_allocation")
    assert (grant.credits, grant.cost, grant.expires_at) == (Decimal("3000"), Decimal("19.00"), JULY)
    assert [(line.kind, line.amount) for line in invoice.lines.all()] == [("base_fee", Decimal("19.00"))]
    subscription = Subscription.objects.get(customer=customer)
    assert (subscription.plan.code, subscription.pending_plan) == ("lite", None)
    assert_ledger_consistent()


def test_a_stale_last_period_fails_rather_than_opening_a_period_twice():
    customer = make_customer(pro_plan(), started_at=MAY, now=utc(2026, 6, 5))  # May and June are open
    subscription = Subscription.objects.get(customer=customer)
    may = BillingPeriod.objects.get(customer=customer, start=MAY)

    with pytest.raises(IntegrityError), transaction.atomic():
        lock_customer(customer.pk)
        open_periods(subscription=subscription, until=utc(2026, 6, 10), last=may)

    assert BillingPeriod.objects.filter(customer=customer, start=JUNE).count() == 1
    assert CreditGrant.objects.filter(customer=customer, source="plan_allocation").count() == 2


def test_a_period_of_another_subscription_is_refused_as_last():
    customer = make_customer(pro_plan(), started_at=MAY)
    other = make_customer(pro_plan(code="pro-2"), started_at=MAY)
    subscription = Subscription.objects.get(customer=customer)

    with pytest.raises(ValueError), transaction.atomic():
        lock_customer(customer.pk)
        open_periods(subscription=subscription, until=JUNE, last=BillingPeriod.objects.get(customer=other))

    assert BillingPeriod.objects.filter(customer=customer).count() == 1
