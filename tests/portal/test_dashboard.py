"""The dashboard: exact figures for a known month, live partial, and only one's own account."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import CustomerMember
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 16)  # half of May left


@pytest.fixture
def acme_user(client):
    FeatureFactory(code="api")
    customer = make_customer(pro_plan(overage_cap=Decimal("20")), started_at=utc(2026, 5, 1), external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    for day, credits in ((5, "4000"), (10, "5000"), (15, "3500")):
        at = utc(2026, 5, day, 12)
        record_event(event=EventInput(event_id=f"e{day}", customer="acme", feature="api", quantity=Decimal(credits),
                                      timestamp=at), now=at)
    grant_credits_once(customer=customer, idempotency_key="promo", credits=Decimal("250"), source="promotional",
                       now=NOW, expires_at=utc(2026, 6, 30))
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return user


@time_machine.travel(NOW, tick=False)
def test_dashboard_shows_the_months_exact_figures(client, acme_user):
    page = client.get("/portal/").content.decode()

    assert "Acme Corp" in page and "Pro" in page
    assert "10,000</strong> of 10,000 included credits used (100.0 %)" in page
    assert 'class="progress full"' in page
    assert '<dd id="credits-used">12,500</dd>' in page
    assert '<dd id="overage-credits">2,500</dd>' in page
    assert '<dd id="estimated-overage">USD 5.00</dd>' in page  # 2 500 × $0.002
    assert "<strong>USD 54.00</strong>" in page  # $49 base + $5
    assert '<p class="big" id="credits-remaining">250</p>' in page  # the promotional grant
    assert "USD 5.00 of USD 20.00 overage cap used (25 %)" in page
    # Forecast: the last 7 full days (May 9–15) include idle days of 0 credits (slowest:
    # nothing more, 12 500 credits, $49 + $5); the fastest was May 10's 5 000. 16 days left:
    # 92 500 credits, whose overage would pass the $20 cap, where usage stops: $49 + $20.
    assert "<strong>12,500 – 92,500</strong> credits" in page
    assert '<strong id="forecast-bill">USD 54.00 – USD 69.00</strong>' in page


@time_machine.travel(NOW, tick=False)
def test_the_figures_partial_is_what_htmx_polls(client, acme_user):
    partial = client.get("/portal/", HTTP_HX_REQUEST="true").content.decode()

    assert partial.lstrip().startswith('<div id="figures"')
    assert "<html" not in partial
    assert 'hx-trigger="every 3s"' in partial


def test_login_is_required(client):
    response = client.get("/portal/")

    assert response.status_code == 302 and response["Location"].startswith("/portal/login/")


def test_a_login_without_a_customer_account_sees_nothing(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("staff", "s@x.test", "pw"))

    assert client.get("/portal/").status_code == 404


@time_machine.travel(NOW, tick=False)
def test_each_user_sees_only_their_own_account(client, acme_user, django_user_model):
    other = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")
    other.name = "Globex Ltd"
    other.save()
    user = django_user_model.objects.create_user("b@globex.test", "b@globex.test", "pw")
    CustomerMember.objects.create(user=user, customer=other)
    client.force_login(user)

    page = client.get("/portal/").content.decode()

    assert "Globex Ltd" in page and "Acme Corp" not in page
    assert '<dd id="credits-used">0</dd>' in page


def test_login_page_logs_in_with_email_and_password(client, acme_user):
    client.logout()

    response = client.post("/portal/login/", {"username": "ap@acme.test", "password": "pw-acme-123"})

    assert (response.status_code, response["Location"]) == (302, "/portal/")


@time_machine.travel(NOW, tick=False)
def test_page_and_partial_vary_on_hx_request_so_back_never_shows_a_cached_partial(client, acme_user):
    page = client.get("/portal/")
    partial = client.get("/portal/", HTTP_HX_REQUEST="true")

    assert "HX-Request" in page["Vary"] and "HX-Request" in partial["Vary"]
    assert "<html" in page.content.decode() and "<html" not in partial.content.decode()


@time_machine.travel(NOW, tick=False)
def test_an_htmx_history_restore_gets_the_full_page(client, acme_user):
    response = client.get("/portal/", HTTP_HX_REQUEST="true", HTTP_HX_HISTORY_RESTORE_REQUEST="true")

    page = response.content.decode()
    assert "<html" in page and "<h1>Acme Corp</h1>" in page
    assert "HX-Request" in response["Vary"]
