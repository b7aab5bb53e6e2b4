"""Upgrade suggestions with the exact saving, and the confirmed one-click change."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import CustomerMember, Invoice
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, PlanFactory, make_customer, pro_plan, set_cost, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 16)


@pytest.fixture
def heavy_user(client):
    feature = FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    scale = PlanFactory(code="scale", name="Scale", base_price=Decimal("99"), included_credits=Decimal("50000"),
                        overage_enabled=True, overage_unit_price=Decimal("0.0015"))
    set_cost(scale, feature, "8")  # cheaper per call on Scale
    PlanFactory(code="mega", name="Mega", base_price=Decimal("999"), included_credits=Decimal("1000000"))
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    record_event(event=EventInput(event_id="e1", customer="acme", feature="gpt-4o", quantity=Decimal("4000")),
                 now=utc(2026, 5, 10))  # 40 000 credits on Pro
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


@time_machine.travel(NOW, tick=False)
def test_the_dashboard_names_the_cheaper_plan_with_the_exact_saving(client, heavy_user):
    page = client.get("/portal/").content.decode()

    # Pro: $49 + 30 000 overage × $0.002 = $109.00. Scale: 4 000 calls × 8 = 32 000 credits,
    # all included: $99.00. Mega would cost $999.00: not suggested.
    assert ("On Scale you would have paid <strong>USD 99.00</strong>\\n       instead of USD 109.00"
            .replace("\\n", "\n") in page)
    assert "<strong>USD 10.00 less</strong>" in page
    assert 'href="/portal/plan/change/scale/"' in page


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
