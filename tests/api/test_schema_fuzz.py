"""schemathesis over every /api/v1 operation of the OpenAPI schema (`/api/schema/`):
no 5xx, and every response (status, content type, body) is one the schema documents.

Runs in-process against the Django WSGI app with an all-scopes API key, inside the
test's database transaction. CI runs a bounded number of examples per operation; for a
longer hunt:

    SCHEMATHESIS_EXAMPLES=1000 .venv/bin/pytest tests/api/test_schema_fuzz.py -p no:cacheprovider

Generated values are random, so most would only meet "no such customer". To reach the
code behind those checks, a drawn share of cases has its customer, feature, plan and
pack replaced by ones that exist (`_aim_at_known_rows`).
"""

import os
from datetime import timedelta
from decimal import Decimal

import pytest
import schemathesis
from schemathesis.generation.modes import GenerationMode
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from plans.models import CreditPack
from tests.factories import FeatureFactory, make_customer, pro_plan

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))

KNOWN = {"customer": "acme", "external_id": "acme", "feature": "gpt-4o", "plan": "pro", "pack": "starter"}


# Loaded at collection: generating the schema reads no database. (Not through
# `schemathesis.pytest.from_fixture`: its lazy loader sets `Function._nodeid`, which
# pytest 9 no longer has.)
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
    # A schema-valid request may still be refused by a billing rule the schema cannot
    # express (the plan must exist, the timestamp must fall in an open period): 422.
    "positive_data_acceptance": {"expected-statuses": ["2xx", 401, 403, 404, 409, 422, 429]},
}, "operations": [
    # …and three rules answer 400 (contracts the tests in test_errors.py and
    # test_grant_audit.py hold): a customer's started_at is not in the future, nor years
    # back; a plan's tiers rise and the last is open-ended; a grant says why (a reason
    # or a description).
    {"include-path": path, "include-method": "POST",
     "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 400, 401, 403, 404, 409, 422, 429]},
                # A plan's money fields take a JSON number as well as a decimal string, and
                # "" for "no cap" / "open-ended tier" (lenient inputs kept on purpose): the
                # schema documents strings only, so a mutation to 0 or "" is "accepted".
                **({"negative_data_rejection": {"enabled": False}} if path == "/api/v1/plans" else {})}}
    for path in ("/api/v1/customers", "/api/v1/plans", "/api/v1/customers/{external_id}/grants")
]})
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application(), config=CONFIG).include(
    path_regex=r"^/api/v1/")


@pytest.fixture(autouse=True)
def _keep_the_test_connection():
    """Calling the WSGI app directly fires request_started/finished, whose
    close_old_connections closes the test transaction's connection on PostgreSQL
    (Django's test client disconnects it the same way)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def known_rows(db):
    FeatureFactory(code="gpt-4o")
    make_customer(pro_plan(), started_at=timezone.now() - timedelta(days=3), external_id="acme")
    CreditPack.objects.create(code="starter", name="Starter", credits=Decimal("5000"), price=Decimal("9"))


def _aim_at_known_rows(case, draw) -> None:
    """Point some path parameters and body fields at rows that exist. Not in a case made
    to violate the schema: replacing its invalid field would make it valid, and the
    check that invalid data is refused would then fail for nothing."""
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        return
    for name in ("external_id",):
        if case.path_parameters and name in case.path_parameters and draw(st.booleans()):
            case.path_parameters[name] = KNOWN[name]
    if isinstance(case.body, dict):
        for name in ("customer", "feature", "plan", "pack"):
            if name in case.body and draw(st.booleans()):
                case.body[name] = KNOWN[name]
        for event in case.body.get("events", []) if isinstance(case.body.get("events"), list) else []:
            if isinstance(event, dict) and draw(st.booleans()):
                event.update(customer="acme", feature="gpt-4o")


@schema.parametrize()
@schema.given(data=st.data())
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_every_operation_answers_as_its_schema_says(case, data, api_key, known_rows):
    _aim_at_known_rows(case, data.draw)
    case.call_and_validate(headers={"Authorization": f"Bearer {api_key}"})


# --- What the fuzzing found, pinned ---------------------------------------------------

def test_an_unknown_api_url_posted_to_without_a_csrf_token_is_a_json_404(api_key):
    """The catch-all answered CSRF's HTML 403 to a POST (found as
    POST /api/v1/reservations/<not a uuid>/release): API clients send no CSRF token."""
    from django.test import Client

    client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {api_key}")
    response = client.post("/api/v1/reservations/not-a-uuid/release", {}, content_type="application/json")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_bad_usage_instant_names_its_parameter(api, known_rows):
    response = api.get("/api/v1/customers/acme/usage", {"at": "year"})

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "at"


def test_a_customer_without_email_matches_the_schema(api, known_rows):
    response = api.post("/api/v1/customers", {"external_id": "no-mail", "name": "N", "plan": "pro"}, format="json")

    assert response.status_code == 201 and response.json()["email"] == ""
    openapi = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert "format" not in openapi["components"]["schemas"]["Customer"]["properties"]["email"]


@pytest.mark.parametrize("component, field, accepted, refused", [
    ("EventRequest", "quantity", ["1", "0.000001", "2.5", "1000000000"], ["", "0", "0.0", "-1", "1.0000001",
                                                                          "1000000001"]),
    ("FeatureRequest", "default_credits_per_unit", ["0", "1000000"], ["-1", "1000000.5", ""]),
    ("PlanRequest", "base_price", ["0", "49.00"], ["-1", "1.00001"]),
])
def test_decimal_fields_document_their_bounds(api, component, field, accepted, refused):
    """drf-spectacular's pattern let "" and "-60" through as valid quantities."""
    import re

    openapi = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    pattern = openapi["components"]["schemas"][component]["properties"][field]["pattern"]

    assert [v for v in accepted if not re.match(pattern, v)] == []
    assert [v for v in refused if re.match(pattern, v)] == []


def test_an_empty_batch_is_documented_as_invalid(api):
    openapi = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    events = openapi["components"]["schemas"]["EventBatchRequest"]["properties"]["events"]

    assert (events["minItems"], events["maxItems"]) == (1, 1000)
