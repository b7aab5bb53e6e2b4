"""A downgrade waits for the next period: the dashboard says so, and the customer can
keep the current plan (cancelling the scheduled change) after a confirmation."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import CustomerMember, Subscription
from plans.models import Plan
from tests.factories import free_plan, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 16)


@pytest.fixture
def acme(client):
    free_plan()
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


def subscription(customer) -> Subscription:
    return Subscription.objects.select_related("plan", "pending_plan").get(customer=customer)


@time_machine.travel(NOW, tick=False)
def test_a_scheduled_downgrade_shows_on_the_dashboard_and_can_be_cancelled(client, acme):
    client.post("/portal/plan/change/free/")
    assert (subscription(acme).plan.code, subscription(acme).pending_plan.code) == ("pro", "free")

    page = client.get("/portal/").content.decode()
    partial = client.get("/portal/", HTTP_HX_REQUEST="true").content.decode()
    notice = 'Moving to <strong>Free</strong> on Jun 1, 2026.'
    assert notice in page and notice in partial
    assert '<a href="/portal/plan/change/pro/">Keep Pro…</a>' in page

    confirm = client.get("/portal/plan/change/pro/").content.decode()
    assert "Keep Pro?" in confirm
    assert "You are scheduled to move to Free on Jun 1, 2026." in confirm
    assert "Yes, keep Pro" in confirm
    assert subscription(acme).pending_plan.code == "free"  # nothing changed by looking

    response = client.post("/portal/plan/change/pro/", follow=True)

    assert (subscription(acme).plan.code, subscription(acme).pending_plan) == ("pro", None)
    page = response.content.decode()
    assert "You stay on Pro: the move to Free is cancelled." in page
    assert "Moving to" not in page


@time_machine.travel(NOW, tick=False)
def test_the_current_plan_is_not_a_change_when_nothing_is_scheduled(client, acme):
    assert client.get("/portal/plan/change/pro/").status_code == 404
    assert client.post("/portal/plan/change/pro/").status_code == 404
    assert "Moving to" not in client.get("/portal/").content.decode()
    assert (subscription(acme).plan.code, subscription(acme).pending_plan) == ("pro", None)


@time_machine.travel(NOW, tick=False)
def test_a_downgrade_can_be_cancelled_when_the_current_plan_is_no_longer_on_sale(client, acme):
    client.post("/portal/plan/change/free/")
    Plan.objects.filter(code="pro").update(is_active=False)  # the business retires Pro

    assert "Keep Pro?" in client.get("/portal/plan/change/pro/").content.decode()
    page = client.post("/portal/plan/change/pro/", follow=True).content.decode()

    assert (subscription(acme).plan.code, subscription(acme).pending_plan) == ("pro", None)
    assert "You stay on Pro: the move to Free is cancelled." in page


@time_machine.travel(NOW, tick=False)
def test_a_retired_plan_cannot_be_chosen_by_someone_not_on_it(client, acme):
    Plan.objects.filter(code="free").update(is_active=False)

    assert client.post("/portal/plan/change/free/").status_code == 404
    assert subscription(acme).pending_plan is None
