"""Every /api/v1 route and every HTTP method, tried with a key of each scope.

The routes are read from billing/api/urls.py and checked against SCOPES, the contract
written out by hand: a new endpoint, a new method on an old one, or a scope changed in
a view fails `test_the_scope_table_names_every_route_and_method` until the table says
which scope it needs. tests/api/test_auth.py covers the Bearer header itself.
"""

from decimal import Decimal

import pytest
import time_machine
from django.apps import apps
from django.urls import URLPattern
from django.utils import timezone
from rest_framework.test import APIClient

from billing.api import urls as api_urls
from billing.api.views import ScopedView
from billing.models import ApiKey, BillingPeriod
from billing.services.api_keys import api_key_create, api_key_revoke
from billing.services.entitlements import check_entitlement
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from plans.models import CreditPack
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 6, 10)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# (route name, method) → the one scope that may use it. The design's split: `ingest` sends
# events and checks entitlements, `read` reads, `admin` changes plans, customers, grants.
SCOPES = {
    ("features", "GET"): "read",
    ("features", "POST"): "admin",
    ("plans", "GET"): "read",
    ("plans", "POST"): "admin",
    ("plan-detail", "GET"): "read",
    ("customers", "POST"): "admin",
    ("customer-detail", "GET"): "read",
    ("subscription", "POST"): "admin",
    ("customer-usage", "GET"): "read",
    ("customer-grants", "POST"): "admin",
    ("events", "POST"): "ingest",
    ("events-batch", "POST"): "ingest",
    ("entitlement-check", "POST"): "ingest",
    ("reservation-release", "POST"): "ingest",
    ("customer-invoices", "GET"): "read",
    ("upcoming-invoice", "GET"): "read",
    ("invoice-detail", "GET"): "read",
    ("packs", "GET"): "read",
    ("spend-cap", "GET"): "read",
    ("spend-cap", "PUT"): "admin",
    ("auto-topup", "GET"): "read",
    ("auto-topup", "PUT"): "admin",
    ("spend-cap-approvals", "POST"): "admin",
    ("customer-packs", "POST"): "admin",
    ("line-usage", "GET"): "read",
}


def scoped_routes() -> dict[str, tuple[str, type]]:
    """name → (route, view class) of every named pattern in billing/api/urls.py."""
    routes = {}
    for pattern in api_urls.urlpatterns:
        assert isinstance(pattern, URLPattern), "nested includes: extend this test"
        if pattern.name is None:
            assert pattern.callback.__name__ == "api_not_found", f"unnamed API route {pattern.pattern}"
            continue
        view_class = getattr(pattern.callback, "view_class", None)
        assert view_class is not None and issubclass(view_class, ScopedView), pattern.name
        routes[pattern.name] = (str(pattern.pattern), view_class)
    return routes


def implemented(view_class) -> set[str]:
    return {method for method in METHODS if hasattr(view_class, method.lower())}


def test_the_scope_table_names_every_route_and_method():
    declared = {(name, method) for name, (_, view) in scoped_routes().items() for method in implemented(view)}
    assert declared == set(SCOPES)


def test_every_view_declares_exactly_the_scope_of_the_table():
    """The table is the contract, the views implement it (HasApiKeyScope reads them)."""
    for name, (_, view) in scoped_routes().items():
        for method in implemented(view):
            declared = getattr(view, "required_scopes", {}).get(method) or view.required_scope
            assert declared == SCOPES[(name, method)], (name, method, declared)


@pytest.fixture
def objects():
    """One real object for every kind of path parameter, so an allowed request reaches
    the view's own code rather than stopping at a 404 for a made-up id."""
    with time_machine.travel(NOW, tick=False):
        FeatureFactory(code="api")
        plan = pro_plan()
        CreditPack.objects.create(code="boost", name="Boost", currency="USD", credits=Decimal("5000"),
                                  price=Decimal("10"))
        customer = make_customer(plan, started_at=utc(2026, 5, 1),
                                 external_id="acme")
        at = utc(2026, 5, 20)
        record_event(event=EventInput(event_id="may-1", customer="acme", feature="api", quantity=Decimal("12000"),
                                      timestamp=at), now=at)
        invoice = close_period(period_id=BillingPeriod.objects.get(customer=customer, start=utc(2026, 5, 1)).pk,
                               now=utc(2026, 6, 2))
        decision = check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("1"),
                                     reserve=True, now=NOW)
    line = invoice.lines.filter(kind="overage").first() or invoice.lines.first()
    return {
        "code": "pro", "external_id": "acme", "number": invoice.number, "line_id": str(line.pk),
        "reservation_id": str(decision.reservation.pk),
    }


def url_for(route: str, objects: dict) -> str:
    path = route
    for converter in ("str:", "int:", "uuid:"):
        path = path.replace(f"<{converter}", "<")
    for name, value in objects.items():
        path = path.replace(f"<{name}>", value)
    assert "<" not in path, f"route {route!r} takes a parameter this test does not fill"
    return f"/api/v1/{path}"


def keyed(scopes: list[str]) -> APIClient:
    _, key = api_key_create(name="+".join(scopes), scopes=scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def rows() -> dict[str, int]:
    """Row counts of every table of ours: a refused request writes nothing."""
    return {model._meta.label: model.objects.count()
            for app in ("billing", "plans") for model in apps.get_app_config(app).get_models()
            if model is not ApiKey}


def send(client: APIClient, method: str, url: str):
    return client.generic(method, url, "{}", content_type="application/json")


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("scope", [choice.value for choice in ApiKey.Scope])
def test_a_key_of_one_scope_uses_exactly_its_endpoints(objects, scope):
    client = keyed([scope])
    tried = 0
    for name, (route, view) in scoped_routes().items():
        url = url_for(route, objects)
        for method in implemented(view):
            before = rows()
            response = send(client, method, url)
            if SCOPES[(name, method)] == scope:
                assert response.status_code not in (401, 403), (method, url, response.content)
            else:
                assert response.status_code == 403, (method, url, response.status_code)
                assert response.json()["error"]["code"] == "insufficient_scope", (method, url)
                assert rows() == before, (method, url)
            tried += 1
    assert tried == len(SCOPES)


@time_machine.travel(NOW, tick=False)
def test_a_key_with_every_scope_uses_every_endpoint(objects):
    client = keyed(["ingest", "read", "admin"])
    for name, (route, view) in scoped_routes().items():
        for method in implemented(view):
            response = send(client, method, url_for(route, objects))
            assert response.status_code not in (401, 403), (name, method, response.content)


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("scope", [choice.value for choice in ApiKey.Scope])
def test_a_method_a_route_does_not_have_is_never_served(objects, scope):
    """PUT on /events, DELETE on /plans…: refused for scope (403) or as a method (405),
    whichever comes first, and nothing is written."""
    client = keyed([scope])
    for name, (route, view) in scoped_routes().items():
        url = url_for(route, objects)
        for method in set(METHODS) - implemented(view):
            before = rows()
            response = send(client, method, url)
            assert response.status_code in (403, 405), (method, url, response.status_code)
            assert rows() == before, (method, url)


@time_machine.travel(NOW, tick=False)
def test_a_revoked_key_is_refused_on_every_route(objects):
    """Revocation takes effect at once in the revoking process, including for a key this
    process authenticated a moment ago (the per-process key cache)."""
    api_key, key = api_key_create(name="soon revoked")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/plans").status_code == 200  # now cached as recently authenticated
    api_key_revoke(api_key=api_key, now=timezone.now())

    for name, (route, view) in scoped_routes().items():
        url = url_for(route, objects)
        for method in implemented(view):
            before = rows()
            response = send(client, method, url)
            assert response.status_code == 401, (method, url, response.status_code)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert rows() == before


def test_keys_are_stored_only_as_a_hash_and_shown_once():
    api_key, key = api_key_create(name="x", scopes=["read"])
    secret = key.split("_", 2)[2]

    for value in ApiKey.objects.filter(pk=api_key.pk).values().get().values():
        assert secret not in str(value) and key not in str(value)
    # Nothing can give the plaintext back: the row has no field that holds it.
    assert {f.name for f in ApiKey._meta.concrete_fields} == {
        "id", "name", "prefix", "key_hash", "scopes", "created_at", "revoked_at", "last_used_at"}


def test_a_key_with_a_known_prefix_and_a_wrong_secret_is_refused():
    """The prefix finds the row; only the hash comparison (hmac.compare_digest) admits."""
    api_key, key = api_key_create(name="x", scopes=["read"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer ovg_{api_key.prefix}_{'A' * 43}")

    assert client.get("/api/v1/plans").status_code == 401
