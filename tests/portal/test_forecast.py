"""The dashboard's forecast range: the burn rates of the last 7 full days of the period,
idle days included, against the average since the period began."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import CustomerMember
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db


def _customer_with_usage(client, days_and_credits):
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    for day, credits in days_and_credits:
        at = utc(2026, 5, day, 12)
        record_event(event=EventInput(event_id=f"e{day}", customer="acme", feature="api", quantity=Decimal(credits),
                                      timestamp=at), now=at)
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


def test_an_idle_day_counts_as_a_day_of_zero_credits(client):
    # 3 000 credits on May 1, nothing on May 2 and 3; now May 4 12:00, 27.5 days left.
    _customer_with_usage(client, [(1, "3000")])

    with time_machine.travel(utc(2026, 5, 4, 12), tick=False):
        page = client.get("/portal/").content.decode()

    # Slowest: the idle days (0 a day) → 3 000. Fastest: May 1's 3 000 a day → 3 000 + 82 500.
    assert "<strong>3,000 – 85,500</strong> credits" in page
    # Pro: 10 000 included; 85 500 − 10 000 = 75 500 overage × $0.002 = $151 + $49.
    assert '<strong id="forecast-bill">USD 49.00 – USD 200.00</strong>' in page


def test_days_before_the_period_began_are_not_idle_days(client):
    # 1 000 credits on each of May 1, 2 and 3: only three full days of this period so far.
    _customer_with_usage(client, [(1, "1000"), (2, "1000"), (3, "1000")])

    with time_machine.travel(utc(2026, 5, 4, 12), tick=False):
        page = client.get("/portal/").content.decode()

    # Slowest: the average since May 1, 3 000 / 3.5 days = 857.14 a day → 3 000 + 23 571.
    # Fastest: 1 000 a day → 3 000 + 27 500. (Late April is not this period: not zeros.)
    assert "<strong>26,571 – 30,500</strong> credits" in page
    # Overage beyond the 10 000 included, × $0.002: 16 571.43 → $33.14 + $49; 20 500 → $41 + $49.
    assert '<strong id="forecast-bill">USD 82.14 – USD 90.00</strong>' in page
