"""A corpus of hostile input against every write endpoint: each value gets a 4xx with the
API's error body {"error": {"code", "message", "field"}} and writes nothing.

test_errors.py holds the field-by-field rules of the events endpoint (and a few of the
others); test_body_limit.py the 413 for oversized bodies. This file sends the same
corpus to every field of every write endpoint, and the malformed bodies no field rule
sees (deep nesting, bare values, numbers past float range, lone surrogates, NUL bytes
in URLs: PostgreSQL refuses NUL in text, which was a 500).
"""

import json
from decimal import Decimal

import pytest
import time_machine

from billing.models import (AutoTopUp, CreditGrant, CreditPurchase, Customer, Invoice, LedgerEntry, Reservation,
                            SpendCapApproval, Subscription, UsageEvent)
from plans.models import CreditPack, Feature, FeatureCost, OverageTier, Plan
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)
RESERVATION = "3f2b8a4e-0000-4000-8000-000000000000"

# Every write endpoint of billing/api/urls.py, with a body it would accept.
WRITES = {
    "event": ("post", "/api/v1/events", {"id": "e-1", "customer": "acme", "feature": "gpt-4o", "quantity": "2"}),
    "batch": ("post", "/api/v1/events/batch",
              {"events": [{"id": "e-1", "customer": "acme", "feature": "gpt-4o", "quantity": "2"}]}),
    "check": ("post", "/api/v1/entitlements/check",
              {"customer": "acme", "feature": "gpt-4o", "quantity": "2", "reserve": True,
               "reservation_ttl_seconds": 60}),
    "release": ("post", f"/api/v1/reservations/{RESERVATION}/release", {}),
    "customer": ("post", "/api/v1/customers",
                 {"external_id": "new-co", "name": "New Co", "email": "a@new.test", "plan": "pro",
                  "started_at": "2026-05-09T00:00:00Z"}),
    "plan": ("post", "/api/v1/plans",
             {"code": "team", "name": "Team", "currency": "USD", "base_price": "10", "included_credits": "100",
              "overage_enabled": True, "overage_unit_price": "0.01",
              "overage_tiers": [{"up_to": "1000", "unit_price": "0.01"}, {"up_to": None, "unit_price": "0.005"}],
              "overage_cap": "50", "rollover": {"policy": "capped", "max_credits": "10"},
              "feature_costs": [{"feature": "gpt-4o", "credits_per_unit": "2"}]}),
    "feature": ("post", "/api/v1/features",
                {"code": "claude", "name": "Claude", "unit": "token", "default_credits_per_unit": "0.5"}),
    "grant": ("post", "/api/v1/customers/acme/grants",
              {"credits": "100", "source": "promotional", "expires_at": "2026-06-10T00:00:00Z",
               "features": ["gpt-4o"], "idempotency_key": "g-1", "description": "Welcome"}),
    "pack": ("post", "/api/v1/customers/acme/packs", {"pack": "starter", "idempotency_key": "p-1"}),
    "spend_cap": ("put", "/api/v1/customers/acme/spend-cap", {"spend_cap": "20"}),
    "cap_approval": ("post", "/api/v1/customers/acme/spend-cap/approvals", {"cap": "100", "note": "ok"}),
    "auto_topup": ("put", "/api/v1/customers/acme/auto-topup",
                   {"enabled": True, "mode": "pack", "pack": "starter", "threshold": "100",
                    "max_per_month": 2, "max_amount_per_month": "50"}),
    "subscription": ("post", "/api/v1/customers/acme/subscription", {"plan": "pro"}),
}

NUL = "a\x00b"
HUGE = "x" * 10**6
SURROGATE = "\ud800"

# Values no field of any write endpoint accepts (a scalar field given a container,
# a container field given a scalar, text with NUL, a million characters…).
ALWAYS_REFUSED = [NUL, HUGE, {"$gt": ""}, [["nested"]], "1e309", "-1e309"]
# Refused by the fields that hold a number of credits or money.
REFUSED_BY_AMOUNTS = ["NaN", "Infinity", "-Infinity", "-1", "-0.000001", "1e400", "0x10", "1,000", "½", "", True,
                      "1; DROP TABLE x", "{{ 7*7 }}"]
# …and by the ones that must be positive.
REFUSED_BY_POSITIVE_AMOUNTS = ["0", "0.0", "0.0000001", -5]
# Refused by identifier fields that appear in URLs (external_id, plan and feature codes).
REFUSED_BY_CODES = ["'; DROP TABLE billing_customer; --", "{{ settings.SECRET_KEY }}", "{% debug %}",
                    "${jndi:ldap://x}", "a/b", "../etc", "名前", "a\u202eb", "a\u200bb", "tab\tbed", "line\nbreak"]

AMOUNTS = {("event", "quantity"), ("check", "quantity"), ("plan", "base_price"), ("plan", "included_credits"),
           ("plan", "overage_unit_price"), ("plan", "overage_cap"), ("feature", "default_credits_per_unit"),
           ("grant", "credits"), ("spend_cap", "spend_cap"), ("cap_approval", "cap"), ("auto_topup", "threshold"),
           ("auto_topup", "max_amount_per_month")}
NULLABLE_AMOUNTS = {("plan", "overage_cap"), ("spend_cap", "spend_cap"), ("auto_topup", "max_amount_per_month")}
POSITIVE_AMOUNTS = {("event", "quantity"), ("check", "quantity"), ("grant", "credits")}
CODES = {("customer", "external_id"), ("plan", "code"), ("feature", "code")}
# Fields whose JSON value may be an object or list, so the container cases do not apply.
CONTAINERS = {("batch", "events"), ("plan", "overage_tiers"), ("plan", "rollover"), ("plan", "feature_costs"),
              ("grant", "features")}


@pytest.fixture
def world():
    with time_machine.travel(NOW, tick=False):
        gpt = FeatureFactory(code="gpt-4o")
        FeatureCost.objects.create(plan=pro_plan(cap_behaviour=Plan.CapBehaviour.APPROVAL), feature=gpt,
                                   credits_per_unit=Decimal("1"))
        CreditPack.objects.create(code="starter", name="Starter", credits=Decimal("5000"), price=Decimal("9"))
        return make_customer(Plan.objects.get(code="pro"), started_at=utc(2026, 5, 1), external_id="acme")


def fingerprint():
    """Row counts of everything a write endpoint can create, and the fields the two
    PUT endpoints and a plan change update in place."""
    counts = tuple(m.objects.count() for m in (
        UsageEvent, LedgerEntry, CreditGrant, Reservation, Customer, Subscription, Plan, Feature, FeatureCost,
        OverageTier, CreditPack, CreditPurchase, Invoice, AutoTopUp, SpendCapApproval))
    acme = Customer.objects.filter(external_id="acme").values_list("spend_cap", flat=True).first()
    plans = tuple(Subscription.objects.order_by("pk").values_list("plan_id", "pending_plan_id"))
    return counts, acme, plans


def assert_refused(response, before):
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["field"] is None or isinstance(error["field"], str)
    assert fingerprint() == before
    return error


def send(api, method, path, body):
    return getattr(api, method)(path, data=json.dumps(body), content_type="application/json")


def test_every_write_endpoint_accepts_its_sample_body(api, world):
    """The corpus below varies one field of these bodies at a time; each must work as is."""
    with time_machine.travel(NOW, tick=False):
        for name, (method, path, body) in WRITES.items():
            if name == "release":
                continue  # needs a reservation; the check above makes one
            response = send(api, method, path, body)
            assert response.status_code < 300, (name, response.content)


def _cases():
    for name, (method, path, body) in WRITES.items():
        for field in body:
            values = list(ALWAYS_REFUSED)
            if (name, field) in CONTAINERS:
                values = [v for v in values if not isinstance(v, (dict, list))] + [7]
            if (name, field) in AMOUNTS:
                # "" on a nullable amount is null (DRF's reading): it removes a cap, as null does.
                values += [v for v in REFUSED_BY_AMOUNTS if not (v == "" and (name, field) in NULLABLE_AMOUNTS)]
            if (name, field) in POSITIVE_AMOUNTS:
                values += REFUSED_BY_POSITIVE_AMOUNTS
            if (name, field) in CODES:
                values += REFUSED_BY_CODES
            yield pytest.param(name, field, values, id=f"{name}.{field}")


@pytest.mark.parametrize("name, field, values", list(_cases()))
def test_a_hostile_value_in_any_field_is_refused_and_writes_nothing(api, world, name, field, values):
    method, path, body = WRITES[name]
    with time_machine.travel(NOW, tick=False):
        before = fingerprint()
        for value in values:
            raw = json.dumps({**body, field: value})
            if value in ("1e309", "-1e309"):  # as JSON number literals, which parse to ±inf
                raw = raw.replace(f'"{value}"', value)
            response = getattr(api, method)(path, data=raw, content_type="application/json")
            error = assert_refused(response, before)
            if name != "batch":
                assert error["field"] is not None and error["field"].split(".")[0].split("[")[0] == field, (
                    value if len(str(value)) < 100 else "(long)", error)


@pytest.mark.parametrize("name", [n for n in WRITES if n != "release"])
@pytest.mark.parametrize("raw", [
    pytest.param('{"a": ', id="truncated"),
    pytest.param("[" * 100_000 + "]" * 100_000, id="nested-100k-deep"),
    pytest.param('{"a": NaN}', id="nan-literal"),
    pytest.param('{"a": Infinity}', id="infinity-literal"),
    pytest.param('{"a": -Infinity}', id="minus-infinity-literal"),
    pytest.param('{"a": 1e309}', id="number-past-float"),
    pytest.param('{"a": "\\ud800"}', id="lone-surrogate"),
    pytest.param('{"a\\ud800": 1}', id="lone-surrogate-key"),
    pytest.param("null", id="null"),
    pytest.param('"just a string"', id="bare-string"),
    pytest.param("[1, 2, 3]", id="bare-list"),
    pytest.param("42", id="bare-number"),
    pytest.param("", id="empty"),
    pytest.param('{"a": 1}{"b": 2}', id="two-documents"),
    pytest.param('{"a": 1' + "0" * 5000 + "}", id="5000-digit-integer"),
])
def test_a_malformed_body_is_refused_on_every_endpoint(api, world, name, raw):
    method, path, _ = WRITES[name]
    with time_machine.travel(NOW, tick=False):
        before = fingerprint()
        response = getattr(api, method)(path, data=raw, content_type="application/json")
        assert_refused(response, before)


def test_invalid_utf8_is_a_400(api, world):
    before = fingerprint()
    response = api.post("/api/v1/events", data=b'{"id": "\xff\xfe", "customer": "acme"}',
                        content_type="application/json")
    assert assert_refused(response, before)["code"] == "malformed_json"


@pytest.mark.parametrize("value", [
    pytest.param("1e309", id="past-float"), pytest.param('"\\ud800"', id="lone-surrogate")])
def test_unstorable_values_are_named_by_field(api, world, value):
    body = '{"id": "e-1", "customer": "acme", "feature": "gpt-4o", "quantity": 1, "properties": {"v": %s}}' % value
    with time_machine.travel(NOW, tick=False):
        before = fingerprint()
        error = assert_refused(api.post("/api/v1/events", data=body, content_type="application/json"), before)
    assert (error["code"], error["field"]) == ("invalid", "properties")
    assert "properties.v" in error["message"]


@pytest.mark.parametrize("path", [
    "/api/v1/customers/a%00b", "/api/v1/customers/a%00b/usage", "/api/v1/customers/a%00b/invoices",
    "/api/v1/customers/a%00b/invoices/upcoming", "/api/v1/customers/a%00b/spend-cap",
    "/api/v1/customers/a%00b/auto-topup", "/api/v1/plans/a%00b", "/api/v1/invoices/a%00b",
    "/api/v1/invoices/a%00b/lines/1/usage",
])
def test_a_nul_byte_in_a_url_id_is_a_400_not_a_database_error(api, world, path):
    response = api.get(path)
    error = assert_refused(response, fingerprint())
    assert error["code"] == "invalid"


@pytest.mark.parametrize("name", ["grant", "pack", "spend_cap", "cap_approval", "auto_topup", "subscription"])
def test_a_nul_byte_in_a_url_id_refuses_writes(api, world, name):
    method, path, body = WRITES[name]
    with time_machine.travel(NOW, tick=False):
        before = fingerprint()
        response = send(api, method, path.replace("/acme/", "/a%00b/"), body)
        assert assert_refused(response, before)["field"] == "external_id"


@pytest.mark.parametrize("path", ["/api/v1/customers/" + "x" * 10**6, "/api/v1/plans/" + "x" * 10**6])
def test_a_million_character_id_in_a_url_is_a_404(api, world, path):
    response = api.get(path)
    assert assert_refused(response, fingerprint())["code"].endswith("not_found")


def test_a_batch_of_1001_events_is_refused_whole_and_writes_nothing(api, world):
    event = WRITES["event"][2]
    with time_machine.travel(NOW, tick=False):
        before = fingerprint()
        response = api.post("/api/v1/events/batch", {"events": [{**event, "id": f"e-{i}"} for i in range(1001)]},
                            format="json")
        error = assert_refused(response, before)
    assert (response.status_code, error["code"], error["field"]) == (400, "invalid", "events")
    assert "1000" in error["message"]


def test_every_hostile_event_in_a_batch_gets_its_own_error_and_only_the_good_one_is_recorded(api, world):
    good = WRITES["event"][2]
    bad = [{**good, "quantity": "0"}, {**good, "quantity": "NaN"}, {**good, "id": NUL}, {**good, "id": HUGE[:300]},
           {**good, "customer": NUL}, {**good, "feature": "{{ 7*7 }}"}, {**good, "quantity": [1]}, "not an object"]
    events = [{**item, "id": f"bad-{i}"} if isinstance(item, dict) and item["id"] == "e-1" else item
              for i, item in enumerate(bad)]
    with time_machine.travel(NOW, tick=False):
        response = api.post("/api/v1/events/batch", {"events": events[:-1] + [good]}, format="json")
        assert response.status_code == 200, response.content
        results = response.json()["results"]
        assert [r["outcome"] for r in results] == ["error"] * 7 + ["created"]
        for result in results[:-1]:
            assert 400 <= result["http_status"] < 500 and set(result["error"]) == {"code", "message", "field"}
        assert list(UsageEvent.objects.values_list("event_id", flat=True)) == ["e-1"]

        # A non-object item is refused with the whole batch, naming it.
        before = fingerprint()
        error = assert_refused(api.post("/api/v1/events/batch", {"events": [good, "x"]}, format="json"), before)
    assert error["field"] == "events[1]"


@pytest.mark.parametrize("text", [
    "'; DROP TABLE billing_customer; --", "Robert'); DELETE FROM billing_usageevent;--", "{{ 7*7 }}",
    "{% load static %}{% debug %}", "${7*7}", "<script>alert(1)</script>", "名前 🚀 مرحبا", "a\u202eb\u200b",
])
def test_injection_strings_in_free_text_are_stored_verbatim_not_run(api, world, text):
    """Free text (names, descriptions, notes, event properties) may hold anything
    printable: it is stored and returned byte for byte, never interpreted."""
    with time_machine.travel(NOW, tick=False):
        response = api.post("/api/v1/customers", {"external_id": "inj", "name": text, "plan": "pro"}, format="json")
        assert response.status_code == 201 and response.json()["name"] == text
        event = {**WRITES["event"][2], "properties": {text: text}}
        response = api.post("/api/v1/events", event, format="json")
        assert response.status_code == 201 and response.json()["properties"] == {text: text}
    assert Customer.objects.count() == 2 and UsageEvent.objects.count() == 1
