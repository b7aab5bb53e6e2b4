"""Every portal URL, tried across accounts: a user of Acme asks for Globex's invoice,
invoice lines, periods, events, CSV and partials, and posts every form with Globex's ids.
Each object URL answers 404, no page shows anything of Globex, and Globex's account is
exactly as it was. The routes are read from the URL conf, so a new portal page that is
not covered here fails `test_every_portal_route_is_covered`."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, get_resolver

from billing.models import (AlertPreference, AutoTopUp, BillingPeriod, CreditGrant, CreditPurchase, Customer,
                            CustomerMember, Invoice, InvoiceLine, LedgerEntry, Notification, SpendCapApproval,
                            Subscription, UsageEvent)
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from plans.models import CreditPack, Plan
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 6, 10)


def portal_routes() -> dict[str, str]:
    """name → route of every pattern under the `portal` namespace."""
    routes = {}
    for entry in get_resolver().url_patterns:
        if getattr(entry, "namespace", None) == "portal":
            for pattern in entry.url_patterns:
                assert isinstance(pattern, URLPattern), "nested includes: extend this test"
                routes[pattern.name] = str(pattern.pattern)
    return routes


def member(customer, email) -> Client:
    user = get_user_model().objects.create_user(email, email, "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client = Client()
    client.force_login(user)
    return client


def closed_may(external_id: str, name: str) -> Invoice:
    customer = make_customer(Plan.objects.get(code="pro"), started_at=utc(2026, 5, 1), external_id=external_id)
    Customer.objects.filter(pk=customer.pk).update(name=name)
    for n, credits in enumerate(("6000", "6500")):
        at = utc(2026, 5, 10 + n)
        record_event(event=EventInput(event_id=f"{external_id}-evt-{n}", customer=external_id, feature="api",
                                      quantity=Decimal(credits), timestamp=at), now=at)
    period = BillingPeriod.objects.get(customer=customer, start=utc(2026, 5, 1))
    invoice = close_period(period_id=period.pk, now=utc(2026, 6, 2))
    record_event(event=EventInput(event_id=f"{external_id}-evt-june", customer=external_id, feature="api",
                                  quantity=Decimal("100"), timestamp=utc(2026, 6, 5)), now=utc(2026, 6, 5))
    Notification.objects.create(customer=customer, title=f"{name} used 50 % of its credits", created_at=NOW)
    return invoice


@pytest.fixture
def accounts():
    FeatureFactory(code="api")
    pro_plan(overage_cap=Decimal("100"), cap_behaviour=Plan.CapBehaviour.APPROVAL)
    Plan.objects.create(code="scale", name="Scale", currency="USD", base_price=Decimal("99"),
                        included_credits=Decimal("50000"), overage_enabled=True,
                        overage_unit_price=Decimal("0.001"))
    CreditPack.objects.create(code="boost", name="Boost", currency="USD", credits=Decimal("5000"),
                              price=Decimal("10"))
    acme_invoice = closed_may("acme", "Acme Corp")
    globex_invoice = closed_may("globex", "Globex Ltd")
    return member(acme_invoice.customer, "ap@acme.test"), acme_invoice, globex_invoice


def account_state(customer: Customer) -> dict:
    """Everything of an account a portal form could change."""
    customer.refresh_from_db()
    return {
        "customer": (customer.name, customer.spend_cap, customer.email),
        "subscriptions": list(Subscription.objects.filter(customer=customer).values_list("plan__code", "pending_plan__code", "status", "canceled_at")),
        "periods": list(BillingPeriod.objects.filter(customer=customer).values_list("pk", "plan__code", "end")),
        "ledger": LedgerEntry.objects.filter(customer=customer).count(),
        "grants": list(CreditGrant.objects.filter(customer=customer).values_list("pk", "remaining")),
        "purchases": CreditPurchase.objects.filter(customer=customer).count(),
        "auto_topup": list(AutoTopUp.objects.filter(customer=customer).values()),
        "alerts": list(AlertPreference.objects.filter(customer=customer).values()),
        "approvals": SpendCapApproval.objects.filter(customer=customer).count(),
        "notifications": list(Notification.objects.filter(customer=customer).values_list("pk", "read_at")),
        "members": CustomerMember.objects.filter(customer=customer).count(),
        "invoices": list(Invoice.objects.filter(customer=customer).values_list("number", "status", "total")),
    }


def attempts(routes: dict, acme_invoice: Invoice, globex_invoice: Invoice):
    """(name, url, expect_404) for each route filled with Globex's objects, or with Acme's
    own objects where the route only takes the logged-in account's."""
    globex = globex_invoice.customer
    globex_line = globex_invoice.lines.first()
    globex_period = BillingPeriod.objects.get(customer=globex, start=utc(2026, 5, 1))
    for name, route in routes.items():
        if name in ("invoice",):
            yield name, f"/portal/invoices/{globex_invoice.number}/", True
        elif name == "invoice-line":
            yield name, f"/portal/invoices/{globex_invoice.number}/lines/{globex_line.pk}/", True
            # Acme's invoice number with Globex's line in it.
            yield name, f"/portal/invoices/{acme_invoice.number}/lines/{globex_line.pk}/", True
        elif name in ("usage", "usage-csv"):
            base = "/portal/usage/" if name == "usage" else "/portal/usage/events.csv"
            yield name, f"{base}?period={globex_period.pk}", True
            yield name, f"{base}?feature=api&from=2026-05-01&to=2026-06-30", False
        elif name == "change-plan":
            yield name, "/portal/plan/change/scale/", False  # changes only the logged-in account
        else:
            assert "<" not in route, f"portal route {name!r} takes {route!r}: add it to this test"
            yield name, f"/portal/{route}", False


GLOBEX_FORM = {
    # Every field a portal form reads, filled with Globex's ids where a form could take one.
    "customer": "globex", "customer_id": "", "notification": "", "action": "spend_cap", "spend_cap": "1",
    "cap": "500", "thresholds": "10", "email": "intruder@globex.test", "pack": "boost",
    "idempotency_key": "00000000-0000-0000-0000-000000000001", "enabled": "on", "mode": "pack", "threshold": "100",
}


@time_machine.travel(NOW, tick=False)
def test_every_portal_url_and_form_refuses_another_account(accounts):
    client, acme_invoice, globex_invoice = accounts
    globex = globex_invoice.customer
    form = dict(GLOBEX_FORM, customer_id=str(globex.pk),
                notification=str(Notification.objects.get(customer=globex).pk))
    before = account_state(globex)
    globex_marks = [globex.name, globex.external_id, globex_invoice.number, "globex-evt-"]
    tried = set()

    for name, url, expect_404 in attempts(portal_routes(), acme_invoice, globex_invoice):
        for method, headers in (("get", {}), ("get", {"HX-Request": "true"}), ("post", {})):
            data = form if method == "post" else None
            response = getattr(client, method)(url, data, headers=headers)
            if expect_404:
                assert response.status_code == 404, (method, url, response.status_code)
            else:
                assert response.status_code in (200, 302, 400, 405), (method, url, response.status_code)
            body = b"".join(response.streaming_content) if response.streaming else response.content
            for mark in globex_marks:
                assert mark.encode() not in body, (method, url, mark)
            tried.add(name)

    assert tried == set(portal_routes())
    assert account_state(globex) == before


def test_every_portal_route_is_covered(accounts):
    """A route with a parameter this test does not know trips the assertion in `attempts`."""
    _, acme_invoice, globex_invoice = accounts
    names = {name for name, _, _ in attempts(portal_routes(), acme_invoice, globex_invoice)}
    assert names == set(portal_routes()) and {"dashboard", "invoice", "invoice-line", "usage-csv"} <= names


@pytest.mark.parametrize("route", ["", "usage/", "usage/events.csv", "invoices/", "credits/", "controls/",
                                   "notifications/", "team/", "plan/change/scale/"])
def test_every_page_asks_an_anonymous_visitor_to_log_in(client, db, route):
    response = client.get(f"/portal/{route}")

    assert response.status_code == 302 and response["Location"].startswith("/portal/login/?next=")


def test_a_staff_user_without_an_account_sees_no_customer(accounts, admin_client):
    for name, url, _ in attempts(portal_routes(), *accounts[1:]):
        assert admin_client.get(url).status_code in (404, 405), url


def test_forms_refuse_a_post_without_the_csrf_token(accounts):
    _, acme_invoice, _ = accounts
    client = Client(enforce_csrf_checks=True)
    client.force_login(CustomerMember.objects.get(customer=acme_invoice.customer).user)

    for route in ("controls/", "credits/buy/", "credits/auto-top-up/", "notifications/read/", "team/",
                  "plan/change/scale/"):
        assert client.post(f"/portal/{route}", GLOBEX_FORM).status_code == 403, route


def test_every_route_sends_an_anonymous_htmx_request_to_log_in_as_a_whole_page(accounts):
    """A poll or form from a tab whose session ended (the credits page polls while a
    payment is pending) gets an HX-Redirect, never the login form swapped into a fragment."""
    _, acme_invoice, globex_invoice = accounts
    anonymous = Client()
    for method in ("get", "post"):
        for name, url, _ in attempts(portal_routes(), acme_invoice, globex_invoice):
            response = getattr(anonymous, method)(url, headers={"HX-Request": "true"})
            assert response.status_code == 200, (method, name, response.status_code)
            assert response["HX-Redirect"].startswith("/portal/login/?next="), (method, name)
