"""Random sequences of grants, events and expiries, checked against a small reference
model of the ledger: same draws in the same order, same overage, caches match entries."""

import itertools
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.models import CreditGrant, UsageEvent
from billing.services.ledger import expire_credit_grants, grant_credits
from billing.services.locks import lock_customer
from billing.services.metering import EventInput, record_event
from plans.models import Plan
from tests.factories import FeatureFactory, PlanFactory, make_customer, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
START = utc(2026, 1, 1)  # a 31-day period: all operations stay inside it
GRACE = timedelta(hours=1)
_ids = itertools.count()

credits = st.decimals(min_value=Decimal("0.5"), max_value=Decimal("200"), places=1)
grant_op = st.tuples(st.just("grant"), credits, st.sampled_from(["promotional", "purchase", "manual_adjustment"]),
                     st.one_of(st.none(), st.integers(1, 40)), st.booleans())
event_op = st.tuples(st.just("event"), st.sampled_from(["chat", "embed"]), credits)
wait_op = st.tuples(st.just("wait"), st.integers(1, 72))
expire_op = st.tuples(st.just("expire"))
operations = st.lists(st.one_of(grant_op, event_op, wait_op, expire_op), min_size=1, max_size=25)


@dataclass
class RefGrant:
    pk: int
    remaining: Decimal
    priority: int
    effective_at: object
    expires_at: object
    features: set


def ref_usable(grants, feature: str, at) -> list[RefGrant]:
    """The reference consumption order: soonest expiry, then priority, then oldest."""
    usable = [g for g in grants if g.remaining > 0 and g.effective_at <= at
              and (g.expires_at is None or g.expires_at > at) and (not g.features or feature in g.features)]
    return sorted(usable, key=lambda g: (g.expires_at is None, g.expires_at or at, g.priority, g.pk))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ops=operations, overage=st.booleans(), included=st.sampled_from([Decimal("0"), Decimal("50")]))
def test_random_operations_keep_the_ledger_equal_to_a_reference_model(ops, overage, included):
    chat = FeatureFactory(code="chat")
    FeatureFactory(code="embed")
    plan = PlanFactory(code=f"p-{next(_ids)}", included_credits=included, overage_enabled=overage,
                       overage_unit_price=Decimal("0.01"), hard_limit_behaviour=Plan.HardLimit.BLOCK)
    customer = make_customer(plan, started_at=START, external_id=f"prop-{next(_ids)}")
    now = START + timedelta(hours=1)
    ref: dict[int, RefGrant] = {}
    for grant in CreditGrant.objects.filter(customer=customer):
        ref[grant.pk] = RefGrant(grant.pk, grant.remaining, grant.priority, grant.effective_at, grant.expires_at, set())
    expected_overage = Decimal(0)

    for op in ops:
        if op[0] == "grant":
            _, amount, source, expires_in_days, scoped = op
            expires_at = now + timedelta(days=expires_in_days) if expires_in_days else None
            with transaction.atomic():
                lock_customer(customer.pk)
                grant = grant_credits(customer=customer, credits=amount, source=source, effective_at=now,
                                      expires_at=expires_at, features=[chat] if scoped else [], now=now)
            ref[grant.pk] = RefGrant(grant.pk, amount, grant.priority, now, expires_at, {"chat"} if scoped else set())
        elif op[0] == "event":
            _, feature, amount = op
            usable = ref_usable(ref.values(), feature, now)
            available = sum((g.remaining for g in usable), Decimal(0))
            overage_part, covered = max(amount - available, Decimal(0)), available >= amount
            event, _ = record_event(event=EventInput(event_id=f"e{next(_ids)}", customer=customer.external_id,
                                                     feature=feature, quantity=amount), now=now)
            if covered or overage:
                assert event.status == UsageEvent.Status.ACCEPTED
                assert event.overage_credits == overage_part
                expected_overage += overage_part
                # Replay the draws on the reference in consumption order.
                need = amount
                for g in usable:
                    take = min(g.remaining, need)
                    g.remaining -= take
                    need -= take
            else:
                assert (event.status, event.reject_reason) == ("rejected", "insufficient_credits")
        elif op[0] == "wait":
            now = min(now + timedelta(hours=op[1]), START + timedelta(days=31) - timedelta(minutes=1))
        else:
            expire_credit_grants(now=now)
            included = _included_pks(customer)  # left to the period close, not to this job
            for g in ref.values():
                if g.expires_at is not None and g.expires_at <= now - GRACE and g.pk not in included:
                    g.remaining = Decimal(0)

        actual = dict(CreditGrant.objects.filter(customer=customer).values_list("pk", "remaining"))
        assert actual == {pk: g.remaining for pk, g in ref.items()}
        assert customer.periods.get().overage_credits == expected_overage
    assert_ledger_consistent()


def _included_pks(customer) -> set[int]:
    return set(CreditGrant.objects.filter(customer=customer, source="plan_allocation").values_list("pk", flat=True))
