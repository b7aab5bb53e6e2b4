"""Cross-account probes beyond tests/portal/test_access.py (which walks every portal
route with Globex's invoice, line, period and notification ids and posts every form):
here Acme's user replays Globex's *real* secrets and positions — its purchase
idempotency key, its event-list cursors, its members' addresses — and the routes outside
the portal namespace (login, logout, password reset) are walked too. Nothing of
Globex is shown or changed, and a Globex id answers exactly like an id that does not
exist, so the portal is no oracle for what other accounts have."""

import re

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.core import mail
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from billing.models import CreditPurchase, CustomerMember, UsageEvent
from billing.selectors_usage import EventCursor
from billing.services.purchases import purchase_pack
from tests.portal.test_access import NOW, account_state, accounts  # noqa: F401 - `accounts` is a fixture

pytestmark = pytest.mark.django_db


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def assert_nothing_of_globex(response, globex_invoice) -> None:
    globex = globex_invoice.customer
    content = body(response)
    for mark in (globex.name, globex.external_id, globex_invoice.number, "globex-evt-", "globex.test"):
        assert mark.encode() not in content, mark


@time_machine.travel(NOW, tick=False)
def test_globex_ids_answer_exactly_like_ids_that_do_not_exist(accounts):  # noqa: F811
    client, acme_invoice, globex_invoice = accounts
    globex_line = globex_invoice.lines.first()
    pairs = [
        (f"/portal/invoices/{globex_invoice.number}/", "/portal/invoices/OVG-NOPE-1/"),
        (f"/portal/invoices/{globex_invoice.number}/lines/{globex_line.pk}/",
         f"/portal/invoices/{acme_invoice.number}/lines/999999999/"),
        (f"/portal/invoices/{acme_invoice.number}/lines/{globex_line.pk}/",
         f"/portal/invoices/{acme_invoice.number}/lines/999999998/"),
    ]
    for globex_url, missing_url in pairs:
        for headers in ({}, {"HX-Request": "true"}):
            theirs, nothing = client.get(globex_url, headers=headers), client.get(missing_url, headers=headers)
            assert theirs.status_code == nothing.status_code == 404
            # Same page, but for the number echoed back in the path.
            normalise = lambda r, url: body(r).replace(url.encode(), b"URL")  # noqa: E731
            assert normalise(theirs, globex_url) == normalise(nothing, missing_url)


@time_machine.travel(NOW, tick=False)
def test_globex_purchase_key_buys_for_acme_and_never_answers_with_globex_purchase(accounts, settings):  # noqa: F811
    client, acme_invoice, globex_invoice = accounts
    globex = globex_invoice.customer
    key = "4f1c2a9e-0000-4000-8000-000000000042"
    globex_purchase, _ = purchase_pack(customer=globex, pack_code="boost", idempotency_key=f"portal:{key}", now=NOW)
    before = account_state(globex)

    response = client.post("/portal/credits/buy/", {"pack": "boost", "idempotency_key": key}, follow=True)

    assert response.status_code == 200
    assert_nothing_of_globex(response, globex_invoice)
    acme_purchase = CreditPurchase.objects.get(customer=acme_invoice.customer)
    assert acme_purchase.pk != globex_purchase.pk
    assert account_state(globex) == before


@time_machine.travel(NOW, tick=False)
def test_event_list_cursors_made_from_globex_events_show_only_acme_events(accounts):  # noqa: F811
    client, acme_invoice, globex_invoice = accounts
    globex_events = UsageEvent.objects.filter(customer=globex_invoice.customer)
    assert globex_events.exists()
    for event in globex_events:
        token = EventCursor.of(event).token()
        for param in ("after", "before"):
            for url in (f"/portal/usage/?{param}={token}", f"/portal/usage/events.csv?{param}={token}"):
                for headers in ({}, {"HX-Request": "true"}):
                    response = client.get(url, headers=headers)
                    assert response.status_code == 200, url
                    assert_nothing_of_globex(response, globex_invoice)


@time_machine.travel(NOW, tick=False)
def test_inviting_a_globex_login_is_refused_without_saying_whose_it_is(accounts):  # noqa: F811
    client, acme_invoice, globex_invoice = accounts
    globex = globex_invoice.customer
    globex_user = get_user_model().objects.create_user("cfo@globex.test", "cfo@globex.test", "pw")
    CustomerMember.objects.create(user=globex_user, customer=globex, is_owner=False)
    before = account_state(globex)

    taken = client.post("/portal/team/", {"email": "CFO@globex.test"})
    staff = get_user_model().objects.create_user("ops@overage.test", "ops@overage.test", "pw", is_staff=True)
    staff_taken = client.post("/portal/team/", {"email": staff.email})

    assert taken.status_code == staff_taken.status_code == 200
    refusal = re.compile(rb'<p class="error">(.*?)</p>', re.S)
    assert refusal.findall(taken.content) == refusal.findall(staff_taken.content) != []
    assert globex_user.customer_membership.customer == globex
    assert account_state(globex) == before
    assert mail.outbox == []


def non_portal_routes() -> dict[str, str]:
    """name → route of the patterns served under /portal/ outside the `portal` namespace
    (Django's login, logout and password-reset views)."""
    routes = {}
    for entry in get_resolver().url_patterns:
        if isinstance(entry, URLResolver) and str(entry.pattern) == "portal/" and entry.namespace is None:
            for pattern in entry.url_patterns:
                assert isinstance(pattern, URLPattern)
                routes[pattern.name] = str(pattern.pattern)
    return routes


@time_machine.travel(NOW, tick=False)
def test_every_login_and_password_route_refuses_to_touch_another_login(accounts):  # noqa: F811
    """Acme's user (and a visitor) walks every auth route with Globex's owner in it:
    a reset for Globex's address answers exactly like one for an unknown address, a
    reset link for Globex's login with a made-up token is refused, and Globex's owner
    keeps their password and session."""
    client, _, globex_invoice = accounts
    globex_owner = get_user_model().objects.create_user("owner@globex.test", "owner@globex.test", "pw")
    CustomerMember.objects.create(user=globex_owner, customer=globex_invoice.customer, is_owner=True)
    password_hash = globex_owner.password
    uid = urlsafe_base64_encode(force_bytes(globex_owner.pk))
    routes = non_portal_routes()
    tried = set()

    for name, route in routes.items():
        url = "/portal/" + route.replace("<uidb64>", uid).replace("<token>", "set-password")
        assert "<" not in url, f"auth route {name!r} takes {route!r}: add it to this test"
        form = {"email": globex_owner.email, "username": globex_owner.username, "password": "guess",
                "new_password1": "Hijacked-42-password", "new_password2": "Hijacked-42-password"}
        for method in ("get", "post"):
            response = getattr(client, method)(url, form if method == "post" else None)
            assert response.status_code in (200, 302, 405), (method, url, response.status_code)
            assert globex_invoice.customer.name.encode() not in body(response)
        tried.add(name)
        client.force_login(CustomerMember.objects.get(customer__external_id="acme").user)  # after logout

    assert tried == set(routes) and {"login", "logout", "password_reset", "password_reset_confirm"} <= tried
    globex_owner.refresh_from_db()
    assert globex_owner.password == password_hash
    # The reset itself mails the address's owner only (Django's flow), and answers the
    # same as for an address nobody has, so it does not reveal that Globex is a customer.
    assert [m.to for m in mail.outbox] == [[globex_owner.email]]
    known = client.post("/portal/password_reset/", {"email": globex_owner.email})
    unknown = client.post("/portal/password_reset/", {"email": "nobody@nowhere.test"})
    assert (known.status_code, known["Location"]) == (unknown.status_code, unknown["Location"])
