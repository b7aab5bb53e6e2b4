"""Every manual grant says who made it and why, and the customer's ledger shows both."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.db.models import ProtectedError
from django.urls import reverse

from billing.errors import BillingError
from billing.models import CreditGrant, LedgerEntry
from billing.services.api_keys import api_key_create
from billing.services.ledger import grant_credits_once
from tests.factories import make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 3, 15, 12)


@pytest.fixture
def customer():
    with time_machine.travel(NOW, tick=False):
        return make_customer(pro_plan(), started_at=utc(2026, 3, 1), now=NOW, external_id="acme")


def grant_form(admin_client, customer, **fields):
    request_key = admin_client.get(reverse("admin:billing_creditgrant_add")).context["adminform"].form[
        "request_key"].value()
    data = {"customer": str(customer.pk), "source": "manual_adjustment", "credits": "250", "expires_at_0": "",
            "expires_at_1": "", "description": "Credit for the outage", "request_key": request_key,
            "reason": "Ticket 4411: 3 h outage on 12 March, refunded as credits", **fields}
    return admin_client.post(reverse("admin:billing_creditgrant_add"), data)


@time_machine.travel(NOW, tick=False)
def test_an_admin_grant_records_the_operator_and_the_reason(admin_client, admin_user, customer):
    response = grant_form(admin_client, customer)

    assert response.status_code == 302
    grant = CreditGrant.objects.get(customer=customer, source="manual_adjustment")
    assert grant.created_by == admin_user and grant.created_by_api_key is None
    assert grant.reason == "Ticket 4411: 3 h outage on 12 March, refunded as credits"
    assert grant.granted_by == admin_user.get_username()
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("reason", ["", "   "])
def test_an_admin_grant_without_a_reason_grants_nothing(admin_client, customer, reason):
    response = grant_form(admin_client, customer, reason=reason)

    assert response.status_code == 200
    assert "reason" in response.context["adminform"].form.errors
    assert not CreditGrant.objects.filter(source="manual_adjustment").exists()


@time_machine.travel(NOW, tick=False)
def test_the_customer_page_shows_who_granted_and_why_in_its_ledger(admin_client, admin_user, customer):
    grant_form(admin_client, customer)

    page = admin_client.get(reverse("admin:billing_customer_change", args=[customer.pk])).content.decode()
    ledger = page[page.index("Latest ledger entries"):]
    assert admin_user.get_username() in ledger
    assert "Ticket 4411: 3 h outage on 12 March, refunded as credits" in ledger
    assert "Overage" in ledger  # the included credits, granted by Overage itself


@time_machine.travel(NOW, tick=False)
def test_the_ledger_entry_list_and_the_grant_page_show_who_and_why(admin_client, admin_user, customer):
    grant_form(admin_client, customer)
    grant = CreditGrant.objects.get(source="manual_adjustment")

    entries = admin_client.get(reverse("admin:billing_ledgerentry_changelist")).content.decode()
    grant_page = admin_client.get(reverse("admin:billing_creditgrant_change", args=[grant.pk])).content.decode()
    for page in (entries, grant_page):
        assert admin_user.get_username() in page
        assert "Ticket 4411" in page


@time_machine.travel(NOW, tick=False)
def test_the_service_refuses_an_empty_reason_and_records_an_api_key(customer):
    api_key, _ = api_key_create(name="support-bot", scopes=["admin"])
    with pytest.raises(BillingError) as refused:
        grant_credits_once(customer=customer, idempotency_key="k0", credits=Decimal("10"), source="promotional",
                           now=NOW, api_key=api_key, reason=" ")
    assert (refused.value.code, refused.value.field) == ("missing_field", "reason")

    grant, created = grant_credits_once(customer=customer, idempotency_key="k1", credits=Decimal("10"),
                                        source="promotional", now=NOW, api_key=api_key, reason="Referral bonus")

    assert created and grant.created_by_api_key == api_key and grant.created_by is None
    assert grant.granted_by == f"API key {api_key}"
    assert LedgerEntry.objects.get(grant=grant).kind == "grant"


@time_machine.travel(NOW, tick=False)
def test_the_audit_trail_outlives_attempts_to_delete_the_operator(admin_client, admin_user, customer):
    grant_form(admin_client, customer)

    with pytest.raises(ProtectedError):
        get_user_model().objects.filter(pk=admin_user.pk).delete()


@time_machine.travel(NOW, tick=False)
def test_grants_overage_makes_itself_have_no_operator(customer):
    included = CreditGrant.objects.get(customer=customer, source="plan_allocation")

    assert (included.created_by, included.created_by_api_key, included.reason) == (None, None, "")
    assert included.granted_by == "Overage"


@time_machine.travel(NOW, tick=False)
def test_an_api_grant_records_its_key_and_reason_and_answers_with_them(customer):
    from rest_framework.test import APIClient

    api_key, key = api_key_create(name="support-bot", scopes=["admin"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    body = {"credits": "100", "source": "manual_adjustment", "idempotency_key": "t-9", "reason": "Ticket 9"}

    response = client.post("/api/v1/customers/acme/grants", body, format="json")
    missing = client.post("/api/v1/customers/acme/grants", {**body, "idempotency_key": "t-10", "reason": ""},
                          format="json")

    assert response.status_code == 201
    assert response.json()["reason"] == "Ticket 9"
    assert response.json()["created_by"] == f"API key {api_key}"
    assert CreditGrant.objects.get(idempotency_key="t-9").created_by_api_key == api_key
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "reason"
