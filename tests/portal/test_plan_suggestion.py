"""Upgrade suggestions with the exact saving, and the confirmed one-click change.

A suggestion compares like for like: the last closed period as it was actually billed,
or the current period projected to its end (after a week of usage) against the other
plan's bill for the same projection; plans that could not have served the usage (a hard
stop, a spend cap that would have paused it) are never suggested."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import CustomerMember, Invoice
from billing.services.invoicing import close_period
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, PlanFactory, free_plan, make_customer, payg_plan, pro_plan, set_cost, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 16)


def _portal_user(client, customer):
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)


def _use(customer, at, calls, event_id):
    record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="gpt-4o",
                                  quantity=Decimal(calls), timestamp=at), now=at)


@pytest.fixture
def gpt4o():
    return FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))


@pytest.fixture
def scale(gpt4o):
    plan = PlanFactory(code="scale", name="Scale", base_price=Decimal("99"), included_credits=Decimal("50000"),
                       overage_enabled=True, overage_unit_price=Decimal("0.0015"))
    set_cost(plan, gpt4o, "8")  # cheaper per call on Scale
    return plan


@pytest.fixture
def heavy_user(client, scale):
    PlanFactory(code="mega", name="Mega", base_price=Decimal("999"), included_credits=Decimal("1000000"))
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    _use(customer, utc(2026, 5, 10), "4000", "e1")  # 40 000 credits on Pro
    _portal_user(client, customer)
    return customer


@pytest.fixture
def steady_user(client, scale):
    """200 gpt-4o calls (2 000 credits on Pro) every day of May so far."""
    PlanFactory(code="mega", name="Mega", base_price=Decimal("999"), included_credits=Decimal("1000000"))
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    for day in range(1, 16):
        _use(customer, utc(2026, 5, day, 12), "200", f"e{day}")
    _portal_user(client, customer)
    return customer


@time_machine.travel(NOW, tick=False)
def test_the_dashboard_names_the_cheaper_plan_with_the_projected_saving(client, steady_user):
    page = client.get("/portal/").content.decode()

    # 30 000 credits in 15 days, 2 000 every day: 62 000 by May 31. On Pro: $49 + (62 000 −
    # 10 000) × $0.002 = $153.00, the forecast's likely bill. On Scale the same 6 200 calls
    # × 8 = 49 600 credits, all included: $99.00. Mega would cost $999.00: not suggested.
    assert '<span id="forecast-bill-likely">USD 153.00</span>' in page
    assert ("Projected for this period at your recent pace: on Scale you would pay\n"
            "       <strong>USD 99.00</strong> instead of USD 153.00\n"
            "       on Pro — <strong>USD 54.00 less</strong>.") in page
    assert 'href="/portal/plan/change/scale/"' in page


def test_no_suggestion_from_the_first_days_of_a_period(client, gpt4o):
    """On day 1 the base fee of a whole period against a day of usage made any plan
    without a base fee look cheaper."""
    payg_plan()
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    _use(customer, utc(2026, 5, 1, 10), "10", "e1")  # 100 credits: $0.10 on pay as you go
    _portal_user(client, customer)

    with time_machine.travel(utc(2026, 5, 2), tick=False):
        page = client.get("/portal/").content.decode()

    assert 'id="plan-suggestion"' not in page


def test_a_plan_with_a_hard_stop_below_the_usage_is_never_suggested(client, gpt4o):
    """Free stops at 1 000 credits: it would have refused most of this usage, not served
    it for $0 (the demo told a Pro customer to switch to Free)."""
    free_plan()
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    for day in range(1, 16):
        _use(customer, utc(2026, 5, day, 12), "30", f"e{day}")  # 4 500 credits, all included on Pro
    _portal_user(client, customer)

    with time_machine.travel(NOW, tick=False):
        page = client.get("/portal/").content.decode()

    assert 'id="plan-suggestion"' not in page
    assert "Free" not in page


def test_a_plan_whose_spend_cap_would_have_paused_the_usage_is_never_suggested(client, steady_user):
    # No base fee, $0.001 a credit: 62 000 credits = $62.00, less than Pro's $153.00 and
    # Scale's $99.00 — but its $50 cap would have paused usage at 50 000 credits.
    payg_plan(overage_cap=Decimal("50"))

    with time_machine.travel(NOW, tick=False):
        page = client.get("/portal/").content.decode()

    assert "on Scale you would pay\n       <strong>USD 99.00</strong> instead of USD 153.00" in page
    assert "Pay as you go" not in page


def test_last_period_compares_what_was_actually_billed_with_promotional_credits_counted(client, gpt4o):
    payg_plan()  # no base fee, $0.001 a credit
    customer = make_customer(pro_plan(), started_at=utc(2026, 4, 1), external_id="acme")
    grant_credits_once(customer=customer, idempotency_key="promo", credits=Decimal("5000"), source="promotional",
                       now=utc(2026, 4, 1), expires_at=utc(2026, 12, 31))
    for day in range(1, 31):
        _use(customer, utc(2026, 4, day, 12), "100", f"e{day}")  # 30 000 credits in April
    april = customer.periods.get(start=utc(2026, 4, 1))
    close_period(period_id=april.pk, now=utc(2026, 5, 2), skip_grace=True)
    _portal_user(client, customer)

    with time_machine.travel(utc(2026, 5, 3), tick=False):
        page = client.get("/portal/").content.decode()

    # April on Pro, as billed: 30 000 − 10 000 included − 5 000 promotional = 15 000 overage
    # × $0.002 = $30 + $49 = $79.00. On pay as you go the promotional credits would have
    # served 5 000 of the same 30 000 credits: 25 000 × $0.001 = $25.00.
    assert ("Last period (Apr 1 – May 1), on Pay as you go you\n"
            "       would have paid <strong>USD 25.00</strong> instead of\n"
            "       USD 79.00 on Pro — <strong>USD 54.00 less</strong>.") in page


@time_machine.travel(NOW, tick=False)
def test_changing_plan_asks_for_confirmation_then_upgrades(client, heavy_user):
    confirm = client.get("/portal/plan/change/scale/").content.decode()
    assert "This is an upgrade: it starts now." in confirm
    assert heavy_user.subscriptions.get().plan.code == "pro"  # nothing changed by looking

    client.post("/portal/plan/change/scale/")

    assert heavy_user.subscriptions.get().plan.code == "scale"
    assert Invoice.objects.get(kind="plan_change").total == Decimal("25.81")  # ($99 − $49) × 16/31 = 25.806


def test_an_unknown_or_other_currency_plan_is_404(client, heavy_user):
    PlanFactory(code="eur", name="EUR", currency="EUR", base_price=Decimal("1"))

    with time_machine.travel(NOW, tick=False):
        assert client.get("/portal/plan/change/eur/").status_code == 404
        assert client.get("/portal/plan/change/nope/").status_code == 404
