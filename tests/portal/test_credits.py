"""Buying credits in the portal: a pack is granted and receipted once per form, automatic
top-up settings are saved or refused inline, and forms need their CSRF token."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from billing.models import AutoTopUp, CreditGrant, CreditPurchase, CustomerMember, Invoice
from plans.models import CreditPack
from tests.factories import make_customer, pro_plan

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(client):
    customer = make_customer(pro_plan(), started_at=timezone.now() - timedelta(days=3), external_id="acme")
    CreditPack.objects.create(code="starter", name="Starter pack", credits=Decimal("5000"), price=Decimal("10"))
    CreditPack.objects.create(code="scale", name="Scale pack", credits=Decimal("50000"), price=Decimal("80"))
    CreditPack.objects.create(code="euro", name="Euro pack", credits=Decimal("5000"), price=Decimal("9"), currency="EUR")
    CreditPack.objects.create(code="old", name="Retired pack", credits=Decimal("1"), price=Decimal("1"), is_active=False)
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


def buy_form(page: str, pack: str) -> dict:
    """The hidden fields of one pack's form, as the browser would submit them."""
    form = re.search(rf'<input type="hidden" name="pack" value="{pack}">\s*'
                     r'<input type="hidden" name="idempotency_key" value="([0-9a-f-]+)">', page)
    return {"pack": pack, "idempotency_key": form.group(1)}


def test_the_page_lists_active_packs_in_the_customers_currency(client, acme):
    page = client.get("/portal/credits/").content.decode()

    assert "Starter pack" in page and "USD 10.00" in page
    assert "Scale pack" in page and "USD 80.00" in page
    assert "Euro pack" not in page and "Retired pack" not in page
    assert '<strong id="balance">10,000</strong>' in page  # Pro's included credits


def test_buying_a_pack_grants_its_credits_and_leaves_a_paid_receipt(client, acme):
    form = buy_form(client.get("/portal/credits/").content.decode(), "starter")

    response = client.post("/portal/credits/buy/", form, follow=True)

    page = response.content.decode()
    assert response.redirect_chain == [("/portal/credits/", 302)]
    assert "Bought Starter pack: 5,000 credits. You now have 15,000 credits." in page
    assert '<strong id="balance">15,000</strong>' in page
    grant = CreditGrant.objects.get(customer=acme, source=CreditGrant.Source.PURCHASE)
    assert (grant.credits, grant.remaining) == (Decimal("5000"), Decimal("5000"))
    receipt = Invoice.objects.get(customer=acme, kind=Invoice.Kind.PACK_PURCHASE)
    assert receipt.status == Invoice.Status.PAID and receipt.total == Decimal("10")
    invoices = client.get("/portal/invoices/").content.decode()
    assert receipt.number in invoices and "Credit pack receipt" in invoices and "status-paid" in invoices
    detail = client.get(f"/portal/invoices/{receipt.number}/").content.decode()
    assert "Starter pack (5,000 credits)" in detail and '<th class="num" id="invoice-total">USD 10.00</th>' in detail


def test_a_resubmitted_form_buys_once(client, acme):
    form = buy_form(client.get("/portal/credits/").content.decode(), "starter")

    client.post("/portal/credits/buy/", form)
    again = client.post("/portal/credits/buy/", form, follow=True).content.decode()

    assert CreditPurchase.objects.filter(customer=acme).count() == 1
    assert CreditGrant.objects.filter(customer=acme, source=CreditGrant.Source.PURCHASE).count() == 1
    assert "Already bought Starter pack: 5,000 credits. You now have 15,000 credits." in again


def test_each_render_of_the_page_is_a_new_purchase(client, acme):
    first = buy_form(client.get("/portal/credits/").content.decode(), "starter")
    second = buy_form(client.get("/portal/credits/").content.decode(), "starter")

    client.post("/portal/credits/buy/", first)
    client.post("/portal/credits/buy/", second)

    assert first["idempotency_key"] != second["idempotency_key"]
    assert CreditPurchase.objects.filter(customer=acme).count() == 2


def test_a_pack_in_another_currency_cannot_be_bought(client, acme):
    response = client.post("/portal/credits/buy/", {"pack": "euro", "idempotency_key": "6f1c3c3e-8d59-4d8e-9d8a-3f4b2d1e0a11"})

    assert response.status_code == 400 and "That pack is not on sale." in response.content.decode()
    assert not CreditPurchase.objects.exists()


def test_auto_topup_settings_are_saved(client, acme):
    response = client.post("/portal/credits/auto-top-up/", {
        "enabled": "on", "mode": "refill", "pack": "starter", "threshold": "1000", "target_balance": "8000",
        "max_per_month": "3", "max_amount_per_month": "50",
    }, follow=True)

    topup = AutoTopUp.objects.get(customer=acme)
    assert (topup.enabled, topup.mode, topup.pack.code) == (True, "refill", "starter")
    assert (topup.threshold, topup.target_balance) == (Decimal("1000"), Decimal("8000"))
    assert (topup.max_per_month, topup.max_amount_per_month) == (3, Decimal("50"))
    page = response.content.decode()
    assert "Automatic top-up is on. Settings saved." in page
    assert 'value="8000"' in page and '<option value="starter" selected>' in page  # the form shows what is saved


def test_auto_topup_input_errors_are_shown_on_the_form(client, acme):
    response = client.post("/portal/credits/auto-top-up/", {
        "enabled": "on", "mode": "pack", "pack": "euro", "threshold": "", "max_per_month": "0",
        "max_amount_per_month": "25",
    })

    page = response.content.decode()
    assert response.status_code == 400
    assert "Select a valid choice. That choice is not one of the available choices." in page  # not in USD
    assert "This field is required." in page
    assert "Ensure this value is greater than or equal to 1." in page
    assert 'value="25"' in page  # what was typed stays
    assert not AutoTopUp.objects.exists()


def test_a_refusal_by_the_billing_service_is_shown_on_the_form(client, acme):
    response = client.post("/portal/credits/auto-top-up/", {
        "enabled": "on", "mode": "refill", "pack": "starter", "threshold": "1000", "target_balance": "500",
    })

    page = response.content.decode()
    assert response.status_code == 400
    assert '<ul class="errorlist" id="id_target_balance_error"><li>Refill mode needs a target balance above the threshold.</li></ul>' in page
    assert not AutoTopUp.objects.exists()


def test_csrf_is_enforced(acme):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(acme.members.get().user)

    assert strict.post("/portal/credits/buy/", {"pack": "starter",
                                                "idempotency_key": "6f1c3c3e-8d59-4d8e-9d8a-3f4b2d1e0a11"}).status_code == 403
    assert strict.post("/portal/credits/auto-top-up/", {"mode": "pack", "pack": "starter",
                                                        "threshold": "100"}).status_code == 403
    assert not CreditPurchase.objects.exists() and not AutoTopUp.objects.exists()


def test_buying_needs_a_login(client):
    response = client.post("/portal/credits/buy/", {"pack": "starter"})

    assert response.status_code == 302 and response["Location"].startswith("/portal/login/")
