"""The entitlement check's fast lane (billing/api/fast_lane.py, in front of Django in
config/wsgi.py) answers exactly what the full stack answers: every request here is sent
through the WSGI application as gunicorn sends it, and again straight to Django's
handler, and the two answers (status, headers, body) must be equal. Requests the lane
must not answer itself go to Django untouched."""

import io
import json
import sys
from decimal import Decimal

import pytest
import time_machine
from django.core import signals
from django.db import close_old_connections

from billing.services.api_keys import api_key_create
from config.wsgi import application
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)
PATH = "/api/v1/entitlements/check"


@pytest.fixture(autouse=True)
def _keep_the_test_connection():
    """As Django's test client does: a request must not close the test's transaction."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def acme(settings):
    settings.ALLOWED_HOSTS = ["api.example.com"]
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    return make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")


@pytest.fixture
def key(acme):
    return api_key_create(name="checks", scopes=["ingest"])[1]


def environ(body, key=None, **overrides) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    env = {
        "REQUEST_METHOD": "POST", "PATH_INFO": PATH, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "api.example.com", "SERVER_PORT": "443", "HTTP_HOST": "api.example.com",
        "wsgi.url_scheme": "https", "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)),
        "wsgi.input": io.BytesIO(raw), "REMOTE_ADDR": "203.0.113.9", "wsgi.errors": sys.stderr,
        "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_ACCEPT": "*/*",
    }
    if key:
        env["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    env.update(overrides)
    return env


def call(app, env) -> tuple[str, dict, bytes]:
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    iterable = app(dict(env, **{"wsgi.input": io.BytesIO(env["wsgi.input"].getvalue())}), start_response)
    try:
        body = b"".join(iterable)
    finally:
        getattr(iterable, "close", lambda: None)()
    return answer["status"], dict(answer["headers"]), body


def both_ways(env) -> tuple[str, dict, bytes, bool]:
    """(status, headers, body, answered by the lane); asserts the full stack agrees."""
    served = application.served
    through_wsgi = call(application, env)
    by_the_lane = application.served == served + 1
    assert call(application.django_app, env) == through_wsgi
    return (*through_wsgi, by_the_lane)


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("body", [
    {"customer": "acme", "feature": "gpt-4o"},
    {"customer": "acme", "feature": "gpt-4o", "quantity": "1000.5"},  # 10 005 credits: overage, under the cap
    {"customer": "acme", "feature": "gpt-4o", "quantity": 5000},  # past the USD 5 cap
    {"customer": "acme", "feature": "unknown-feature", "quantity": 1},
])
def test_plain_checks_are_answered_by_the_lane_exactly_as_by_the_full_stack(key, body):
    status, headers, raw, by_the_lane = both_ways(environ(body, key))
    assert by_the_lane and status == "200 OK"
    assert headers["Content-Type"] == "application/json" and headers["X-Frame-Options"] == "DENY"
    answer = json.loads(raw)
    assert set(answer) >= {"allowed", "reason", "credits_remaining", "estimated_overage_amount"}


@time_machine.travel(NOW, tick=False)
def test_the_lane_answers_with_the_figures_the_view_computes(key):
    _, _, raw, by_the_lane = both_ways(environ({"customer": "acme", "feature": "gpt-4o", "quantity": "1000.5"}, key))
    assert by_the_lane
    # 10 005 credits against 10 000 included: 5 overage credits at USD 0.002.
    assert json.loads(raw) == {
        "allowed": True, "reason": "overage", "credits_required": "10005", "credits_remaining": "10000",
        "overage_credits": "5", "estimated_overage_amount": "0.01", "currency": "USD",
        "reservation_id": None, "reservation_expires_at": None,
    }


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("case, env_changes, status", [
    ("no key", {"HTTP_AUTHORIZATION": None}, "401"),
    ("unknown key", {"HTTP_AUTHORIZATION": "Bearer ovg_nope_nope"}, "401"),
    ("unknown customer", {"body": {"customer": "nobody", "feature": "gpt-4o"}}, "404"),
    ("invalid quantity", {"body": {"customer": "acme", "feature": "gpt-4o", "quantity": "-1"}}, "400"),
    ("not JSON", {"body": b"{nope"}, "400"),
    ("lone surrogate", {"body": b'{"customer": "\\ud800", "feature": "gpt-4o"}'}, "400"),
    ("form body", {"CONTENT_TYPE": "application/x-www-form-urlencoded"}, "415"),
    ("HTML wanted", {"HTTP_ACCEPT": "text/html"}, "406"),
    ("format override", {"QUERY_STRING": "format=json"}, "200"),
    ("host not allowed", {"HTTP_HOST": "evil.example.net"}, "400"),
    ("declared too large", {"CONTENT_LENGTH": "99999999"}, "413"),
    ("no body", {"body": b""}, "400"),
    ("a large body", {"body": {"customer": "acme", "feature": "gpt-4o", "padding": "x" * 5000}}, "200"),
    ("GET", {"REQUEST_METHOD": "GET"}, "405"),
])
def test_everything_else_goes_to_the_full_stack_untouched(key, case, env_changes, status):
    changes = dict(env_changes)
    env = environ(changes.pop("body", {"customer": "acme", "feature": "gpt-4o"}), key, **changes)
    env = {name: value for name, value in env.items() if value is not None}
    answered, _, _, by_the_lane = both_ways(env)
    assert answered.startswith(status), (case, answered)
    assert not by_the_lane, case


@time_machine.travel(NOW, tick=False)
def test_a_key_without_the_ingest_scope_is_refused_by_the_full_stack(acme):
    read_only = api_key_create(name="reader", scopes=["read"])[1]
    status, _, raw, by_the_lane = both_ways(environ({"customer": "acme", "feature": "gpt-4o"}, read_only))
    assert status.startswith("403") and not by_the_lane and json.loads(raw)["error"]["code"]


@time_machine.travel(NOW, tick=False)
def test_http_is_redirected_by_django_when_ssl_is_required(key, settings):
    from django.core.handlers.wsgi import WSGIHandler

    from billing.api.fast_lane import EntitlementCheckFastLane

    settings.SECURE_SSL_REDIRECT = True  # read when the handler and its middleware are built
    lane = EntitlementCheckFastLane(WSGIHandler())
    env = environ({"customer": "acme", "feature": "gpt-4o"}, key, **{"wsgi.url_scheme": "http", "SERVER_PORT": "80"})
    status, headers, _ = call(lane, env)
    assert status.startswith("301") and headers["Location"].startswith("https://") and lane.served == 0
    assert call(lane, environ({"customer": "acme", "feature": "gpt-4o"}, key))[0] == "200 OK" and lane.served == 1


@time_machine.travel(NOW, tick=False)
def test_a_reservation_is_made_by_the_view_once(key):
    status, _, raw, by_the_lane = call_once(environ({"customer": "acme", "feature": "gpt-4o", "reserve": True}, key))
    assert status == "200 OK" and not by_the_lane and json.loads(raw)["reservation_id"]
    assert acme_reservations() == 1


def call_once(env):
    served = application.served
    status, headers, raw = call(application, env)
    return status, headers, raw, application.served == served + 1


def acme_reservations() -> int:
    from billing.models import Reservation

    return Reservation.objects.filter(customer__external_id="acme").count()


@time_machine.travel(NOW, tick=True)
def test_the_rate_limit_counts_each_request_once_and_the_full_stack_refuses(key, settings):
    settings.OVERAGE_API_RATES = {**settings.OVERAGE_API_RATES, "ingest": "3/min"}
    env = environ({"customer": "acme", "feature": "gpt-4o"}, key)
    answers = [call_once(env) for _ in range(5)]
    assert [(status[:3], by_the_lane) for status, _, _, by_the_lane in answers] == [
        ("200", True), ("200", True), ("200", True), ("429", False), ("429", False)]
    assert json.loads(answers[3][2])["error"]["code"] == "rate_limited" and "Retry-After" in answers[3][1]
    # Each request counted once: by the lane, which the full stack then trusts (read
    # from whichever cache the settings give: local memory, or Redis as in CI).
    from django.core.cache import cache

    from billing.models import ApiKey

    window_start = int(NOW.timestamp()) // 60 * 60  # the clock ticks from NOW, the start of its minute
    assert cache.get(f"throttle:api:ingest:{ApiKey.objects.get(name='checks').pk}:60:{window_start}") == 5


@time_machine.travel(NOW, tick=False)
def test_the_rate_limit_is_counted_before_the_body_is_read(key, settings):
    """A throttled key costs no parsing and no decision, and a bad body from a key with
    room left is counted once, not again by the full stack."""
    settings.OVERAGE_API_RATES = {**settings.OVERAGE_API_RATES, "ingest": "1/min"}
    first = call_once(environ(b"{not json", key))
    second = call_once(environ({"customer": "acme", "feature": "gpt-4o"}, key))
    assert (first[0][:3], first[3], second[0][:3], second[3]) == ("400", False, "429", False)


def test_another_middleware_stack_turns_the_lane_off(settings, key):
    from django.core.handlers.wsgi import WSGIHandler

    from billing.api.fast_lane import EntitlementCheckFastLane

    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "django.middleware.gzip.GZipMiddleware"]
    lane = EntitlementCheckFastLane(WSGIHandler())
    with time_machine.travel(NOW, tick=False):
        status, _, _ = call(lane, environ({"customer": "acme", "feature": "gpt-4o"}, key))
    assert status == "200 OK" and not lane.enabled and lane.served == 0
