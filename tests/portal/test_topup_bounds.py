"""Automatic top-up numbers are bounded by the form, so no input can overflow a column
(99 999 999 999 top-ups a month was a 500 on PostgreSQL): an inline error instead."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import AutoTopUp, CustomerMember
from plans.models import CreditPack
from tests.factories import make_customer, pro_plan

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(client):
    customer = make_customer(pro_plan(), started_at=timezone.now() - timedelta(days=3), external_id="acme")
    CreditPack.objects.create(code="starter", name="Starter pack", credits=Decimal("5000"), price=Decimal("10"))
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


def settings_with(**fields) -> dict:
    return {"enabled": "on", "mode": "pack", "pack": "starter", "threshold": "1000", **fields}


def test_too_many_top_ups_a_month_is_an_inline_error_and_nothing_is_saved(client, acme):
    response = client.post("/portal/credits/auto-top-up/", settings_with(max_per_month="99999999999"))

    page = response.content.decode()
    assert response.status_code == 400
    assert "Ensure this value is less than or equal to 1000." in page
    assert 'value="99999999999"' in page  # what was typed stays
    assert not AutoTopUp.objects.exists()


def test_the_bound_itself_is_accepted(client, acme):
    response = client.post("/portal/credits/auto-top-up/", settings_with(max_per_month="1000"))

    assert response.status_code == 302
    assert AutoTopUp.objects.get(customer=acme).max_per_month == 1000


@pytest.mark.parametrize("field, value, error", [
    ("threshold", "1" + "0" * 14, "Ensure that there are no more than 14 digits before the decimal point."),
    ("target_balance", "0.0000001", "Ensure that there are no more than 6 decimal places."),
    ("max_amount_per_month", "1" + "0" * 12, "Ensure that there are no more than 12 digits before the decimal point."),
])
def test_decimals_beyond_their_columns_are_inline_errors(client, acme, field, value, error):
    response = client.post("/portal/credits/auto-top-up/", settings_with(**{field: value}))

    assert response.status_code == 400
    assert error in response.content.decode()
    assert not AutoTopUp.objects.exists()
